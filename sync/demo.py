"""`make demo`: three replicas, three processes, live sync, a partition, a heal, and a proof.

    python -m sync.demo [--data-dir DIR] [--keep]

What happens (each step printed):
  0. each replica gets its Ed25519 key pair; A trusts B's and C's keys (read-write), B and C
     expect A's key; A gets a self-signed TLS certificate that B and C pin;
  1. replica A serves wss:// on a free loopback port, admitting trusted keys only; B and C
     connect to it as live clients (a hub; B's writes reach C through A, a relay), each
     proving its key and checking A's; a stranger with an untrusted key is refused;
  2. all three write through the stores (topics, events, handler state) and converge live;
  3. commit-to-visible latency B -> A -> C is sampled;
  4. C is cut off (its live client closed) and keeps writing; A and B write too, including a
     concurrent update of the same handler-state row;
  5. C reconnects and catches up from its watermarks;
  6. every process stops; this process reopens the three files and prints per-table row
     checksums of every CRR table, and how many changes moved. Exit status 0 only if the three
     databases are identical.

The replicas are this same module run as `python -m sync.demo --replica NAME ...`: a small loop
reading one JSON command per line on stdin and answering one JSON line on stdout (see
`_ReplicaLoop`). Their logs go to NAME.log in the data directory.

The demo is the roof: it may use the stores and sync together.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

import msgspec

from engine import Database

from .errors import PeerRefusedError, UnknownPeerError
from .identity import load_identity
from .peer import Peer
from .tls import client_context, server_context, write_self_signed
from .trust import trust_peer

if TYPE_CHECKING:
    from .websocket import LiveClient, SyncServer

__all__ = ["main", "table_checksums", "TableChecksum"]

WORKFLOW = "demo-workflow"
TOPICS = ("orders", "invoices")
SHARED_STATE = "shared-handler"
REPLY_TIMEOUT_S = 20.0
CONVERGE_TIMEOUT_S = 20.0
LATENCY_SAMPLES = 40

log = logging.getLogger("sync.demo")

_Json = dict[str, Any]
"""One command or answer of the replica processes: a JSON object."""


# -- the proof: row checksums --------------------------------------------------------------


class TableChecksum(msgspec.Struct, frozen=True):
    table: str
    rows: int
    sha256: str


def table_checksums(db: Database) -> list[TableChecksum]:
    """A checksum of every CRR table's rows, independent of row order and of the replica.

    Each row is encoded as MessagePack and hashed; the sorted row hashes are hashed again, so two
    replicas agree exactly when their tables hold the same rows.
    """
    sums = []
    with db.reading() as session:
        for table in db.crr_tables:
            rows = session.execute(f'SELECT * FROM "{table}"')
            digests = sorted(hashlib.sha256(msgspec.msgpack.encode(list(r))).digest() for r in rows)
            sums.append(TableChecksum(table, len(rows), hashlib.sha256(b"".join(digests)).hexdigest()))
    return sums


# -- a replica process ---------------------------------------------------------------------


class _ReplicaLoop:
    """One replica process: owns its database, its server or live client, and answers commands.

    Commands (one JSON object per stdin line, `op` names the method `op_<name>`); each answers one
    JSON line. A failing command answers {"error": "..."} instead of killing the replica.
    """

    def __init__(self, name: str, db: Database, *, serve: bool, url: str | None, tls: "_DemoTls",
                 server_key: str | None):
        self.name, self.db, self.url, self.tls, self.server_key = name, db, url, tls, server_key
        self.server: SyncServer | None = None
        self.client: LiveClient | None = None
        self.serve = serve
        self.written = 0
        self.earlier = {"sent": 0, "received": 0, "applied": 0}  # counters of live clients already closed

    def start(self) -> _Json:
        from . import websocket

        if self.serve:
            self.server = websocket.serve(self.db, "127.0.0.1", 0, require_keys=True,
                                          ssl=server_context(self.tls.cert, self.tls.key))
        if self.url:
            self.op_connect({})
        return {"ready": True, "site_id": self.db.site_id, "url": self.server.url if self.server else None}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.close()

    def run(self, stdin: Iterable[str], stdout: TextIO) -> None:
        """Serve commands until `quit` or end of input (the orchestrator went away)."""
        for line in stdin:
            command = json.loads(line)
            handler: Callable[[_Json], _Json] = getattr(self, "op_" + command["op"])
            try:
                reply = handler(command)
            except Exception as exc:  # one bad command must not kill the replica
                log.exception("command %s failed", command["op"])
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            stdout.write(json.dumps(reply) + "\n")
            stdout.flush()
            if command["op"] == "quit":
                return

    # commands --------------------------------------------------------------------------

    def op_write(self, command: _Json) -> _Json:
        """Publish `count` events (5 per transaction) and record progress in handler state."""
        tag, count = command["tag"], command["count"]
        for start in range(0, count, 5):
            with self.db.transaction() as tx:
                for i in range(start, min(start + 5, count)):
                    topic = TOPICS[i % len(TOPICS)]
                    self.db.topics.get_or_create(WORKFLOW, topic, tx=tx)
                    payload = {"from": self.name, "tag": tag, "n": i}
                    self.db.events.publish(WORKFLOW, topic, f"{self.name}-{tag}-{i}", payload, tx=tx)
                    self.written += 1
                self.db.handler_state.set(WORKFLOW, f"handler-{self.name}", {"written": self.written}, tx=tx)
        if command.get("shared"):
            self.db.handler_state.set(WORKFLOW, SHARED_STATE, {"last_writer": self.name, "tag": tag})
        return {"db_version": self.db.db_version}

    def op_publish_one(self, command: _Json) -> _Json:
        """One event in its own transaction; answers the commit time (monotonic, system-wide)."""
        self.db.events.publish(WORKFLOW, TOPICS[0], command["message_id"], {"probe": True})
        return {"committed_ns": time.monotonic_ns()}

    def op_await(self, command: _Json) -> _Json:
        """Wait until an event with `message_id` is committed here; answer when it was seen.

        Woken by the database's commit listener (the live client applies pages through
        `db.transaction()`), so the measured time is the commit of the merge, not a poll period.
        """
        seen = threading.Event()
        message_id = command["message_id"]

        def check() -> None:
            with self.db.reading() as s:
                if s.scalar("SELECT count(*) FROM events WHERE message_id = ?", (message_id,)):
                    seen.set()

        remove = self.db.on_commit(check)
        try:
            check()
            if not seen.wait(REPLY_TIMEOUT_S):
                return {"error": f"event {message_id} never arrived"}
            return {"seen_ns": time.monotonic_ns()}
        finally:
            remove()

    def op_disconnect(self, command: _Json) -> _Json:
        if self.client is not None:
            self.client.close()
            self.earlier["sent"] += self.client.stats.changes_sent
            self.earlier["received"] += self.client.stats.changes_received
            self.earlier["applied"] += self.client.stats.changes_applied
            self.client = None
        return {"connected": False}

    def op_connect(self, command: _Json) -> _Json:
        from . import websocket

        if self.url is None:
            raise RuntimeError(f"replica {self.name} has no server to connect to")
        self.client = websocket.connect(self.db, self.url, server_key=self.server_key,
                                        ssl=client_context(cafile=self.tls.cert))
        self.client.wait_connected(REPLY_TIMEOUT_S)
        return {"connected": True}

    def op_digest(self, command: _Json) -> _Json:
        return {"digest": {c.table: [c.rows, c.sha256] for c in table_checksums(self.db)}}

    def op_stats(self, command: _Json) -> _Json:
        totals = dict(self.earlier)
        for owner in (self.server, self.client):
            if owner is not None:
                totals["sent"] += owner.stats.changes_sent
                totals["received"] += owner.stats.changes_received
                totals["applied"] += owner.stats.changes_applied
        return {**totals, "db_version": self.db.db_version}

    def op_quit(self, command: _Json) -> _Json:
        reply = self.op_stats(command)
        self.close()
        return reply


def _run_replica(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.replica} %(name)s %(levelname)s %(message)s")
    # The commands' replies own stdout; anything else printed there would corrupt the stream.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    with Database.open(args.db) as db:
        loop = _ReplicaLoop(args.replica, db, serve=args.serve, url=args.connect,
                            tls=_DemoTls(Path(args.db).parent), server_key=args.server_key)
        try:
            out.write(json.dumps(loop.start()) + "\n")
            out.flush()
            loop.run(sys.stdin, out)
        finally:
            loop.close()
    return 0


# -- the orchestrator ----------------------------------------------------------------------


class _Replica:
    """The orchestrator's handle on one replica process (a context manager that reaps it)."""

    def __init__(self, name: str, data_dir: Path, *, serve: bool = False, url: str | None = None,
                 server_key: str | None = None):
        self.name = name
        self.path = data_dir / f"{name}.db"
        self.log_path = data_dir / f"{name}.log"
        argv = [sys.executable, "-m", "sync.demo", "--replica", name, "--db", str(self.path)]
        if serve:
            argv.append("--serve")
        if url:
            argv += ["--connect", url]
        if server_key:
            argv += ["--server-key", server_key]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.process.stdin is not None and self.process.stdout is not None  # both are pipes
        self._stdin: IO[str] = self.process.stdin
        self._stdout: IO[str] = self.process.stdout
        self._replies: queue.Queue[_Json | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"demo-{name}-stdout", daemon=True).start()
        self.info = self.reply()

    def _read(self) -> None:
        for line in self._stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def send(self, op: str, **fields: Any) -> None:
        self._stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self._stdin.flush()

    def reply(self, timeout: float = REPLY_TIMEOUT_S) -> _Json:
        """The next answer of this replica.

        Raises:
            RuntimeError: the replica exited, answered an error, or did not answer in time.
        """
        try:
            answer = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"replica {self.name} did not answer within {timeout}s (see {self.log_path})") from None
        if answer is None:
            raise RuntimeError(f"replica {self.name} exited (see {self.log_path})")
        if "error" in answer:
            raise RuntimeError(f"replica {self.name}: {answer['error']} (see {self.log_path})")
        return answer

    def call(self, op: str, **fields: Any) -> _Json:
        self.send(op, **fields)
        return self.reply()

    def __enter__(self) -> "_Replica":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ask nicely (`quit` was sent by the caller, or end of input); kill after a grace period."""
        if self.process.poll() is None:
            try:
                self._stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _wait_converged(replicas: list[_Replica], timeout: float = CONVERGE_TIMEOUT_S) -> float:
    """Poll the replicas' digests until all agree; returns the seconds it took.

    Raises:
        RuntimeError: they still differ at the deadline.
    """
    start = time.monotonic()
    while True:
        digests = [r.call("digest")["digest"] for r in replicas]
        if all(d == digests[0] for d in digests):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"replicas did not converge within {timeout}s")
        time.sleep(0.02)  # sleep-ok: polling other processes, bounded by the deadline above


def _sample_latency(writer: _Replica, reader: _Replica, samples: int) -> list[float]:
    """Milliseconds from a commit on `writer` to the merge commit on `reader`."""
    latencies = []
    for i in range(samples):
        message_id = f"probe-{writer.name}-{i}-{time.monotonic_ns()}"
        reader.send("await", message_id=message_id)
        time.sleep(0.005)  # sleep-ok: let the reader register its commit listener before the write
        committed = writer.call("publish_one", message_id=message_id)["committed_ns"]
        seen = reader.reply()["seen_ns"]
        latencies.append(max(0, seen - committed) / 1e6)
    return latencies


def _print_proof(replicas: list[_Replica]) -> bool:
    """Reopen every file in this process and print the per-table checksums; True if identical."""
    sums = {}
    for r in replicas:
        with Database.open(r.path) as db:
            sums[r.name] = {c.table: c for c in table_checksums(db)}
    names = [r.name for r in replicas]
    tables = sorted(sums[names[0]])
    identical = True
    print(f"\n{'table':<16}{'rows':>6}  " + "  ".join(f"{n + ' sha256':<18}" for n in names) + "  same")
    for table in tables:
        row = [sums[n][table] for n in names]
        same = all(c == row[0] for c in row)
        identical &= same
        print(f"{table:<16}{row[0].rows:>6}  " + "  ".join(f"{c.sha256[:16]:<18}" for c in row) + f"  {'yes' if same else 'NO'}")
    return identical


class _DemoTls:
    """The hub's self-signed certificate in the data directory (the clients pin it)."""

    def __init__(self, data_dir: Path):
        self.cert, self.key = data_dir / "hub-cert.pem", data_dir / "hub-key.pem"

    def create(self) -> None:
        write_self_signed(self.cert, self.key, hosts=["127.0.0.1"])


