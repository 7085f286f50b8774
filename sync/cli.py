"""`crdt-sync`: the command line for replicas — create, inspect, serve, sync, export, import.

    crdt-sync init app.db                                       # also creates its key pair
    crdt-sync id app.db                                         # print its public key
    crdt-sync trust app.db ed25519:... --name laptop --can write [--tables events,topics]
    crdt-sync untrust app.db ed25519:...
    crdt-sync status app.db
    crdt-sync doctor app.db                                     # exit 1 when something is wrong
    crdt-sync serve app.db --port 8765 --token s3cret          # until Ctrl-C, live
    crdt-sync serve app.db --port 8765 --keys --cert c.pem --key k.pem   # wss://, trusted keys only
    crdt-sync sync other.db wss://host:8765 --server-key ed25519:... --cafile c.pem
    crdt-sync sync other.db ws://127.0.0.1:8765 --token s3cret  # one pull+push round
    crdt-sync sync other.db ws://127.0.0.1:8765 --progress      # with a progress bar
    crdt-sync export app.db --for 0123...cdef changes.bin
    crdt-sync import other.db changes.bin
    crdt-sync clone copied.db fresh.db
    crdt-sync nats app.db --server nats://127.0.0.1:4222      # until Ctrl-C, live through JetStream
    crdt-sync nats app.db --server nats://h:4222 --bootstrap wss://hub:8765 --server-key ed25519:...

This module is the roof's edge: it is the one place where errors become one line on stderr and
a non-zero exit code (`EngineError`, `SyncError`, `OSError`, APSW errors). Everything below it
lets them propagate. The token may also come from `$CRDT_SYNC_TOKEN` (keeps it out of `ps`).
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import apsw

from engine import Database, EngineError
from engine.doctor import Fact, diagnose, write_diagnosis

from .watermarks import PeerWatermark, stream_origin, watermarks
from .errors import SyncError
from .files import export_changes, import_changes
from .identity import load_identity, parse_public_key
from .peer import Peer
from .progress import ProgressCallback, SyncProgress
from .protocol import parse_site_id
from .tls import client_context, server_context
from .trust import Grant, trust_peer, trusted_peers, untrust_peer
from .websocket import connect, serve, sync_with_url

__all__ = [
    "main",
    "build_parser",
    "write_status",
    "register_status_section",
    "CommandError",
    "ProgressBar",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
]

PROG = "crdt-sync"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
TOKEN_ENV = "CRDT_SYNC_TOKEN"

StatusSection = Callable[[Database], Iterable[str]]
_status_sections: list[StatusSection] = []


def register_status_section(section: StatusSection) -> StatusSection:
    """Add lines to `crdt-sync status` (e.g. open conflicts, once replicated execution lands).

    `section(db)` returns the lines to print; usable as a decorator.
    """
    _status_sections.append(section)
    return section


def _open_conflicts(db: Database) -> list[str]:
    """The replica's open conflicts (replicated execution: engine/replication.py)."""
    from engine.replication import open_conflicts_summary

    return open_conflicts_summary(db)


register_status_section(_open_conflicts)


class CommandError(Exception):
    """A request the command cannot carry out, explained in one line (e.g. exporting for itself)."""


