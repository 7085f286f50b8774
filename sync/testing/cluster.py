"""`Cluster`: n replicas of one schema in temp files, a simulated network, and a recorded schedule.

    with Cluster(3, schema_dir="migrations", seed=7) as cluster:
        cluster.write(0, "INSERT INTO notes (id, body) VALUES (?, ?)", ("n1", "hi"))
        cluster.partition([[0, 1], [2]])
        cluster.sync_all()                 # rounds only inside each group
        cluster.heal()
        cluster.sync_all()
        cluster.assert_converged()         # names the first differing table, row and column

Reproducibility: everything random comes from `seed` — the network's faults and the
replicas' cr-sqlite site ids (derived from the seed, so ties that cr-sqlite breaks by site
id break the same way on every replay) — and the clock is a `ManualClock` unless one is
given. The same seed and the same calls give the same schedule text and the same final
tables. Every action taken through the cluster is a line of `cluster.schedule`; writes
made directly on `cluster.replica(i)` work but are not recorded.

Replicas are opened with `Database.open(..., migrations=schema_dir)`. To keep clusters
cheap (Hypothesis opens one per example) the migrations run once per process into a
template file per site id that each replica copies before `Database.open`, and replicas run
with `PRAGMA synchronous = OFF`: a test cluster does not survive power loss, and fsyncs
were most of the cost of opening and closing one. A restart still closes the file and
reopens it from disk.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.clock import Clock, ManualClock
from engine.database import Database, Row, close_connection, connect
from engine.migrations import DEFAULT_MIGRATIONS_DIR
from sync.changes import Limits
from sync.errors import InvalidChangeError, MessageTooLargeError, ProtocolError, TransportError
from sync.peer import Peer
from sync.session import Role

from .diff import ConvergenceError, Difference, first_difference, rows, snapshot
from .network import Disconnect, Faults, Link, MessageFault, Network, Round

__all__ = ["Cluster", "NotQuiescentError", "START_MS", "SITE_SLOTS", "last_opened", "forget_last_opened"]

START_MS = 1_700_000_000_000
"""Where a cluster's default ManualClock starts (2023-11-14, integer milliseconds)."""


class NotQuiescentError(AssertionError):
    """`sync_all()` hit its round budget before every connected pair was in sync."""


# -- templates: migrate once per schema, copy per replica ------------------------------

SITE_SLOTS = 16
"""Site ids a cluster draws its replicas' from (more when a cluster has more replicas)."""

_templates: dict[tuple[Any, ...], Path] = {}
_templates_lock = threading.Lock()
_template_dir: tempfile.TemporaryDirectory[str] | None = None


