"""The engine: the database layer (connection, migrations, clock, errors) and, on top of it,
the five execution stores and the execution model."""

from .clock import ManualClock, SystemClock
from .database import Database
from .errors import (
    AlreadyExistsError,
    CorruptDataError,
    EngineError,
    ExtensionNotFoundError,
    InvalidTransitionError,
    MergeListenerError,
    NotFoundError,
    NotOwnerError,
    SchemaError,
)

__all__ = [
    "Database",
    "ManualClock",
    "SystemClock",
    "EngineError",
    "ExtensionNotFoundError",
    "SchemaError",
    "NotFoundError",
    "AlreadyExistsError",
    "InvalidTransitionError",
    "CorruptDataError",
    "NotOwnerError",
    "MergeListenerError",
]
