"""`python -m engine doctor app.db`: what a replica file holds and whether the engine can use it.

    diagnosis = diagnose("app.db")
    for line in diagnosis.lines():
        print(line)
    if not diagnosis.ok:
        print("; ".join(diagnosis.problems))

A diagnosis is a list of facts (a label and a value); a fact that is wrong also carries the
problem, worded to say how to fix it. The doctor only looks: a missing file is not created
and a database behind the code is not migrated (the migrations run on the next
`Database.open`). Opening it with cr-sqlite does what any open does (WAL mode, cr-sqlite's
own bookkeeping), which is why a file that is not yet a cr-sqlite database is reported, not
opened.

The engine knows nothing of sync: `crdt-sync doctor` adds the peers and their watermarks
through `sections=` (functions of the opened database that return more facts).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TextIO

import apsw
import msgspec

from . import migrations as _migrations
from .clock import SystemClock
from .database import Database, connect, extension_path
from .errors import EngineError, ExtensionNotFoundError

__all__ = ["Fact", "Diagnosis", "Section", "diagnose", "write_diagnosis"]

_SQLITE_HEADER = b"SQLite format 3\x00"


class Fact(msgspec.Struct, frozen=True):
    label: str
    value: str
    problem: str = ""  # empty when all is well; otherwise what is wrong and how to fix it


class Diagnosis(msgspec.Struct, frozen=True):
    path: str
    facts: tuple[Fact, ...]

    @property
    def problems(self) -> list[str]:
        return [fact.problem for fact in self.facts if fact.problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One aligned `label: value` line per fact (a problem replaces the value)."""
        width = max((len(fact.label) for fact in self.facts), default=0) + 2
        return [
            f"{fact.label + ':':<{width}}{'PROBLEM: ' + fact.problem if fact.problem else fact.value}"
            for fact in self.facts
        ]


Section = Callable[[Database], Iterable[Fact]]


def diagnose(
    path: str | os.PathLike[str],
    *,
    extension: str | os.PathLike[str] | None = None,
    migrations: str | os.PathLike[str] | None = None,
    sections: Sequence[Section] = (),
) -> Diagnosis:
    """The facts about the replica at `path`; stops at the first problem that hides the rest
    (a missing file, no extension). `migrations` is the folder the code would apply (the
    engine's own by default); `sections` add facts once the database is open.

    Never raises for the file's or the extension's state: that is what the diagnosis reports.
    """
    path = str(path)
    facts: list[Fact] = []
    if _check_file(path, facts) and _check_plain(path, facts):
        _check_replica(path, extension, migrations, sections, facts)
    return Diagnosis(path, tuple(facts))


def write_diagnosis(diagnosis: Diagnosis, prog: str, out: TextIO, err: TextIO) -> int:
    """Print the facts on `out` and the problems, if any, as one line on `err` (`prog: error:
    ...`); return the exit code: 0 when all is well, else 1."""
    for line in diagnosis.lines():
        print(line, file=out)
    if diagnosis.ok:
        return 0
    print(f"{prog}: error: {'; '.join(' '.join(p.split()) for p in diagnosis.problems)}", file=err)
    return 1


def _check_file(path: str, facts: list[Fact]) -> bool:
    """The file exists, is readable and is an SQLite database; its size and its WAL's."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as error:
        facts.append(Fact("database", path, f"cannot read {path}: {error.strerror or error}"))
        return False
    if header != _SQLITE_HEADER:
        facts.append(Fact("database", path, f"{path} is not an SQLite database"))
        return False
    facts.append(Fact("database", path))
    wal = Path(path + "-wal")
    facts.append(Fact("file size", f"{file.stat().st_size:,} bytes"))
    facts.append(Fact("WAL size", f"{wal.stat().st_size:,} bytes" if wal.is_file() else "no WAL file"))
    return True


def _check_plain(path: str, facts: list[Fact]) -> bool:
    """Without cr-sqlite, read-only: the file's integrity and whether it is a cr-sqlite replica
    (loading the extension into a plain SQLite file would turn it into one)."""
    try:
        connection = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as error:
        facts.append(Fact("integrity", "?", f"SQLite cannot open {path}: {error}"))
        return False
    try:
        check = [row[0] for row in connection.execute("PRAGMA quick_check").fetchall()]
        is_replica = bool(connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'crsql_site_id'"
        ).fetchall()[0][0])
    except apsw.Error as error:
        facts.append(Fact("integrity", "?", f"SQLite cannot read {path}: {error}"))
        return False
    finally:
        connection.close()
    facts.append(Fact("integrity", "ok") if check == ["ok"] else
                 Fact("integrity", "failed", f"PRAGMA quick_check failed: {check[0]}"))
    if not is_replica:
        facts.append(Fact("replica", "no", f"{path} is an SQLite database but not a cr-sqlite replica "
                                           f"(no crsql_site_id table); Database.open() makes it one"))
        return False
    return True


def _check_replica(path: str, extension: str | os.PathLike[str] | None, migrations: str | os.PathLike[str] | None,
                   sections: Sequence[Section], facts: list[Fact]) -> None:
    """Load cr-sqlite and read the replica's facts, then the extra sections'."""
    try:
        library = extension_path(extension)
    except ExtensionNotFoundError as error:  # its message says how to get one
        facts.append(Fact("extension", error.path, str(error)))
        return
    try:
        connection = connect(path, library)
    except apsw.ExtensionLoadingError as error:
        facts.append(Fact("extension", library, f"cr-sqlite cannot be loaded from {library}: {error}"))
        return
    except apsw.Error as error:
        facts.append(Fact("extension", library, f"{path} cannot be opened with cr-sqlite: {error}"))
        return
    facts.append(Fact("extension", library))
    db = Database(connection, path=path, clock=SystemClock(), extension=library)
    try:
        facts.extend(_replica_facts(db, migrations))
        for section in sections:
            facts.extend(section(db))
    except (apsw.Error, EngineError) as error:
        facts.append(Fact("reading", "failed", f"reading {path} failed: {error}"))
    finally:
        db.close()


def _replica_facts(db: Database, migrations: str | os.PathLike[str] | None) -> list[Fact]:
    with db.reading() as s:
        version = s.scalar("SELECT crsql_sha()")
        sqlite = s.scalar("SELECT sqlite_version()")
        has_conflicts = s.scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'conflicts'")
    tables = db.crr_tables
    facts = [
        Fact("cr-sqlite", f"{version} loaded (SQLite {sqlite})"),
        Fact("site id", db.site_id),
        Fact("db_version", str(db.db_version)),
        _schema_fact(db.schema_version, migrations, db.schema_fingerprint),
        Fact("CRR tables", f"{len(tables)}: {', '.join(tables)}" if tables else "none"),
    ]
    if has_conflicts:
        facts.append(Fact("open conflicts", str(len(db.conflicts.list(status="open")))))
    return facts


def _schema_fact(applied: int, migrations: str | os.PathLike[str] | None, fingerprint: str) -> Fact:
    """The applied schema version against the latest the code knows."""
    try:
        known = _migrations.discover(Path(migrations) if migrations else _migrations.DEFAULT_MIGRATIONS_DIR)
    except EngineError as error:
        return Fact("schema version", str(applied), str(error))
    latest = known[-1].version if known else 0
    value = f"{applied} (fingerprint {fingerprint}); the code's latest is {latest}"
    if applied > latest:
        return Fact("schema version", value, f"the database is at schema version {applied}, newer than "
                                             f"this code (latest migration {latest}); upgrade the engine")
    if applied < latest:
        value += f": {latest - applied} migration(s) will be applied on the next open"
    return Fact("schema version", value)
