"""The WebSocket transport: a hub server, one-shot rounds, and live clients that reconnect.

Built on the `websockets` library's threaded API, which fits APSW: every connection gets a
thread, and the sans-I/O session (`sync.session`) does the protocol. This module only moves
bytes between sockets and sessions, and wakes sessions when the database changes.

    with sync.serve(db, "127.0.0.1", 0, token="s3cret") as server:        # hub, many clients
        result = sync.Peer(other).sync_with(server.url, token="s3cret")     # one pull+push round
        with sync.connect(third, server.url, token="s3cret") as client:     # live until closed
            client.wait_connected(5)

Threads (every owner is a context manager with an idempotent `close()`):

    SyncServer      websockets' accept thread + one handler thread per connection
    LiveClient      one supervisor thread: connect, run, back off, reconnect
    _Channel        per open connection: a reader thread filling an inbox; the owner thread
                    runs the session (the only thread touching it) and sends its frames
    ChangeNotifier  the database's commit listener + one thread polling PRAGMA data_version

Reading never waits on the session and the session never waits on the network, so two peers
pushing at each other cannot deadlock; the Database lock is only held inside session calls.

Errors: refusals come from the session as `SyncError` subclasses (`AuthError`,
`SchemaMismatchError`, ... see sync.errors); transport failures are `TransportError`. Thread
entry points log and close; only the caller-facing calls raise.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl as ssl_module
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import apsw
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI, WebSocketException
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import serve as ws_serve

from engine import Database, EngineError

from .errors import SyncError, TLSError, TransportError
from .identity import public_key_bytes
from .peer import Peer
from .protocol import MAX_MESSAGE_BYTES
from .session import Role, Session, SyncResult
from .tls import channel_binding, log_failed_handshakes

__all__ = [
    "serve",
    "connect",
    "sync_with_url",
    "SyncServer",
    "LiveClient",
    "ChangeNotifier",
    "TransportStats",
    "TransportError",
    "DEFAULT_POLL_INTERVAL",
]

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 0.005
"""Seconds between `PRAGMA data_version` checks (writes by other connections/processes)."""
OPEN_TIMEOUT = 10.0
ROUND_TIMEOUT = 300.0
CLOSE_TIMEOUT = 2.0
BACKOFF_INITIAL = 0.05
BACKOFF_CAP = 5.0
_CLOSE_TOO_BIG = 1009


class TransportStats:
    """Counters of one server or client, safe to read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0
        self.changes_sent = 0  # in pages the other side acknowledged
        self.changes_received = 0  # in pages applied here (including already-known changes)
        self.changes_applied = 0  # received changes that took effect here

    def add(self, *, connections: int = 0, sent: int = 0, received: int = 0, applied: int = 0) -> None:
        with self._lock:
            self.connections += connections
            self.changes_sent += sent
            self.changes_received += received
            self.changes_applied += applied

    def __repr__(self) -> str:
        return (
            f"<TransportStats connections={self.connections} sent={self.changes_sent} "
            f"received={self.changes_received} applied={self.changes_applied}>"
        )


# -- noticing commits ----------------------------------------------------------------------