# -- parsing -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every command carries help text (a test checks that)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Replicate CRDT SQLite databases (cr-sqlite) between peers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    init = command("init", "Create a replica (or migrate an existing one) with its key pair; print its site id and public key.", _cmd_init)
    init.add_argument("db", metavar="DB", help="path of the database file to create")

    ident = command("id", "Print the replica's public key (creating its key pair if it has none).", _cmd_id)
    ident.add_argument("db", metavar="DB", help="path of an existing database file")

    trust = command("trust", "Admit a peer's public key, read-only or read-write (again: change its grant).", _cmd_trust)
    trust.add_argument("db", metavar="DB", help="path of an existing database file")
    trust.add_argument("public_key", metavar="PUBKEY", type=_public_key, help="the peer's key as `crdt-sync id` prints it (ed25519:...)")
    trust.add_argument("--name", required=True, help="a name for the peer, shown in logs and errors (e.g. laptop)")
    trust.add_argument("--can", required=True, choices=[g.value for g in Grant], help="read: may pull only; write: may pull and push")
    trust.add_argument(
        "--tables", type=_table_list, default=(), metavar="T1,T2",
        help="with --can write: the only tables it may write (comma-separated; default: all)",
    )

    untrust = command("untrust", "Remove a peer's public key from the trust list.", _cmd_untrust)
    untrust.add_argument("db", metavar="DB", help="path of an existing database file")
    untrust.add_argument("public_key", metavar="PUBKEY", type=_public_key, help="the key to remove (ed25519:...)")

    status = command("status", "Show a replica's site id, db_version, schema and known peers.", _cmd_status)
    status.add_argument("db", metavar="DB", help="path of an existing database file")

    serve = command("serve", "Serve a replica over WebSocket until Ctrl-C, pushing changes live.", _cmd_serve)
    serve.add_argument("db", metavar="DB", help="path of an existing database file")
    serve.add_argument("--port", type=int, required=True, help="TCP port to listen on (0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    _add_token(serve)
    serve.add_argument(
        "--keys", action="store_true",
        help="admit only clients proving a key of the trust list (crdt-sync trust), each with its grant; "
             "--peer servers must prove a trusted key too",
    )
    serve.add_argument("--cert", metavar="FILE", help="serve wss:// with this PEM certificate (chain); needs --key")
    serve.add_argument("--key", metavar="FILE", help="the PEM private key of --cert")
    serve.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="URL",
        help="also keep a live connection to this ws:// or wss:// server (repeatable; makes a relay)",
    )
    _add_client_tls(serve)

    doctor = command(
        "doctor", "Check a replica, never creating nor migrating it (extension, schema, peers, WAL); exit 1 if wrong.",
        _cmd_doctor,
    )
    doctor.add_argument("db", metavar="DB", help="path of the database file to check")

    sync = command("sync", "Run one pull-then-push round with a ws:// server and print the counts.", _cmd_sync)
    sync.add_argument("db", metavar="DB", help="path of an existing database file")
    sync.add_argument("url", metavar="URL", help="the server, e.g. ws://127.0.0.1:8765 or wss://host:8765")
    _add_token(sync)
    sync.add_argument(
        "--keys", action="store_true",
        help="prove this replica's key, and require the server to prove a key of the trust list",
    )
    sync.add_argument(
        "--server-key", type=_public_key, metavar="PUBKEY",
        help="the key the server must prove (ed25519:..., `crdt-sync id` on the server); implies key authentication",
    )
    _add_client_tls(sync)
    shown = sync.add_mutually_exclusive_group()
    shown.add_argument("--quiet", "-q", action="store_true", help="no progress output on stderr")
    shown.add_argument(
        "--progress", action="store_true",
        help="a progress bar on stderr (changes, MB, rate, ETA) even when it is not a terminal "
             "(on a terminal it is the default; otherwise one line per page)",
    )

    export = command("export", "Write the changes a peer lacks to a file (air-gapped transfer).", _cmd_export)
    export.add_argument("db", metavar="DB", help="path of an existing database file")
    export.add_argument(
        "--for", dest="for_site", required=True, metavar="SITE", type=_site_id,
        help="site id of the receiving peer (32 hex characters; `status` shows it)",
    )
    export.add_argument("file", metavar="FILE", help="file to write")

    clone = command(
        "clone", "Copy a replica to a new file with a site id of its own (the fix for a copied file or "
        "a restored backup that sync refuses as a duplicate site).", _cmd_clone,
    )
    clone.add_argument("src", metavar="SRC", help="path of the existing database file to copy")
    clone.add_argument("dst", metavar="DST", help="path of the new file (must not exist)")

    imp = command("import", "Apply a file written by `export` (all or nothing).", _cmd_import)
    imp.add_argument("db", metavar="DB", help="path of an existing database file")
    imp.add_argument("file", metavar="FILE", help="file written by `crdt-sync export`")

    on_nats = command("nats", "Replicate live through a NATS JetStream stream until Ctrl-C.", _cmd_nats)
    on_nats.add_argument("db", metavar="DB", help="path of an existing database file")
    on_nats.add_argument(
        "--server", action="append", required=True, metavar="URL",
        help="NATS server, e.g. nats://127.0.0.1:4222 (repeatable: a cluster's servers)",
    )
    on_nats.add_argument(
        "--name", help="the fleet's database name: stream CRDT_NAME, subjects crdt.NAME.<site> "
                       "(default: the file name without extension)",
    )
    on_nats.add_argument(
        "--bootstrap", metavar="URL",
        help="ws:// or wss:// peer to pull from when changes this replica lacks have left the stream",
    )
    _add_token(on_nats, "token of the --bootstrap peer")
    on_nats.add_argument(
        "--keys", action="store_true",
        help="--bootstrap: prove this replica's key, and require the peer to prove a key of the trust list",
    )
    on_nats.add_argument(
        "--server-key", type=_public_key, metavar="PUBKEY",
        help="--bootstrap: the key the peer must prove (ed25519:..., `crdt-sync id` there); implies key authentication",
    )
    _add_client_tls(on_nats)
    return parser


