"""Table-by-table comparison of replicas: the first differing row and column, with every value.

Convergence means every CRR table holds the same rows with the same values (and the same
SQLite types: 1 and 1.0 and '1' differ) on every replica. Local bookkeeping tables (names
starting with `__`) are not CRRs and are never compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from engine.database import Database, Row
from engine.migrations import crr_tables

__all__ = [
    "MISSING",
    "sort_key",
    "Difference",
    "ConvergenceError",
    "TableState",
    "snapshot",
    "rows",
    "first_difference",
    "assert_converged",
]


class _Missing:
    """The value of a row a replica does not have."""

    def __repr__(self) -> str:
        return "<row missing>"


MISSING: Any = _Missing()

_TYPE_RANK = {type(None): 0, int: 1, float: 1, str: 2, bytes: 3}


def sort_key(key: tuple[Any, ...]) -> tuple[tuple[int, Any], ...]:
    """SQLite's order for primary-key values of mixed types (NULL < numbers < text < blob)."""
    return tuple((_TYPE_RANK.get(type(v), 4), v) for v in key)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


class TableState(msgspec.Struct):
    """One table of one replica: its columns, primary-key columns and rows keyed by pk."""

    columns: list[str]
    pk: list[str]
    rows: dict[tuple[Any, ...], Row]


def snapshot(db: Database, tables: Sequence[str] | None = None) -> dict[str, TableState]:
    """Every CRR table of `db` (or only `tables`), rows keyed by primary key."""
    state: dict[str, TableState] = {}
    with db.reading() as s:
        for table in tables if tables is not None else crr_tables(s.connection):
            info = s.execute(f'PRAGMA table_info("{table}")')
            columns = [row[1] for row in info]
            pk = [row[1] for row in sorted((r for r in info if r[5]), key=lambda r: r[5])]
            at = [columns.index(name) for name in pk]
            rows = s.execute(f'SELECT * FROM "{table}"')
            state[table] = TableState(columns, pk, {tuple(r[i] for i in at): r for r in rows})
    return state


def rows(db: Database, tables: Sequence[str] | None = None) -> dict[str, list[Row]]:
    """Every CRR table of `db` (or only `tables`): its rows, ordered by primary key."""
    return {table: [ts.rows[key] for key in sorted(ts.rows, key=sort_key)]
            for table, ts in snapshot(db, tables).items()}


class Difference(msgspec.Struct):
    """Where replicas differ first: a table (missing somewhere), a row, or a column of a row.

    `values` has one entry per compared replica (`replicas`): the column's value, the whole
    row when `column` is None, or MISSING.
    """

    table: str
    replicas: list[int]
    pk: dict[str, Any] | None = None
    column: str | None = None
    values: list[Any] = msgspec.field(default_factory=list)
    more_rows: int = 0
    more_tables: list[str] = msgspec.field(default_factory=list)

    def describe(self) -> str:
        if self.pk is None:
            where = f"table {self.table} exists on some replicas only"
        else:
            key = ", ".join(f"{name}={value!r}" for name, value in self.pk.items())
            where = f"table {self.table}, row ({key})" + (f", column {self.column}" if self.column else "")
        lines = [f"replicas diverge: {where}"]
        first = self.values[0] if self.values else None
        for index, value in zip(self.replicas, self.values):
            mark = "" if _same(value, first) else "   <- differs from r" + str(self.replicas[0])
            lines.append(f"  r{index}: {value!r}{mark}")
        if self.more_rows:
            lines.append(f"  ({self.more_rows} more differing rows in {self.table})")
        if self.more_tables:
            lines.append(f"  (also differing: {', '.join(self.more_tables)})")
        return "\n".join(lines)


class ConvergenceError(AssertionError):
    """Replicas that should hold the same data do not; `difference` says where first."""

    def __init__(self, difference: Difference, context: str = ""):
        self.difference = difference
        self.table, self.pk, self.column = difference.table, difference.pk, difference.column
        super().__init__(difference.describe() + (f"\n{context}" if context else ""))


def first_difference(states: Sequence[dict[str, TableState]], replicas: Sequence[int]) -> Difference | None:
    """The first difference among snapshots (table order, then primary-key order), or None."""
    differing: list[Difference] = []
    for table in sorted(set().union(*states)):
        if any(table not in state for state in states):
            values = ["present" if table in state else MISSING for state in states]
            differing.append(Difference(table, list(replicas), values=values))
            continue
        found = _table_difference(table, [state[table] for state in states], replicas)
        if found is not None:
            differing.append(found)
    if not differing:
        return None
    first = differing[0]
    first.more_tables = [d.table for d in differing[1:]]
    return first


def _table_difference(table: str, tables: list[TableState], replicas: Sequence[int]) -> Difference | None:
    keys = sorted(set().union(*(t.rows for t in tables)), key=sort_key)
    first: Difference | None = None
    count = 0
    for key in keys:
        rows = [t.rows.get(key, MISSING) for t in tables]
        if all(_same_row(row, rows[0]) for row in rows[1:]):
            continue
        count += 1
        if first is None:
            first = _row_difference(table, tables[0], key, rows, replicas)
    if first is not None:
        first.more_rows = count - 1
    return first


def _same_row(a: Any, b: Any) -> bool:
    if a is MISSING or b is MISSING:
        return a is b
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _row_difference(table: str, state: TableState, key: tuple[Any, ...], rows: list[Any], replicas: Sequence[int]) -> Difference:
    pk = dict(zip(state.pk, key))
    if any(row is MISSING for row in rows):
        return Difference(table, list(replicas), pk, None, rows)
    for position, column in enumerate(state.columns):
        values = [row[position] for row in rows]
        if not all(_same(v, values[0]) for v in values[1:]):
            return Difference(table, list(replicas), pk, column, values)
    return Difference(table, list(replicas), pk, None, rows)  # rows of different widths: schemas differ


def assert_converged(dbs: Sequence[Database], tables: Sequence[str] | None = None) -> None:
    """Assert that these databases (any replicas, in a Cluster or not) hold identical CRR
    tables; in messages they are r0, r1, ... in the order given.

    Raises:
        ConvergenceError: naming the first differing table, row and column.
    """
    difference = first_difference([snapshot(db, tables) for db in dbs], list(range(len(dbs))))
    if difference is not None:
        raise ConvergenceError(difference)
