"""Shared mechanics of the stores: deterministic ids, JSON columns, and mapping rows of one
table to a `msgspec.Struct`.

Each store describes its table once with `Table(name, Struct, json_columns=...)`; the Struct's
fields are the table's columns in order, so a `SELECT` of `table.columns` decodes straight into
it. JSON columns are decoded on read (malformed text raises `CorruptDataError` naming table,
id and column) and encoded on write with one reused encoder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from .database import Row, Session
from .errors import CorruptDataError, InvalidTransitionError, NotFoundError

if TYPE_CHECKING:
    import apsw  # for apsw.Bindings, a name of APSW's type stubs only

__all__ = ["deterministic_id", "require_text", "encode_json", "chunks", "placeholders", "Table", "StateMachine"]

T = TypeVar("T", bound=msgspec.Struct)
V = TypeVar("V")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

# Marks a JSON column whose '' means "no value yet" (decoded as None), e.g. prepare_result.
EMPTY_IS_NONE = "empty-is-none"


def deterministic_id(*parts: str) -> str:
    """A 128-bit id derived from the parts, identical on every replica.

    Parts are length-prefixed so ("ab", "c") and ("a", "bc") never collide.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        raw = part.encode()
        digest.update(len(raw).to_bytes(8, "big"))
        digest.update(raw)
    return digest.hexdigest()


def require_text(name: str, value: str) -> str:
    """Reject empty or non-string identifiers with a ValueError naming the argument."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


# Bound parameters per statement when a list of ids becomes `IN (...)`: far below SQLite's
# limit, and big enough that chunking is rare.
IN_CHUNK = 500


def chunks(items: list[V], size: int = IN_CHUNK) -> Iterator[list[V]]:
    """`items` in slices of at most `size`, for `IN (...)` lists with bounded parameters."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def placeholders(items: Sized) -> str:
    """`?, ?, ?` for the items of an `IN (...)` list."""
    return ", ".join("?" * len(items))


def encode_json(value: Any) -> str:
    """Encode a JSON column value (TypeError for values JSON cannot hold)."""
    try:
        return _encoder.encode(value).decode()
    except (TypeError, msgspec.EncodeError) as error:
        raise TypeError(f"value is not JSON-serializable: {error}") from error


class Table(Generic[T]):
    """How rows of one table map to one Struct type, plus the few queries every store needs."""

    def __init__(self, name: str, struct: type[T], *, json_columns: dict[str, str | None] | None = None):
        """`json_columns` maps column name to None (always JSON) or EMPTY_IS_NONE."""
        self.name = name
        self.struct = struct
        self.columns: tuple[str, ...] = struct.__struct_fields__
        self.select = f"SELECT {', '.join(self.columns)} FROM {name}"
        json_columns = json_columns or {}
        self._json = [(self.columns.index(c), c, mode == EMPTY_IS_NONE) for c, mode in json_columns.items()]

    def row(self, values: Row) -> T:
        """Build the Struct from one selected row, decoding its JSON columns.

        Raises:
            CorruptDataError: a JSON column does not decode.
        """
        if not self._json:
            return self.struct(*values)
        decoded = list(values)
        for position, column, empty_is_none in self._json:
            text = decoded[position]
            if empty_is_none and text == "":
                decoded[position] = None
                continue
            try:
                decoded[position] = _decoder.decode(text)
            except (msgspec.DecodeError, TypeError) as error:
                raise CorruptDataError(self.name, str(decoded[0]), column, str(error)) from None
        return self.struct(*decoded)

    def rows(self, values: list[Row]) -> list[T]:
        return [self.row(v) for v in values]

    def query(self, s: Session, where: str = "", params: apsw.Bindings = (), *, order: str = "",
              limit: int | None = None) -> list[T]:
        """Rows matching `where` (SQL with ? placeholders), optionally ordered and limited."""
        sql = self.select
        if where:
            sql += f" WHERE {where}"
        if order:
            sql += f" ORDER BY {order}"
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            sql += f" LIMIT {int(limit)}"
        return self.rows(s.execute(sql, params))

    def get(self, s: Session, id: str) -> T | None:
        found = s.execute(f"{self.select} WHERE id = ?", (id,))
        return self.row(found[0]) if found else None

    def require(self, s: Session, id: str) -> T:
        """The row with this id.

        Raises:
            NotFoundError: there is none.
        """
        found = self.get(s, id)
        if found is None:
            raise NotFoundError(self.name, id)
        return found

    def update(self, s: Session, id: str, **fields: Any) -> None:
        """Set columns of one row (values already encoded).

        Raises:
            NotFoundError: no row has this id.
        """
        assignments = ", ".join(f"{column} = ?" for column in fields)
        s.execute(f"UPDATE {self.name} SET {assignments} WHERE id = ?", (*fields.values(), id))
        if s.changes() == 0:
            raise NotFoundError(self.name, id)

    def delete(self, s: Session, where: str, params: apsw.Bindings = ()) -> int:
        """Delete matching rows; return how many were deleted."""
        s.execute(f"DELETE FROM {self.name} WHERE {where}", params)
        return s.changes()

    def insert(self, s: Session, row: T) -> None:
        """Insert one row, encoding its JSON columns (a None in an EMPTY_IS_NONE column is '').

        Raises:
            apsw.ConstraintError: a row with this id exists (callers check first and raise
                AlreadyExistsError inside the same transaction).
            TypeError: a JSON column holds a value JSON cannot represent.
        """
        values = [getattr(row, column) for column in self.columns]
        for position, _column, empty_is_none in self._json:
            value = values[position]
            values[position] = "" if (empty_is_none and value is None) else encode_json(value)
        placeholders = ", ".join("?" for _ in self.columns)
        s.execute(f"INSERT INTO {self.name} ({', '.join(self.columns)}) VALUES ({placeholders})", values)


class StateMachine:
    """The allowed edges of one state column (a run's phase, a mutation's status).

    One place decides what is legal, so the stores, the execution model and the tests
    (which enumerate `illegal_pairs()`) agree. A same-state "transition" is illegal unless
    listed as an edge: re-applying a step is a caller bug, and refusing it is what makes
    racing writers produce exactly one winner.
    """

    def __init__(self, table: str, field: str, edges: dict[str, tuple[str, ...]]):
        self.table, self.field = table, field
        self.edges = {state: frozenset(targets) for state, targets in edges.items()}
        self.states = frozenset(self.edges).union(*self.edges.values())

    def allows(self, from_state: str, to_state: str) -> bool:
        return to_state in self.edges.get(from_state, ())

    def check(self, id: str, from_state: str, to_state: str) -> None:
        """Refuse an edge that is not allowed.

        Raises:
            InvalidTransitionError: naming table, id, field, from and to.
        """
        if not self.allows(from_state, to_state):
            raise InvalidTransitionError(self.table, id, self.field, from_state, to_state)

    def require_state(self, value: str) -> str:
        """Reject a value that is not a state of this machine at all.

        Raises:
            ValueError: naming the field, the value and the valid states.
        """
        if value not in self.states:
            raise ValueError(f"{self.field} {value!r} is not one of {sorted(self.states)}")
        return value

    def illegal_pairs(self) -> list[tuple[str, str]]:
        """Every (from, to) pair of states that `check` refuses, sorted."""
        return [(a, b) for a in sorted(self.states) for b in sorted(self.states) if not self.allows(a, b)]
