"""The migration runner: numbered `.sql` files are the schema; this module only applies them.

Each file `NNNN_name.sql` runs in one transaction together with its bookkeeping row in
`__engine_migrations`. Every table a migration creates becomes a CRR, after the CRR rules
(DESIGN.md §5) are checked here, so a broken table is refused with an error that names the
table and the column or index instead of cr-sqlite's generic message. Tables whose name
starts with `__` are local bookkeeping and stay plain tables.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeAlias, cast

import apsw
import msgspec

from .errors import SchemaError
from .resources import data_path

__all__ = [
    "Migration",
    "discover",
    "applied_version",
    "migrate",
    "check_crr_compatible",
    "crr_tables",
    "DEFAULT_MIGRATIONS_DIR",
]

DEFAULT_MIGRATIONS_DIR = data_path("migrations", "migrations")  # the wheel's copy, else the checkout's
_FILE_NAME = re.compile(r"^(\d+)_([A-Za-z0-9_\-]+)\.sql$")
_TIMESTAMP_COLUMN = re.compile(r"(_at|timestamp)$")

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS __engine_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at INTEGER NOT NULL
)"""


# The rows of the two pragmas that describe a table's shape, as SQLite documents them (APSW
# types every column as any SQLite value).
_ColumnInfo: TypeAlias = tuple[int, str, str, int, str | None, int]
"""PRAGMA table_info: cid, name, declared type, notnull, default (SQL text or None), pk position."""
_IndexInfo: TypeAlias = tuple[int, str, int, str, int]
"""PRAGMA index_list: seq, name, unique, origin ('c', 'u' or 'pk'), partial."""
_Shape: TypeAlias = tuple[list[_ColumnInfo], list[_IndexInfo]]


class Migration(msgspec.Struct, frozen=True):
    version: int
    name: str
    sql: str


def discover(directory: str | os.PathLike[str]) -> list[Migration]:
    """The migrations in `directory`, ordered by version.

    Raises:
        SchemaError: the folder is missing, a `.sql` file is misnamed, or two share a version.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise SchemaError(f"migrations folder {folder} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise SchemaError(f"migration file {path.name} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise SchemaError(f"two migrations have version {version}: {found[version].name} and {path.stem}")
        found[version] = Migration(version, path.stem, path.read_text())
    return [found[v] for v in sorted(found)]


def applied_version(connection: apsw.Connection) -> int:
    """The highest migration version recorded in the database (0 for a fresh one)."""
    exists = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '__engine_migrations'"
    ).fetchall()
    if not exists:
        return 0
    version = connection.execute("SELECT coalesce(max(version), 0) FROM __engine_migrations").fetchall()[0][0]
    return cast(int, version)  # an INTEGER PRIMARY KEY, or the 0 of coalesce


def crr_tables(connection: apsw.Connection) -> list[str]:
    """Names of the tables that are CRRs, sorted."""
    return _names(
        connection,
        "SELECT substr(name, 1, length(name) - 13) FROM sqlite_master "
        "WHERE type = 'table' AND name LIKE '%\\_\\_crsql\\_clock' ESCAPE '\\' ORDER BY 1",
    )


def migrate(connection: apsw.Connection, migrations: list[Migration], now_ms: int, *, path: str = "") -> int:
    """Apply the migrations the database lacks; return the schema version reached.

    Each migration takes the write lock (BEGIN IMMEDIATE) and re-reads the applied version
    inside it, so two processes opening a fresh file at once apply each migration once.

    Raises:
        SchemaError: the database is newer than `migrations`, or a migration breaks a CRR rule
            (the migration is rolled back; earlier ones stay applied).
    """
    known = migrations[-1].version if migrations else 0
    current = applied_version(connection)
    if current > known:
        raise SchemaError(
            f"database {path or '(memory)'} is at schema version {current}, newer than this code "
            f"knows (latest migration {known}); upgrade the engine before opening it"
        )
    for migration in migrations:
        if migration.version <= current:
            continue
        current = _apply(connection, migration, now_ms)
    return current


def _apply(connection: apsw.Connection, migration: Migration, now_ms: int) -> int:
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(_BOOKKEEPING)
        already = applied_version(connection)
        if already >= migration.version:  # another connection applied it while we waited
            connection.execute("COMMIT")
            return already
        before_tables = set(_user_tables(connection))
        before_crrs = set(crr_tables(connection))
        shapes = {table: _shape(connection, table) for table in before_crrs}
        _run_script(connection, migration)
        _check_altered(connection, migration, shapes)
        new_tables = [t for t in _user_tables(connection) if t not in before_tables]
        dropped = before_crrs - set(_user_tables(connection))
        if dropped:
            raise SchemaError(
                f"migration {migration.name} drops CRR table {sorted(dropped)[0]}; CRR tables are never dropped",
                table=sorted(dropped)[0],
            )
        for table in new_tables:
            check_crr_compatible(connection, table)
            connection.execute("SELECT crsql_as_crr(?)", (table,)).fetchall()
        connection.execute(
            "INSERT INTO __engine_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, now_ms),
        )
        connection.execute("COMMIT")
        return migration.version
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _shape(connection: apsw.Connection, table: str) -> _Shape:
    """What an ALTER can change about a table: its columns and its indexes."""
    return _table_info(connection, table), _index_list(connection, table)


def _check_altered(connection: apsw.Connection, migration: Migration, shapes: dict[str, _Shape]) -> None:
    """Refuse a migration that changed a CRR table's columns outside crsql_begin_alter /
    crsql_commit_alter (cr-sqlite's triggers would silently stop replicating the new
    columns), and re-check the CRR rules of every CRR table it touched.

    Raises:
        SchemaError: naming the table (and the offending column or index).
    """
    for table, before in shapes.items():
        if table not in _user_tables(connection):
            continue  # dropped: reported by the caller
        after = _shape(connection, table)
        if after == before:
            continue
        if after[0] != before[0]:
            for function in ("crsql_begin_alter", "crsql_commit_alter"):
                if not re.search(rf"{function}\(\s*'{re.escape(table)}'\s*\)", migration.sql):
                    raise SchemaError(
                        f"migration {migration.name} alters CRR table {table} without "
                        f"SELECT {function}('{table}'): wrap the ALTER between crsql_begin_alter "
                        f"and crsql_commit_alter",
                        table=table,
                    )
        check_crr_compatible(connection, table)


def _run_script(connection: apsw.Connection, migration: Migration) -> None:
    try:
        for _ in connection.execute(migration.sql):
            pass
    except apsw.Error as error:
        raise SchemaError(f"migration {migration.name} failed: {error}") from error


def _user_tables(connection: apsw.Connection) -> list[str]:
    return _names(
        connection,
        "SELECT name FROM sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_\\_%' ESCAPE '\\' "
        "AND name NOT LIKE 'crsql\\_%' ESCAPE '\\' AND name NOT LIKE '%\\_\\_crsql\\_%' ESCAPE '\\' "
        "ORDER BY name",
    )


def _names(connection: apsw.Connection, sql: str) -> list[str]:
    """The single text column of `sql`'s rows (table names read from sqlite_master)."""
    return [cast(str, name) for (name,) in connection.execute(sql).fetchall()]


