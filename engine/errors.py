"""Errors raised by the engine.

    EngineError
    ├── ExtensionNotFoundError   the cr-sqlite library is missing (says how to build it)
    ├── SchemaError              a migration or CRR rule is broken, or the database is newer than the code
    ├── NotFoundError            a mutator was given an id that does not exist
    ├── AlreadyExistsError       a creating method found its row already there
    ├── InvalidTransitionError   a state machine edge that is not allowed
    ├── CorruptDataError         a stored JSON column does not decode
    ├── NotOwnerError            this replica does not own the workflow
    └── MergeListenerError       an `on_merge` listener failed (the merge is rolled back)

Leaf errors carry the facts as attributes (table, id, column, ...) as well as in the message.
"""

from __future__ import annotations

__all__ = [
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


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class ExtensionNotFoundError(EngineError):
    """`source` says who named `path`: "CRSQLITE_PATH", "extension=", or "" for the default
    (the copy bundled in the wheel, else the checkout's extensions/crsqlite.so)."""

    def __init__(self, path: str, *, source: str = ""):
        self.path, self.source = path, source
        where = f" (from {source})" if source else ""
        super().__init__(
            f"cr-sqlite extension not found at {path}{where}; in a source checkout build it with "
            f"`make extension` (runs extensions/build.sh), install the wheel from `make wheel` "
            f"(it bundles crsqlite.so), or point CRSQLITE_PATH at a built crsqlite.so"
        )


class SchemaError(EngineError):
    def __init__(self, message: str, *, table: str = "", column: str = "", index: str = ""):
        self.table, self.column, self.index = table, column, index
        super().__init__(message)


class NotFoundError(EngineError):
    def __init__(self, table: str, id: str):
        self.table, self.id = table, id
        super().__init__(f"{table} row {id!r} not found")


class AlreadyExistsError(EngineError):
    def __init__(self, table: str, id: str, detail: str = ""):
        self.table, self.id = table, id
        super().__init__(f"{table} row {id!r} already exists" + (f" ({detail})" if detail else ""))


class InvalidTransitionError(EngineError):
    def __init__(self, table: str, id: str, field: str, from_value: str, to_value: str, reason: str = ""):
        self.table, self.id, self.field = table, id, field
        self.from_value, self.to_value, self.reason = from_value, to_value, reason
        super().__init__(
            f"{table} row {id!r}: {field} cannot go from {from_value!r} to {to_value!r}"
            + (f" ({reason})" if reason else "")
        )


class CorruptDataError(EngineError):
    def __init__(self, table: str, id: str, column: str, reason: str):
        self.table, self.id, self.column = table, id, column
        super().__init__(f"{table} row {id!r}: column {column!r} holds malformed JSON ({reason})")


class NotOwnerError(EngineError):
    def __init__(self, workflow_id: str, owner: str | None, local: str):
        self.workflow_id, self.owner, self.local = workflow_id, owner, local
        super().__init__(
            f"workflow {workflow_id!r} is owned by replica {owner}, not by this replica {local}"
        )


class MergeListenerError(EngineError):
    """A listener registered with `Database.on_merge` raised; its merge was rolled back."""