class ChangeNotifier:
    """Calls its subscribers when `db` may hold new changes.

    Two sources: `db.on_commit` (commits through this Database object, immediate) and a poll of
    `PRAGMA data_version`, which changes when another connection or process commits to the same
    file. Subscribers must be cheap and never block (they set a flag or queue a token).
    """

    def __init__(self, db: Database, *, poll_interval: float | None = DEFAULT_POLL_INTERVAL):
        self.db = db
        self._subscribers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._remove_listener = db.on_commit(self.notify)
        self._thread: threading.Thread | None = None
        if poll_interval:
            self._thread = threading.Thread(
                target=self._poll, args=(poll_interval,), name="sync-data-version-poll", daemon=True
            )
            self._thread.start()

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Register `wake`; returns the function that unregisters it."""
        with self._lock:
            self._subscribers.append(wake)

        def unsubscribe() -> None:
            with self._lock:
                if wake in self._subscribers:
                    self._subscribers.remove(wake)

        return unsubscribe

    def notify(self) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for wake in subscribers:
            wake()

    def _poll(self, interval: float) -> None:
        """Thread entry: notify when another connection has committed; ends with the database.

        A failed read (e.g. the application used `db.connection` from another thread at that
        moment) is logged and retried on the next tick: stopping would silently stop noticing
        other processes' writes for the rest of the connection's life.
        """
        last, missed = None, False
        while not self.db.closed:
            try:
                current = self._data_version()
            except (EngineError, apsw.Error) as error:
                if self.db.closed:
                    return
                log.warning("data_version poll of %s failed (%s); retrying", self.db.path, error)
                missed = True
            else:
                # after a failed read we cannot tell what changed meanwhile: wake to be safe
                if missed or (last is not None and current != last):
                    self.notify()
                last, missed = current, False
            if self._stop.wait(interval):
                return

    def _data_version(self) -> int:
        with self.db.reading() as session:
            return session.scalar("PRAGMA data_version")

    def close(self) -> None:
        """Stop polling and detach from the database. Idempotent."""
        self._stop.set()
        self._remove_listener()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "ChangeNotifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- one open connection -------------------------------------------------------------------

_CLOSED = object()  # inbox token: the connection is gone
_WAKE = object()  # inbox token: look at the wake flag
_INBOX_FRAMES = 64  # a well-behaved peer has one page and one ack in flight; this bounds a flood


class _Channel:
    """One open WebSocket driven by one session.

    Not a context manager on purpose: `run()` is its whole life and always closes the socket and
    joins the reader before returning. A reader thread moves received frames into a bounded
    inbox; `run()` (on the owner's thread) is the only caller of the session: it feeds frames in, sends what comes out, and on a wake
    (local commits) asks the session for pages. Neither thread ever waits on the other side of
    the network while the other one needs it.
    """

    def __init__(self, ws: Any, session: Session, *, label: str, stats: TransportStats | None = None):
        self.ws = ws
        self.session = session
        self.label = label
        self.stats = stats
        self.close_exc: ConnectionClosed | None = None
        self._inbox: queue.Queue = queue.Queue(maxsize=_INBOX_FRAMES)
        self._wake_pending = threading.Event()
        self._counted = (0, 0, 0)

    def wake(self) -> None:
        """Local commits may exist: callable from any thread, never blocks, never lost."""
        if not self._wake_pending.is_set():
            self._wake_pending.set()
            try:
                self._inbox.put_nowait(_WAKE)
            except queue.Full:
                pass  # the loop checks the flag after every frame it takes out

    def run(
        self,
        *,
        notifier: ChangeNotifier | None = None,
        idle_timeout: float | None = None,
        on_progress: Callable[[Session], None] | None = None,
    ) -> None:
        """Drive the session until it finishes or the connection closes; always closes the socket.

        Raises:
            TransportError: nothing arrived for `idle_timeout` seconds.
        """
        reader = threading.Thread(target=self._read, name=f"sync-ws-read {self.label}", daemon=True)
        reader.start()
        unsubscribe = notifier.subscribe(self.wake) if notifier else None
        try:
            self._send(self.session.start())
            self.wake()
            while not self.session.finished:
                try:
                    item = self._inbox.get(timeout=idle_timeout)
                except queue.Empty:
                    raise TransportError(f"{self.label}: nothing received for {idle_timeout:g}s") from None
                if item is _CLOSED:
                    break
                if item is not _WAKE:
                    self._send(self.session.receive(item))
                if self._wake_pending.is_set() and not self.session.finished:
                    self._wake_pending.clear()
                    self._send(self.session.local_changes())
                self._count()
                if on_progress is not None:
                    on_progress(self.session)
        except ConnectionClosed as exc:
            self.close_exc = self.close_exc or exc
        finally:
            if unsubscribe is not None:
                unsubscribe()
            self.ws.close()
            self._drain_until_done(reader)
            self._count()

    def _drain_until_done(self, reader: threading.Thread) -> None:
        """Wait for the reader to end, emptying the inbox so a reader blocked on a full inbox
        (a flooding peer) can reach the closed socket and stop."""
        deadline = time.monotonic() + CLOSE_TIMEOUT + 1
        while reader.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    self._inbox.get_nowait()
            except queue.Empty:
                pass
            reader.join(0.05)
        if reader.is_alive():
            log.warning("%s: reader thread still running after close", self.label)

    def _send(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.ws.send(frame)

    def _read(self) -> None:
        """Thread entry: frames into the inbox until the connection closes."""
        try:
            while True:
                self._inbox.put(self.ws.recv(decode=False))
        except ConnectionClosed as exc:
            self.close_exc = exc
        except Exception:
            log.exception("%s: reading failed", self.label)
            self.ws.close()
        finally:
            self._inbox.put(_CLOSED)

    def _count(self) -> None:
        """Add the session's progress since the last call to the owner's counters."""
        if self.stats is None:
            return
        result = self.session.result
        pushed, pulled, applied = self._counted
        self.stats.add(sent=result.pushed - pushed, received=result.pulled - pulled, applied=result.applied - applied)
        self._counted = (result.pushed, result.pulled, result.applied)

    def closed_reason(self) -> str:
        """Why the connection ended, in words (for errors and logs)."""
        exc = self.close_exc
        if exc is None:
            return "closed"
        frame = exc.rcvd or exc.sent
        if frame is not None and frame.code == _CLOSE_TOO_BIG:
            return "a message exceeded the size limit (WebSocket close 1009)"
        if frame is None:
            return "connection lost without a close frame"
        return f"closed with code {frame.code}" + (f" ({frame.reason})" if frame.reason else "")


def _check_url(url: str) -> tuple[str, int]:
    """The (host, port) of a ws:// or wss:// URL.

    Raises:
        TransportError: the URL is not one.
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise TransportError(f"bad URL {url!r}: {exc}", url=url) from exc
    if parts.scheme not in ("ws", "wss") or not host:
        raise TransportError(f"bad URL {url!r}: expected ws://HOST:PORT or wss://HOST:PORT", url=url)
    return host, port or (443 if parts.scheme == "wss" else 80)


def _check_tls_args(url: str, ssl: ssl_module.SSLContext | None) -> None:
    """Raises:
        ValueError: a TLS context for a ws:// URL (it would silently not be used)."""
    if ssl is not None and not url.startswith("wss://"):
        raise ValueError(f"ssl= was given but {url!r} is not a wss:// URL")


def _open(url: str, *, max_size: int, open_timeout: float, ssl: ssl_module.SSLContext | None = None) -> Any:
    """Open a WebSocket client connection (TLS for wss://: `ssl`, or the system's CAs).

    Raises:
        TLSError: TLS failed: a refused certificate, or one side does not speak TLS.
        TransportError: the server is unreachable or the WebSocket handshake failed.
    """
    _check_url(url)
    try:
        return ws_connect(
            url,
            open_timeout=open_timeout,
            close_timeout=CLOSE_TIMEOUT,
            max_size=max_size,
            compression=None,
            proxy=None,
            ssl=ssl,
            legacy=True,  # a plain connection: the channel owns and closes it
        )
    except InvalidURI as exc:
        raise TransportError(f"bad URL {url!r}: {exc}", url=url) from exc
    except ssl_module.SSLError as exc:
        raise _tls_error(url, exc) from exc
    except InvalidHandshake as exc:
        if url.startswith("ws://") and _looks_like_tls(exc):
            raise TLSError(f"cannot connect to {url}: the server speaks TLS; use wss:// (and ssl=)", url=url) from exc
        reason = str(exc) or type(exc).__name__
        raise TransportError(f"cannot connect to {url}: {reason}", url=url) from exc
    except (OSError, TimeoutError, WebSocketException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
        raise TransportError(f"cannot connect to {url}: {reason}", url=url) from exc


def _tls_error(url: str, exc: ssl_module.SSLError) -> TLSError:
    """The TLSError for a failed TLS handshake, saying what to change."""
    if isinstance(exc, ssl_module.SSLCertVerificationError):
        hint = "the server's certificate was refused (pass ssl=client_context(cafile=...) / --cafile)"
    elif isinstance(exc, ssl_module.SSLEOFError):
        hint = "the server closed the connection during the TLS handshake (a ws:// server? use ws://)"
    elif "WRONG_VERSION_NUMBER" in (exc.reason or "") or "wrong version number" in str(exc):
        hint = "the server does not speak TLS; use ws://"
    else:
        hint = "TLS handshake failed"
    detail = exc.reason or str(exc)
    return TLSError(f"cannot connect to {url}: {hint} ({detail})", url=url)


def _looks_like_tls(exc: BaseException) -> bool:
    """Did a plaintext HTTP request get a TLS record (an alert) or nothing back? A TLS server
    answers `GET` with a protocol alert or closes at once: either way no HTTP response."""
    text = " ".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    return "\\x15\\x03" in text or "did not receive a valid HTTP response" in text or "connection closed while reading HTTP status line" in text


# -- one round -----------------------------------------------------------------------------


def sync_with_url(
    peer: Peer,
    url: str,
    *,
    token: str | None = None,
    server_key: str | bytes | None = None,
    ssl: ssl_module.SSLContext | None = None,
    progress: Callable[[int, int], None] | None = None,
    idle_timeout: float = 60.0,
    open_timeout: float = OPEN_TIMEOUT,
    max_size: int = MAX_MESSAGE_BYTES,
) -> SyncResult:
    """One bidirectional round (pull, then push) with the server at `url`; what `Peer.sync_with`
    does for a ws:// target.

    `progress(pulled, pushed)` is called after every page (the CLI prints it). Returns the
    client session's `SyncResult` (`result.pulled`, `result.pushed`). `server_key`: the key
    the server must prove; `ssl`: the TLS context for a wss:// URL (sync.tls).

    Raises:
        TLSError: TLS failed (a refused certificate, ws:// against a TLS server or the reverse).
        TransportError: bad URL, server unreachable, connection lost mid-round or silent for
            `idle_timeout` seconds (nothing is lost: the next round resumes from watermarks).
        ValueError: `ssl` for a ws:// URL, or `server_key` is not a public key.
        SyncError: a refusal, as the subclass that says why (`AuthError`, `SchemaMismatchError`,
            `ProtocolError`, ... — see sync.errors).
    """
    report = (lambda result: progress(result.pulled, result.pushed)) if progress else None
    _check_tls_args(url, ssl)
    server_key = public_key_bytes(server_key)  # a bad key is refused before connecting
    ws = _open(url, max_size=max_size, open_timeout=open_timeout, ssl=ssl)
    session = peer.session(Role.CLIENT, token=token, live=False, progress=report, server_key=server_key,
                           binding=channel_binding(ws.socket))
    try:
        channel = _Channel(ws, session, label=f"sync {url}")
        channel.run(idle_timeout=idle_timeout)
        if session.failed:
            session.raise_for_error()
        if not session.finished:
            raise TransportError(f"{url}: {channel.closed_reason()} before the round finished", url=url)
        return session.result
    finally:
        session.close()


# -- the server ----------------------------------------------------------------------------


class SyncServer:
    """A WebSocket sync server in background threads; see `serve`."""

    def __init__(
        self,
        db: Database,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        peer: Peer | None = None,
        require_keys: bool = False,
        ssl: ssl_module.SSLContext | None = None,
        poll_interval: float | None = DEFAULT_POLL_INTERVAL,
        max_size: int = MAX_MESSAGE_BYTES,
    ):
        if peer is not None and token is not None and peer.token != token:
            raise ValueError("serve(): token= differs from peer.token; give the token to the Peer only")
        if peer is not None and require_keys and not peer.require_keys:
            raise ValueError("serve(): require_keys=True but the peer does not require keys; set it on the Peer")
        self.db = db
        self.peer = peer or Peer(db, token=token, require_keys=require_keys)
        self.tls = ssl is not None
        self.stats = TransportStats()
        self._closed = False
        self._lock = threading.Lock()
        self._notifier = ChangeNotifier(db, poll_interval=poll_interval)
        try:
            self._server = ws_serve(
                self._handle, host, port, max_size=max_size, compression=None, close_timeout=CLOSE_TIMEOUT,
                ssl=log_failed_handshakes(ssl) if ssl is not None else None,
            )
        except BaseException:
            self._notifier.close()
            raise
        self.host = host
        self.port: int = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"sync-ws-server :{self.port}", daemon=True)
        self._thread.start()
        log.info("sync server for %s listening on %s", db.path, self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}"

    def _serve(self) -> None:
        """Thread entry: accept connections until `close()`."""
        try:
            self._server.serve_forever()
        except Exception:
            log.exception("sync server %s stopped accepting", self.url)

    def _handle(self, ws: Any) -> None:
        """Connection entry (one thread each, started by websockets): run one session."""
        self.stats.add(connections=1)
        label = f"server :{self.port} <- {_address(ws)}"
        session = self.peer.session(Role.SERVER, binding=channel_binding(ws.socket))
        channel = _Channel(ws, session, label=label, stats=self.stats)
        try:
            channel.run(notifier=self._notifier)
        except Exception:
            log.exception("%s: connection failed", label)
        finally:
            session.close()
        if session.failed:
            log.info("%s: session ended: %s", label, session.error)
        else:
            log.debug("%s: %s; pulled %d, pushed %d", label, channel.closed_reason(),
                      session.result.pulled, session.result.pushed)

    def close(self) -> None:
        """Stop accepting, close every connection, wait for their threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._thread.join(timeout=CLOSE_TIMEOUT + 5)
        self._notifier.close()
        log.info("sync server %s closed", self.url)

    def __enter__(self) -> "SyncServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncServer {self.url} db={self.db.path}>"


def _address(ws: Any) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"


def serve(
    db: Database,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    peer: Peer | None = None,
    require_keys: bool = False,
    ssl: ssl_module.SSLContext | None = None,
    poll_interval: float | None = DEFAULT_POLL_INTERVAL,
    max_size: int = MAX_MESSAGE_BYTES,
) -> SyncServer:
    """Serve `db` over WebSocket from background threads; listening when this returns.

    Many clients at once (a hub): each connection runs its own session, one-shot or live, and
    live connections get new local commits (and merges from the other connections, which makes
    relaying work) pushed as they happen. `port=0` picks a free port (`server.port`,
    `server.url`). Clients must present `token` when one is set (or pass a `peer=Peer(db,
    token=..., limits=...)` to choose page limits). `require_keys=True`: admit only clients
    that prove a key of this replica's trust list, each with its grant (sync.handshake,
    sync.trust). `ssl`: a server TLS context (sync.tls.server_context): the server speaks
    wss:// only. Frames above `max_size` bytes close that connection (code 1009). Close
    with `server.close()` or use `with`.

    Raises:
        OSError: the address cannot be bound (port in use, bad host).
        ValueError: `token` or `require_keys` disagree with the given `peer`.
    """
    return SyncServer(db, host, port, token=token, peer=peer, require_keys=require_keys, ssl=ssl,
                      poll_interval=poll_interval, max_size=max_size)


# -- the live client -----------------------------------------------------------------------


class LiveClient:
    """A live connection to a sync server that reconnects; see `connect`."""

    def __init__(
        self,
        db: Database,
        url: str,
        *,
        token: str | None = None,
        peer: Peer | None = None,
        server_key: str | bytes | None = None,
        ssl: ssl_module.SSLContext | None = None,
        poll_interval: float | None = DEFAULT_POLL_INTERVAL,
        backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_CAP),
        max_size: int = MAX_MESSAGE_BYTES,
        open_timeout: float = OPEN_TIMEOUT,
    ):
        _check_url(url)
        _check_tls_args(url, ssl)
        self.db = db
        self.url = url
        self.token = token
        self.peer = peer or Peer(db)
        self.server_key = public_key_bytes(server_key)
        self._ssl = ssl
        self.stats = TransportStats()
        self.error: SyncError | None = None
        self.attempts = 0
        self._backoff = backoff
        self._max_size = max_size
        self._open_timeout = open_timeout
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._live = threading.Event()
        self._gave_up = threading.Event()
        self._ws: Any = None
        self._closed = False
        self._notifier: ChangeNotifier | None = None
        self._thread = threading.Thread(target=self._supervise, name=f"sync-live {url}", daemon=True)

    def start(self) -> "LiveClient":
        """Start connecting in the background (`connect` does this). Returns self."""
        self._notifier = ChangeNotifier(self.db, poll_interval=self._poll_interval)
        self._thread.start()
        return self

    @property
    def connected(self) -> bool:
        """True while connected with the initial round done (new commits flow live)."""
        return self._live.is_set()

    def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the client is connected and caught up.

        Raises:
            SyncError: the server refused for good (`AuthError`, `SchemaMismatchError`).
            TimeoutError: not connected within `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._live.is_set():
            if self._gave_up.is_set() and self.error is not None:
                raise self.error
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"not connected to {self.url} within {timeout}s (attempts: {self.attempts})")
            self._live.wait(0.05 if remaining is None else min(0.05, remaining))  # sleep-ok: bounded wait

    def _supervise(self) -> None:
        """Thread entry: connect, run live, back off (exponential, capped, jittered), repeat.

        Stops on `close()` or on a permanent refusal (kept in `self.error`).
        """
        initial, cap = self._backoff
        delay = initial
        while not self._stop.is_set():
            self.attempts += 1
            progressed = False
            try:
                progressed = self._run_once()
            except SyncError as exc:
                self.error = exc
                if exc.permanent:
                    log.error("live sync with %s refused, giving up: %s", self.url, exc)
                    self._gave_up.set()
                    return
                log.warning("live sync with %s: %s; retrying in %.2fs", self.url, exc, delay)
            except Exception:
                log.exception("live sync with %s failed; retrying in %.2fs", self.url, delay)
            finally:
                self._live.clear()
            if progressed:
                delay = initial
            if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                return
            delay = min(delay * 2, cap)

    def _run_once(self) -> bool:
        """One connection's life; returns whether it made progress (a page applied or live mode),
        which resets the backoff.

        Raises:
            TransportError: could not connect, or the connection ended.
            SyncError: the session failed (a refusal or bad input).
        """
        ws = _open(self.url, max_size=self._max_size, open_timeout=self._open_timeout, ssl=self._ssl)
        with self._lock:
            if self._stop.is_set():
                ws.close()
                return False
            self._ws = ws
        session = self.peer.session(Role.CLIENT, token=self.token, live=True, server_key=self.server_key,
                                    binding=channel_binding(ws.socket))
        channel = _Channel(ws, session, label=f"live {self.url}", stats=self.stats)
        self.stats.add(connections=1)
        try:
            channel.run(notifier=self._notifier, on_progress=self._on_progress)
        finally:
            with self._lock:
                self._ws = None
            session.close()
        progressed = session.result.pages_received > 0 or session.caught_up
        if session.failed:
            session.raise_for_error()
        if self._stop.is_set():
            return progressed
        self.error = TransportError(f"{self.url}: {channel.closed_reason()}", url=self.url)
        log.info("live sync with %s ended (%s); reconnecting", self.url, channel.closed_reason())
        return progressed

    def _on_progress(self, session: Session) -> None:
        if session.caught_up and not self._live.is_set():
            self.error = None
            self._live.set()
            log.info("live sync with %s: caught up, now live", self.url)

    def close(self) -> None:
        """Disconnect and stop reconnecting; waits for the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            ws = self._ws
        if ws is not None:
            ws.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=CLOSE_TIMEOUT + self._open_timeout + 5)
        if self._notifier is not None:
            self._notifier.close()

    def __enter__(self) -> "LiveClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LiveClient {self.url} db={self.db.path} {'live' if self.connected else 'connecting'}>"