def _site_id(text: str) -> str:
    """argparse type: a replica's site id (32 hex characters)."""
    try:
        return parse_site_id(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _public_key(text: str) -> str:
    """argparse type: a public key as `crdt-sync id` prints it."""
    try:
        parse_public_key(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip()


def _table_list(text: str) -> tuple[str, ...]:
    """argparse type: `a,b` -> ('a', 'b'); the names are checked against the schema later."""
    tables = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tables:
        raise argparse.ArgumentTypeError("expected table names separated by commas")
    return tables


def _add_client_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cafile", metavar="FILE", help="wss://: trust the server certificates in this PEM file (e.g. its self-signed one)")
    parser.add_argument(
        "--no-verify", action="store_true",
        help="wss://: encrypt without checking the certificate; only with key authentication, whose "
             "handshake is bound to the TLS channel and so authenticates the server",
    )


def _client_tls(args: argparse.Namespace, url: str, keys: bool) -> "ssl.SSLContext | None":
    """The TLS context for connecting to `url` as the options ask (None: plain ws://, or the
    system's CAs for wss://).

    Raises:
        CommandError: TLS options for a ws:// URL, or --no-verify without key authentication.
    """
    if not url.startswith("wss://"):
        if args.cafile or args.no_verify:
            raise CommandError(f"--cafile/--no-verify apply to wss:// URLs, not {url}")
        return None
    if args.no_verify:
        if not keys:
            raise CommandError("--no-verify needs key authentication (--keys or --server-key): "
                               "without it nothing authenticates the server")
        return client_context(verify=False)
    return client_context(cafile=args.cafile) if args.cafile else None


def _server_tls(args: argparse.Namespace) -> "ssl.SSLContext | None":
    """Raises:
        CommandError: only one of --cert and --key."""
    if bool(args.cert) != bool(args.key):
        raise CommandError("--cert and --key go together (a certificate and its private key)")
    return server_context(args.cert, args.key) if args.cert else None


def _add_token(parser: argparse.ArgumentParser, what: str = "shared secret peers must present") -> None:
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"{what} (default: ${TOKEN_ENV})")


# -- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it).

    Known failures print `crdt-sync: error: <cause>` on stderr and return 1; Ctrl-C returns 130.
    Anything else is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CommandError, EngineError, SyncError, OSError, apsw.Error) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    """The error as one line: OSErrors as 'reason: path', APSW errors with their class."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    elif isinstance(exc, apsw.Error):
        text = f"SQLite: {exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _open_existing(path: str) -> Database:
    """Open a replica that must already exist (opening a missing path would create an empty one).

    Raises:
        FileNotFoundError: no file at `path` (says how to create one).
    """
    if path != ":memory:" and not Path(path).is_file():
        raise FileNotFoundError(2, f"no database (create it with `{PROG} init`)", path)
    return Database.open(path)  # merges are audited for conflicts (on by default)


# -- commands ------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    parent = Path(args.db).resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(2, "directory does not exist", str(parent))
    existed = Path(args.db).is_file()
    with Database.open(args.db) as db:
        verb = "opened existing" if existed else "created"
        print(f"{verb} {args.db}: site id {db.site_id}, schema version {db.schema_version}")
        print(f"public key {load_identity(db).public_text}")
    return EXIT_OK


def _cmd_id(args: argparse.Namespace) -> int:
    with _open_existing(args.db) as db:
        print(load_identity(db).public_text)
    return EXIT_OK


def _cmd_trust(args: argparse.Namespace) -> int:
    with _open_existing(args.db) as db:
        own = load_identity(db, create=False)
        if own is not None and parse_public_key(args.public_key) == own.public_key:
            raise CommandError("that is this replica's own key; give the peer's key (`crdt-sync id` on the peer)")
        try:
            entry = trust_peer(db, args.public_key, name=args.name, can=args.can, tables=args.tables)
        except ValueError as error:
            raise CommandError(str(error)) from None
    print(f"trusted {entry.describe()}")
    return EXIT_OK


def _cmd_untrust(args: argparse.Namespace) -> int:
    with _open_existing(args.db) as db:
        if not untrust_peer(db, args.public_key):
            raise CommandError(f"{args.public_key} is not in the trust list of {args.db}")
    print(f"untrusted {args.public_key}")
    return EXIT_OK


def _cmd_clone(args: argparse.Namespace) -> int:
    with _open_existing(args.src) as db:
        site = db.clone_to(args.dst)
        print(f"cloned {args.src} to {args.dst}: site id {site} (was {db.site_id}); use {args.dst} from now on")
    with Database.open(args.dst) as clone:  # a key belongs to one site id: the clone gets its own
        print(f"public key of the clone {load_identity(clone).public_text} (new: trust it where the original was trusted)")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    with _open_existing(args.db) as db:
        write_status(db, sys.stdout)
    return EXIT_OK


def write_status(db: Database, out: TextIO) -> None:
    """Print the facts of `db`: identity, clock, schema, CRR tables, peers, extra sections."""
    print(f"database:       {db.path}", file=out)
    print(f"site id:        {db.site_id}", file=out)
    identity = load_identity(db, create=False)
    print(f"public key:     {identity.public_text if identity else '(none yet: `crdt-sync id` creates it)'}", file=out)
    print(f"db_version:     {db.db_version}", file=out)
    print(f"schema version: {db.schema_version} (fingerprint {db.schema_fingerprint})", file=out)
    with db.reading() as session:
        counts = [(t, session.scalar(f'SELECT count(*) FROM "{t}"')) for t in db.crr_tables]
    print("tables:         " + ", ".join(f"{t} ({n} rows)" for t, n in counts), file=out)
    peers, origins = _known_peers(db), _stream_origins(db)
    print(f"known peers:    {len(peers)}", file=out)
    for mark in peers:
        print(f"  {_describe_peer(mark)}", file=out)
    if origins:
        print(f"NATS origins:   {len(origins)} (positions on a stream, not peers: crdt-sync nats)", file=out)
        for mark in origins:
            print(f"  {_describe_origin(mark)}", file=out)
    trusted = trusted_peers(db)
    print(f"trusted peers:  {len(trusted)}", file=out)
    for entry in trusted:
        print(f"  {entry.describe()}", file=out)
    for section in _status_sections:
        for line in section(db):
            print(line, file=out)


def _all_watermarks(db: Database) -> list[PeerWatermark]:
    """Every `__sync_peers` row (none, and no bookkeeping table, if `db` never synced)."""
    return watermarks(db) if _has_table(db, "__sync_peers") else []


def _known_peers(db: Database) -> list[PeerWatermark]:
    """The peers `db` has synced with directly (WebSocket, in-process, files)."""
    return [mark for mark in _all_watermarks(db) if stream_origin(mark.site_id) is None]


def _stream_origins(db: Database) -> list[PeerWatermark]:
    """What NATS streams brought of each origin's own changes (sync.nats): positions, not peers."""
    return [mark for mark in _all_watermarks(db) if stream_origin(mark.site_id) is not None]