def _table_info(connection: apsw.Connection, table: str) -> list[_ColumnInfo]:
    return cast("list[_ColumnInfo]", connection.execute(f'PRAGMA table_info("{table}")').fetchall())


def _index_list(connection: apsw.Connection, table: str) -> list[_IndexInfo]:
    return cast("list[_IndexInfo]", connection.execute(f'PRAGMA index_list("{table}")').fetchall())


def check_crr_compatible(connection: apsw.Connection, table: str) -> None:
    """Check the CRR rules of DESIGN.md §5 for `table` before `crsql_as_crr` sees it.

    Raises:
        SchemaError: naming the table and the offending column or index.
    """
    sql = cast(str, connection.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchall()[0][0])
    if re.search(r"\bAUTOINCREMENT\b", sql, re.IGNORECASE):
        raise SchemaError(f"table {table}: AUTOINCREMENT is not allowed in a CRR", table=table)
    columns = _table_info(connection, table)
    pk_columns = [c for c in columns if c[5]]
    if not pk_columns:
        raise SchemaError(f"table {table}: a CRR needs an explicit primary key", table=table)
    for _cid, name, decl_type, notnull, default, pk in columns:
        if pk and not notnull:
            raise SchemaError(
                f"table {table}: primary key column {name} must be NOT NULL", table=table, column=name
            )
        if not pk and notnull and default is None:
            raise SchemaError(
                f"table {table}: column {name} is NOT NULL without a DEFAULT", table=table, column=name
            )
        if _TIMESTAMP_COLUMN.search(name) and decl_type.upper() != "INTEGER":
            raise SchemaError(
                f"table {table}: timestamp column {name} must be INTEGER milliseconds, not {decl_type or 'untyped'}",
                table=table,
                column=name,
            )
    for _seq, index, unique, origin, _partial in _index_list(connection, table):
        if unique and origin != "pk":
            raise SchemaError(
                f"table {table}: unique index {index} is not allowed besides the primary key "
                f"(use a deterministic id instead)",
                table=table,
                index=index,
            )