def _template(folder: Path, extension: str | None, clock: Clock, slot: int) -> Path:
    """A migrated, never-written replica file for `folder` whose site id is that of `slot`,
    made once per process (migrating costs far more than copying a file).

    The key holds each .sql file's name, size and mtime, so an edited migration makes a
    new template.
    """
    global _template_dir
    files = sorted(folder.glob("*.sql"))
    key = (str(folder), extension, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    with _templates_lock:
        if _template_dir is None:
            _template_dir = tempfile.TemporaryDirectory(prefix="sync-templates-")
        if key not in _templates:
            path = Path(_template_dir.name) / f"schema-{len(_templates)}.db"
            Database.open(path, clock=clock, migrations=folder, extension=extension).close()
            _templates[key] = path
        if key + (slot,) not in _templates:
            path = _templates[key].with_name(f"{_templates[key].stem}-site-{slot}.db")
            shutil.copyfile(_templates[key], path)
            _set_site_id(path, extension, _site_id(slot))
            _templates[key + (slot,)] = path
        return _templates[key + (slot,)]


def _set_site_id(path: Path, extension: str | None, site_id: bytes) -> None:
    """Give a never-written replica file another cr-sqlite site id (read at connection open)."""
    connection = connect(str(path), extension)
    try:
        connection.execute("UPDATE crsql_site_id SET site_id = ? WHERE ordinal = 0", (site_id,)).fetchall()
    finally:
        close_connection(connection)


def _site_id(slot: int) -> bytes:
    return hashlib.sha256(f"sync.testing:site:{slot}".encode()).digest()[:16]


def _describe_op(op: Any) -> str:
    name: str | None = getattr(op, "__qualname__", None)
    if name is not None and not isinstance(op, type) and hasattr(op, "__code__"):
        return name  # a function: its name reads better than its repr
    return repr(op)


# -- the cluster --------------------------------------------------------------------------

_last_opened: "Cluster | None" = None


def last_opened() -> "Cluster | None":
    """The cluster most recently opened in this process (the pytest plugin reports it)."""
    return _last_opened


def forget_last_opened() -> None:
    global _last_opened
    _last_opened = None


class Cluster:
    """n replicas of one schema, a simulated network between them, and the schedule of it all.

    Args:
        n: how many replicas (indices 0..n-1).
        schema_dir: a folder of NNNN_name.sql migrations; the project's own by default.
        seed: drives the network's random faults and the replicas' site ids.
        clock: a Clock shared by all replicas (a ManualClock at START_MS by default), or a
            sequence of n clocks, one per replica ("each replica its own clock").
        faults: random network faults for every round (none by default); see `set_faults`.
        limits: page bounds of every replica's Peer (sync.changes.Limits).
        directory: where the replica files go; a temp folder removed on close by default.
        extension: the cr-sqlite library (engine.database.extension_path decides by default).
        setup: `setup(index, db, peer)` runs each time a replica opens, restarts included —
            e.g. to register after-apply hooks, which live on the Database object.

    Raises:
        ValueError: n < 1, a clock sequence of another length, or `directory` already holds
            replica files.
        SchemaError: the migrations are missing or break a CRR rule.
    """

    def __init__(self, n: int = 3, *, schema_dir: str | Path | None = None, seed: int = 0,
                 clock: Clock | Sequence[Clock] | None = None, faults: Faults | None = None,
                 limits: Limits | None = None, directory: str | Path | None = None,
                 extension: str | None = None, setup: Callable[[int, Database, Peer], Any] | None = None):
        global _last_opened
        if n < 1:
            raise ValueError(f"a cluster needs at least one replica, not {n}")
        self.n = n
        self.seed = seed
        self.schema_dir = Path(schema_dir).resolve() if schema_dir is not None else DEFAULT_MIGRATIONS_DIR
        self.clocks: list[Clock] = _clocks(clock, n)
        self.setup = setup
        self.limits = limits or Limits()
        self.extension = extension
        self.network = Network(random.Random(seed), faults)
        self._own_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="sync-cluster-") if directory is None else directory)
        self._log: list[str] = []
        self._indent = ""
        self._dbs: list[Database] = []
        self._peers: list[Peer] = []
        self._clean: dict[tuple[int, int], tuple[int, int]] = {}
        self._closed = False
        self.last_round: Round | None = None
        _last_opened = self
        # the seed picks the site ids (their order breaks some cr-sqlite ties), apart from the
        # network's generator so that either can change without moving the other
        slots = random.Random(f"sites:{seed}").sample(range(max(SITE_SLOTS, n)), n)
        try:
            for index in range(n):
                self._dbs.append(self._create(index, slots[index]))
                self._peers.append(self._peer(index))
        except BaseException:
            self.close()
            raise
        extra = f", faults {faults!r}" if faults is not None else ""
        self._record(f"open {n} replicas on {self.schema_dir.name}/ (seed {seed}{extra})")

    def _path(self, index: int) -> Path:
        return self.directory / f"r{index}.db"

    def _create(self, index: int, slot: int) -> Database:
        path = self._path(index)
        if path.exists():
            raise ValueError(f"{path} already exists: give each cluster its own directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template(self.schema_dir, self.extension, self.clocks[index], slot), path)
        return self._open(index)

    def _open(self, index: int) -> Database:
        db = Database.open(self._path(index), clock=self.clocks[index], extension=self.extension,
                           migrations=self.schema_dir)
        # test replicas: no fsync (see the module docstring); a pragma, outside any transaction
        db.connection.execute("PRAGMA synchronous = OFF").fetchall()
        return db

    def _peer(self, index: int) -> Peer:
        peer = Peer(self._dbs[index], limits=self.limits)
        if self.setup is not None:
            self.setup(index, self._dbs[index], peer)
        return peer

    # -- reaching the replicas -------------------------------------------------------------

    def replica(self, index: int) -> Database:
        """The Database of replica `index` (a new object after `restart(index)`).

        Raises:
            IndexError: no such replica.
        """
        self._check(index)
        return self._dbs[index]

    def peer(self, index: int) -> Peer:
        """The sync.Peer of replica `index`."""
        self._check(index)
        return self._peers[index]

    @property
    def replicas(self) -> list[Database]:
        return list(self._dbs)

    def _check(self, *indices: int) -> None:
        if self._closed:
            raise RuntimeError("the cluster is closed")
        for index in indices:
            if not (isinstance(index, int) and 0 <= index < self.n):
                raise IndexError(f"replica {index!r} does not exist; the cluster has replicas 0..{self.n - 1}")

    # -- operations (recorded) --------------------------------------------------------------

    def write(self, index: int, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one SQL statement in its own transaction on replica `index`.

        Raises:
            apsw.Error: the statement failed (recorded, then raised).
        """
        self.apply(index, lambda db: _execute(db, sql, params), label=f"{sql} {tuple(params)!r}" if params else sql)

    def apply(self, index: int, op: Callable[[Database], Any], *, label: str | None = None) -> Any:
        """Call `op(db)` on replica `index` and record it (as `label`, else the op's repr).

        Returns what `op` returns.

        Raises:
            Whatever `op` raises (recorded first).
        """
        db = self.replica(index)
        text = f"r{index}: {label or _describe_op(op)}"
        try:
            result = op(db)
        except Exception as error:
            self._record(f"{text} -> raised {type(error).__name__}: {error}")
            raise
        self._record(text)
        return result

    def note(self, text: str) -> None:
        """Add a line of your own to the schedule."""
        self._record(f"note: {text}")

    def query(self, index: int, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of a read-only query on replica `index` (not recorded)."""
        with self.replica(index).reading() as s:
            return s.execute(sql, tuple(params))

    def state(self, index: int, tables: Sequence[str] | None = None) -> dict[str, list[Row]]:
        """Every CRR table of replica `index` (or only `tables`): rows ordered by primary key."""
        return rows(self.replica(index), tables)

    @property
    def clock(self) -> Clock:
        """The clock all replicas share.

        Raises:
            TypeError: each replica has its own clock (see `clocks`).
        """
        if any(c is not self.clocks[0] for c in self.clocks):
            raise TypeError("the replicas have clocks of their own: use cluster.clocks[i]")
        return self.clocks[0]

    def advance(self, ms: int, replica: int | None = None) -> None:
        """Move the ManualClock of `replica` (every clock by default) forward `ms` milliseconds.

        Raises:
            TypeError: that clock cannot be advanced.
        """
        if replica is not None:
            self._check(replica)
        chosen = self.clocks if replica is None else [self.clocks[replica]]
        for clock in {id(c): c for c in chosen}.values():
            if not hasattr(clock, "advance"):
                raise TypeError(f"the clock {type(clock).__name__} has no advance()")
            clock.advance(ms)
        self._record(f"clock +{ms} ms" if replica is None else f"clock of r{replica} +{ms} ms")

    def restart(self, index: int) -> Database:
        """Close replica `index` and reopen it from its file; returns the new Database.

        After-apply hooks registered on the old Database/Peer are gone with it.
        """
        self._check(index)
        self._dbs[index].close()
        self._dbs[index] = self._open(index)
        self._peers[index] = self._peer(index)
        self._record(f"restart r{index}")
        return self._dbs[index]

    # -- the network ----------------------------------------------------------------------

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Split the network: only replicas in one group reach each other (unlisted ones are alone).

        Raises:
            ValueError: an unknown index or one listed twice.
        """
        full = self.network.partition(groups, self.n)
        self._record(f"partition {full}")

    def heal(self) -> None:
        """Every replica can reach every other again."""
        self.network.heal()
        self._record("heal")

    def set_faults(self, faults: Faults | None) -> None:
        """Random faults for the following rounds (None: a perfect network)."""
        self.network.faults = faults
        self._record(f"faults {faults!r}")

    def sync(self, a: int, b: int, *, faults: Sequence[MessageFault | Disconnect] = (),
             random_faults: bool = True) -> Round:
        """One bidirectional round, replica `a` the client and `b` the server, through the network.

        `faults` are explicit faults for this round (by message index); the cluster's random
        faults apply too unless `random_faults` is false. A round that fails because of the
        network (partition, loss, duplicate, reorder, delay, disconnect) is returned with
        `ok` false and its error; the next round resumes from the watermarks.

        Raises:
            SyncError: the round failed and the network is not to blame (a refusal, an
                invalid change, a merge error, a stall on a perfect network): a bug.
            ValueError: a == b.
        """
        self._check(a, b)
        if a == b:
            raise ValueError(f"a replica cannot sync with itself (r{a})")
        if not self.network.connected(a, b):
            rnd = self.network.blocked(a, b)
        else:
            client = self._peers[a].session(Role.CLIENT)
            server = self._peers[b].session(Role.SERVER)
            try:
                rnd = self.network.run(client, server, (a, b), faults=faults, random_faults=random_faults)
            finally:
                client.close()
                server.close()
        self._record(rnd.describe())
        self.last_round = rnd
        pair = _key((a, b))
        if rnd.ok and rnd.moved == 0:
            self._clean[pair] = self._versions(pair)
        else:
            self._clean.pop(pair, None)
        if not rnd.ok and not _network_failure(rnd):
            raise rnd.error
        return rnd

    def connect(self, a: int, b: int, *, live: bool = False, faults: Sequence[MessageFault | Disconnect] = (),
                random_faults: bool = True) -> Link:
        """A connection, replica `a` the client and `b` the server, that the caller drives:
        `link.deliver(limit)` a few messages at a time (to act mid-round), or in live mode
        (`live=True`) `link.notify()` after writes. Close it (or use `with`); its outcome is
        then recorded in the schedule.

        Raises:
            TransportError: the partition separates `a` and `b`.
            ValueError: a == b.
        """
        self._check(a, b)
        if a == b:
            raise ValueError(f"a replica cannot connect to itself (r{a})")
        if not self.network.connected(a, b):
            self._record(f"connect r{a}->r{b}: blocked by the partition")
            raise self.network.blocked(a, b).error
        client = self._peers[a].session(Role.CLIENT, live=live)
        server = self._peers[b].session(Role.SERVER)
        self._record(f"connect r{a}->r{b}" + (" (live)" if live else ""))
        link = self.network.link(client, server, (a, b), faults=faults, random_faults=random_faults)
        link.on_close = lambda done: self._record("closed " + done.outcome().describe())
        return link.start()

    def sync_all(self, *, faults: bool = True, max_rounds: int | None = None,
                 pairs: Sequence[tuple[int, int]] | None = None) -> list[Round]:
        """Rounds between connected pairs until quiescent: every connected pair has had a
        complete round that moved nothing, and neither side changed since. Returns the rounds.

        `faults=False` syncs over a perfect network (explicit faults never apply here).
        `pairs` limits the rounds to these (client, server) pairs — a topology such as a line
        [(0, 1), (1, 2)] that partition groups cannot express; the partition still applies.

        Raises:
            NotQuiescentError: still not quiescent after `max_rounds` rounds (default 50 per
                connected pair): faults too heavy, or changes that never settle.
            SyncError: as `sync`.
        """
        pairs_given = pairs is not None
        if pairs is None:
            pairs = [(a, b) for a in range(self.n) for b in range(a + 1, self.n)]
        else:
            for a, b in pairs:
                self._check(a, b)
        pairs = [(a, b) for a, b in pairs if a != b and self.network.connected(a, b)]
        budget = max_rounds if max_rounds is not None else 50 * max(1, len(pairs))
        how = ("" if faults else " (perfect network)") + (f" over {[list(p) for p in pairs]}" if pairs_given else "")
        self._record(f"sync_all{how}:")
        rounds: list[Round] = []
        self._indent = "  "
        try:
            self._settle(pairs, rounds, budget, faults)
        finally:
            self._indent = ""
        moved = sum(r.moved for r in rounds)
        self._record(f"sync_all: quiescent after {len(rounds)} rounds ({moved} changes moved)")
        return rounds

    def _settle(self, pairs: list[tuple[int, int]], rounds: list[Round], budget: int, faults: bool) -> None:
        while dirty := [p for p in pairs if self._clean.get(_key(p)) != self._versions(_key(p))]:
            for a, b in dirty:
                if len(rounds) >= budget:
                    raise NotQuiescentError(
                        f"sync_all is not quiescent after {len(rounds)} rounds; pairs still out of sync: "
                        f"{dirty} (seed {self.seed}); last round: {rounds[-1].describe() if rounds else 'none'}")
                rounds.append(self.sync(a, b, random_faults=faults))

    def _versions(self, pair: tuple[int, int]) -> tuple[int, int]:
        return self._dbs[pair[0]].db_version, self._dbs[pair[1]].db_version

    # -- checks ------------------------------------------------------------------------------

    def diff(self, replicas: Iterable[int] | None = None, tables: Sequence[str] | None = None) -> Difference | None:
        """The first difference between the replicas' CRR tables (all replicas by default), or None."""
        indices = list(range(self.n)) if replicas is None else list(replicas)
        self._check(*indices)
        return first_difference([snapshot(self._dbs[i], tables) for i in indices], indices)

    def assert_converged(self, replicas: Iterable[int] | None = None, tables: Sequence[str] | None = None) -> None:
        """Assert that the replicas (all by default) hold identical CRR tables.

        Raises:
            ConvergenceError: (an AssertionError) naming the first differing table, row
                (primary key) and column, with each replica's value.
        """
        indices = list(range(self.n)) if replicas is None else list(replicas)
        difference = self.diff(indices, tables)
        who = ",".join(f"r{i}" for i in indices)
        if difference is not None:
            self._record(f"assert_converged {who}: FAILED at {difference.table} {difference.pk} {difference.column or ''}")
            raise ConvergenceError(difference, f"cluster seed {self.seed}; schedule ({len(self._log)} steps):\n"
                                   + self.schedule_text(last=30))
        self._record(f"assert_converged {who}: ok")

    def converge(self) -> None:
        """Heal, sync everything over a perfect network, and assert convergence."""
        self.heal()
        self.sync_all(faults=False)
        self.assert_converged()

    # -- the schedule -----------------------------------------------------------------------

    @property
    def schedule(self) -> tuple[str, ...]:
        """Everything done through the cluster, one readable line per action."""
        return tuple(self._log)

    def schedule_text(self, last: int | None = None) -> str:
        """The schedule as numbered lines (only the `last` ones if given)."""
        start = 0 if last is None else max(0, len(self._log) - last)
        lines = [f"{i + 1:>4}. {line}" for i, line in enumerate(self._log[start:], start)]
        if start:
            lines.insert(0, f"      ... {start} earlier steps")
        return "\n".join(lines)

    def _record(self, line: str) -> None:
        self._log.append(self._indent + line)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every replica and remove the temp folder (if the cluster made it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for db in self._dbs:
            try:
                db.close()
            except Exception as error:  # close the others anyway
                errors.append(error)
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise errors[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Database]:
        return iter(list(self._dbs))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"<Cluster n={self.n} seed={self.seed} schema={self.schema_dir.name}/ steps={len(self._log)}>"


def _key(pair: tuple[int, int]) -> tuple[int, int]:
    """A pair's key for "in sync" bookkeeping: the direction of a round does not matter."""
    a, b = pair
    return (a, b) if a < b else (b, a)


def _clocks(clock: Clock | Sequence[Clock] | None, n: int) -> list[Clock]:
    if clock is None:
        clock = ManualClock(START_MS)
    if not isinstance(clock, Sequence):
        return [clock] * n
    if len(clock) != n:
        raise ValueError(f"{len(clock)} clocks for {n} replicas")
    return list(clock)


def _execute(db: Database, sql: str, params: Sequence[Any]) -> None:
    with db.transaction() as tx:
        tx.execute(sql, tuple(params))


def _network_failure(rnd: Round) -> bool:
    """Whether the network can explain the failure: it interfered, and the error is one a lost,
    repeated, late or reordered message produces (not an invalid change or a merge error)."""
    if not rnd.faulted:
        return False
    error = rnd.error
    if isinstance(error, TransportError):
        return True
    return isinstance(error, ProtocolError) and not isinstance(error, (InvalidChangeError, MessageTooLargeError))