def _when(mark: PeerWatermark) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mark.updated_at / 1000)) if mark.updated_at else "never"


def _describe_peer(mark: PeerWatermark) -> str:
    return (f"{mark.site_id}  received through its db_version {mark.received}, "
            f"acked through ours {mark.acked}, last sync {_when(mark)}")


def _describe_origin(mark: PeerWatermark) -> str:
    return (f"{stream_origin(mark.site_id)}  its own changes merged from the stream through its db_version "
            f"{mark.received}, last merge {_when(mark)}")


def _has_table(db: Database, name: str) -> bool:
    with db.reading() as session:
        return bool(session.scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))


def _cmd_sync(args: argparse.Namespace) -> int:
    with _open_existing(args.db) as db, _progress_display(args) as progress:
        keys = args.keys or args.server_key is not None
        result = sync_with_url(Peer(db, require_keys=args.keys), args.url, token=args.token, progress=progress,
                               server_key=args.server_key, ssl=_client_tls(args, args.url, keys))
    print(f"pulled {result.pulled} changes, pushed {result.pushed} changes ({args.url})")
    return EXIT_OK


@contextmanager
def _progress_display(args: argparse.Namespace) -> Iterator[ProgressCallback | None]:
    """What `sync` shows while it runs: nothing (--quiet), a bar (--progress, or stderr is a
    terminal), else one line per page (logs keep a readable record)."""
    if args.quiet:
        yield None
    elif args.progress or sys.stderr.isatty():
        with ProgressBar(sys.stderr) as bar:
            yield bar
    else:
        yield lambda p: print(f"{PROG}: ... pulled {p.pulled}, pushed {p.pushed}", file=sys.stderr, flush=True)