def _introduce(data_dir: Path) -> str:
    """Create the three replicas with their keys; A trusts B and C (read-write). Returns A's
    public key, which B and C expect from their server."""
    keys = {}
    for name in ("A", "B", "C"):
        with Database.open(data_dir / f"{name}.db") as db:
            keys[name] = load_identity(db).public_text
    with Database.open(data_dir / "A.db") as hub:
        for name in ("B", "C"):
            trust_peer(hub, keys[name], name=name, can="write")
    return keys["A"]


def _stranger_is_refused(data_dir: Path, url: str, hub_key: str, tls: _DemoTls) -> str:
    """A fourth replica whose key A does not trust tries one round; returns the refusal."""
    with Database.open(data_dir / "stranger.db") as db:
        try:
            Peer(db).sync_with(url, server_key=hub_key, ssl=client_context(cafile=tls.cert))
        except UnknownPeerError as refused:
            if any(table.rows for table in table_checksums(db)):
                raise RuntimeError("the stranger was refused but received data") from refused
            said = refused.remote_message if isinstance(refused, PeerRefusedError) else str(refused)
            return f"{type(refused).__name__}: {said}"
    raise RuntimeError("the stranger was admitted")


def run_demo(data_dir: Path) -> bool:
    """The scenario; returns True when the three databases end identical."""
    t0 = time.monotonic()

    def step(text: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {text}", flush=True)

    tls = _DemoTls(data_dir)
    tls.create()
    hub_key = _introduce(data_dir)
    step(f"keys created; A ({hub_key}) trusts B and C; TLS certificate for A made")

    with _Replica("A", data_dir, serve=True) as a:
        url = a.info["url"]
        step(f"A (site {a.info['site_id'][:8]}) serves on {url}, trusted keys only")
        with _Replica("B", data_dir, url=url, server_key=hub_key) as b, \
                _Replica("C", data_dir, url=url, server_key=hub_key) as c:
            everyone = [a, b, c]
            step(f"B (site {b.info['site_id'][:8]}) and C (site {c.info['site_id'][:8]}) connected live, "
                 "keys proven both ways over TLS")
            step(f"a stranger's key is refused: {_stranger_is_refused(data_dir, url, hub_key, tls)}")

            for r in everyone:
                r.send("write", tag="live", count=40)
            for r in everyone:
                r.reply()
            step(f"each wrote 40 events through the stores; converged live in {_wait_converged(everyone) * 1000:.0f} ms")

            lat = sorted(_sample_latency(b, c, LATENCY_SAMPLES))
            p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            step(f"latency B -> A -> C (commit to merged), {len(lat)} samples: p50 {p50:.1f} ms, p99 {p99:.1f} ms")

            c.call("disconnect")
            step("C is cut off (live client closed)")
            c.call("write", tag="offline", count=30, shared=True)
            b.call("write", tag="online", count=15, shared=True)
            a.call("write", tag="online", count=5)
            ab_ms = _wait_converged([a, b]) * 1000
            c_differs = a.call("digest") != c.call("digest")
            step(f"while partitioned: C wrote 30 events, B 15, A 5; B and C both updated {SHARED_STATE!r}; "
                 f"A and B converged live in {ab_ms:.0f} ms; C differs from them: {c_differs}")

            c.call("connect")
            step(f"C reconnected; all three converged in {_wait_converged(everyone) * 1000:.0f} ms")

            stats = {r.name: r.call("quit") for r in everyone}
    step("all replica processes stopped")

    identical = _print_proof([a, b, c])
    moved = sum(s["received"] for s in stats.values())
    applied = sum(s["applied"] for s in stats.values())
    detail = ", ".join(f"{n} received {s['received']} ({s['applied']} took effect)" for n, s in stats.items())
    print(f"\nchanges moved: {moved} received in applied pages, {applied} of them took effect ({detail})")
    with Database.open(a.path) as db:
        winner = db.handler_state.get(WORKFLOW, SHARED_STATE)
    print(f"concurrent update of {SHARED_STATE!r} resolved the same everywhere: {getattr(winner, 'state', winner)}")
    verdict = "IDENTICAL: the three databases are identical" if identical else "DIFFERENT: the databases differ"
    print(f"\n{verdict} ({time.monotonic() - t0:.1f}s total)")
    return identical


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sync.demo", description="Three replicas syncing live.")
    parser.add_argument("--data-dir", help="where the replicas live (default: a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir afterwards")
    # Internal: run as one replica process of the demo.
    parser.add_argument("--replica", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    parser.add_argument("--server-key", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replica:
        return _run_replica(args)
    if args.data_dir:
        data_dir = Path(args.data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="crdt-demo-"))
    try:
        return 0 if run_demo(data_dir) else 1
    except RuntimeError as exc:  # a replica failed or timed out: say which, keep its log
        print(f"demo failed: {exc}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        if args.data_dir or args.keep:
            print(f"replica files and logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