def connect(
    db: Database,
    url: str,
    *,
    token: str | None = None,
    peer: Peer | None = None,
    server_key: str | bytes | None = None,
    ssl: ssl_module.SSLContext | None = None,
    poll_interval: float | None = DEFAULT_POLL_INTERVAL,
    backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_CAP),
) -> LiveClient:
    """Keep `db` in live sync with the server at `url` until closed; returns the started client.

    After the handshake and the initial pull+push round, each side pushes its new commits as
    they happen (noticed through `db.on_commit` and a `PRAGMA data_version` poll every
    `poll_interval` seconds for other connections' writes). When the connection drops, the
    client reconnects with exponential backoff (`backoff=(initial, cap)` seconds) and resumes
    from the watermarks. `client.wait_connected(timeout)` waits for live mode. `server_key`
    and `ssl` as for `Peer.sync_with`; a permanent refusal (an untrusted key, a TLS mismatch)
    stops the reconnecting.

    Raises:
        TransportError: `url` is not a ws:// or wss:// URL (network failures are retried).
        ValueError: `ssl` for a ws:// URL, or `server_key` is not a public key.
    """
    return LiveClient(db, url, token=token, peer=peer, server_key=server_key, ssl=ssl,
                      poll_interval=poll_interval, backoff=backoff).start()