class ProgressBar:
    """A tqdm bar fed with `SyncProgress` reports: changes (of the estimated total), MB moved,
    rate and ETA — the estimate's own figures, not tqdm's (see sync.progress for their meaning).
    On a terminal it redraws at most 10 times a second; elsewhere it writes every report."""

    KNOWN = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} changes{postfix}"
    UNKNOWN = "{desc}: {n_fmt} changes{postfix}"  # no total estimated yet: no bar, no percentage

    def __init__(self, out: TextIO):
        from tqdm import tqdm  # imported only when a bar is shown

        self._format_interval = tqdm.format_interval
        self._bar = tqdm(
            total=None, file=out, desc=PROG, unit="changes", dynamic_ncols=True,
            mininterval=0.1 if out.isatty() else 0, bar_format=self.UNKNOWN,
        )

    def __call__(self, progress: SyncProgress) -> None:
        eta = "?" if progress.eta_seconds is None else self._format_interval(progress.eta_seconds)
        self._bar.total = progress.total_changes
        self._bar.bar_format = self.UNKNOWN if progress.total_changes is None else self.KNOWN
        self._bar.n = progress.changes
        self._bar.set_postfix_str(
            f"{progress.bytes / 1e6:.1f} MB, {progress.rate:,.0f} changes/s, ETA {eta}", refresh=False
        )
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cmd_doctor(args: argparse.Namespace) -> int:
    """The engine's diagnosis (engine.doctor) plus this replica's sync peers."""
    return write_diagnosis(diagnose(args.db, sections=[_sync_facts]), PROG, sys.stdout, sys.stderr)


def _sync_facts(db: Database) -> list[Fact]:
    peers, origins = _known_peers(db), _stream_origins(db)
    facts = [Fact("sync peers", str(len(peers)))] + [Fact("peer", _describe_peer(mark)) for mark in peers]
    if origins:
        facts += [Fact("NATS origins", str(len(origins)))] + [Fact("origin", _describe_origin(m)) for m in origins]
    return facts


def _cmd_serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        tls = _server_tls(args)
        peer_tls = [_client_tls(args, url, args.keys) for url in args.peer]
        with _open_existing(args.db) as db, serve(db, args.host, args.port, token=args.token,
                                                  require_keys=args.keys, ssl=tls) as server:
            peer = server.peer
            clients = [connect(db, url, token=args.token, peer=peer, ssl=context)
                       for url, context in zip(args.peer, peer_tls)]
            try:
                key = f", key {peer.identity.public_text}" if args.keys else ""
                print(f"serving {args.db} (site {db.site_id}{key}) on {server.url}; Ctrl-C stops", flush=True)
                while not stop.wait(3600):
                    pass
            finally:
                for client in clients:
                    client.close()
        print(f"{PROG}: stopped", file=sys.stderr)
    finally:
        restore()
    return EXIT_OK


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Make SIGINT/SIGTERM set `stop` (so `serve` closes cleanly); returns the undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _cmd_nats(args: argparse.Namespace) -> int:
    from .nats import check_name, replicate  # needs nats-py only when used

    name = args.name or Path(args.db).stem
    try:
        check_name(name)
    except ValueError as error:
        raise CommandError(f"{error}; choose one with --name") from None
    keys = args.keys or args.server_key is not None
    if args.bootstrap is None:
        if keys or args.cafile or args.no_verify:
            raise CommandError("--keys, --server-key, --cafile and --no-verify apply to the --bootstrap peer; "
                               "give --bootstrap ws://HOST:PORT or wss://HOST:PORT")
        tls = None
    else:
        tls = _client_tls(args, args.bootstrap, keys)
    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        with _open_existing(args.db) as db, replicate(
            db, args.server, name=name, bootstrap=args.bootstrap, token=args.token,
            server_key=args.server_key, ssl=tls, require_keys=args.keys,
        ) as replica:
            print(f"replicating {args.db} (site {db.site_id}) on {', '.join(args.server)}, "
                  f"stream {replica.stream}; Ctrl-C stops", flush=True)
            while not stop.is_set():
                if replica.wait_stopped(0.2) and replica.error is not None:
                    raise replica.error
        print(f"{PROG}: stopped", file=sys.stderr)
    finally:
        restore()
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    with _open_existing(args.db) as db:
        if args.for_site == db.site_id:
            raise CommandError(f"--for {args.for_site} is this replica itself; give the receiving peer's site id")
        count = export_changes(db, args.file, for_site=args.for_site)
    print(f"exported {count} changes for {args.for_site} to {args.file}")
    return EXIT_OK


def _cmd_import(args: argparse.Namespace) -> int:
    with _open_existing(args.db) as db:
        if not Path(args.file).is_file():
            raise FileNotFoundError(2, "no such file", args.file)
        count = import_changes(db, args.file)
    print(f"imported {count} changes from {args.file}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
