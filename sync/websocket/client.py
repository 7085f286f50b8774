"""The client side: one-shot rounds (`sync_with_url`) and live clients that reconnect (`connect`)."""

from __future__ import annotations

import logging
import random
import ssl as ssl_module
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from websockets.exceptions import InvalidHandshake, InvalidURI, WebSocketException
from websockets.sync.client import connect as ws_connect

from engine import Database

from ..errors import SyncError, TLSError, TransportError
from ..identity import public_key_bytes
from ..peer import Peer
from ..progress import ProgressCallback, ProgressMeter
from ..protocol import MAX_MESSAGE_BYTES
from ..session import Role, Session, SyncResult
from ..tls import channel_binding
from .channel import CLOSE_TIMEOUT, Channel, TransportStats

__all__ = ["sync_with_url", "connect", "LiveClient", "check_url", "check_tls_args", "connect_failed",
           "round_result", "CONNECT_ERRORS"]

log = logging.getLogger("sync.websocket")

OPEN_TIMEOUT = 10.0
BACKOFF_INITIAL = 0.05
BACKOFF_CAP = 5.0


def check_url(url: str) -> tuple[str, int]:
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


def check_tls_args(url: str, ssl: ssl_module.SSLContext | None) -> None:
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
    check_url(url)
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
    except CONNECT_ERRORS as exc:
        raise connect_failed(url, exc) from exc


CONNECT_ERRORS = (InvalidURI, OSError, TimeoutError, InvalidHandshake, WebSocketException)
"""What opening a WebSocket raises (threaded and asyncio APIs alike; ssl.SSLError is an OSError)."""


def connect_failed(url: str, exc: BaseException) -> TransportError:
    """The error for a failed connection attempt (`exc` one of CONNECT_ERRORS): a TLSError
    when TLS failed (a refused certificate, one side not speaking TLS), else a TransportError."""
    if isinstance(exc, InvalidURI):
        return TransportError(f"bad URL {url!r}: {exc}", url=url)
    if isinstance(exc, ssl_module.SSLError):
        return _tls_error(url, exc)
    if isinstance(exc, InvalidHandshake):
        if url.startswith("ws://") and _looks_like_tls(exc):
            return TLSError(f"cannot connect to {url}: the server speaks TLS; use wss:// (and ssl=)", url=url)
        return TransportError(f"cannot connect to {url}: {str(exc) or type(exc).__name__}", url=url)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
    return TransportError(f"cannot connect to {url}: {reason}", url=url)


def round_result(session: Session, url: str, reason: str) -> SyncResult:
    """The outcome of a one-shot round whose connection has ended (`reason`: how).

    Raises:
        SyncError: the session failed (its refusal or the remote's).
        TransportError: the connection ended before the round finished.
    """
    if session.failed:
        session.raise_for_error()
    if not session.finished:
        raise TransportError(f"{url}: {reason} before the round finished", url=url)
    return session.result


def _tls_error(url: str, exc: ssl_module.SSLError) -> TLSError:
    """The TLSError for a failed TLS handshake, saying what to change."""
    if isinstance(exc, ssl_module.SSLCertVerificationError):
        hint = "the server's certificate was refused (pass ssl=client_context(cafile=...) / --cafile)"
    elif isinstance(exc, ssl_module.SSLEOFError):
        hint = "the server closed the connection during the TLS handshake (a ws:// server? use ws://)"
    elif "WRONG_VERSION_NUMBER" in (exc.reason or ""):
        hint = "the server does not speak TLS; use ws://"
    else:
        hint = "TLS handshake failed"
    return TLSError(f"cannot connect to {url}: {hint} ({exc.reason or exc})", url=url)


def _looks_like_tls(exc: BaseException) -> bool:
    """Did a plaintext HTTP request get no HTTP response? A TLS server answers `GET` with a TLS
    alert or closes at once (OpenSSL reports HTTP_REQUEST on its side)."""
    text = " ".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    return "did not receive a valid HTTP response" in text or "connection closed while reading HTTP status line" in text


def sync_with_url(
    peer: Peer,
    url: str,
    *,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    server_key: str | bytes | None = None,
    ssl: ssl_module.SSLContext | None = None,
    idle_timeout: float = 60.0,
    open_timeout: float = OPEN_TIMEOUT,
    max_size: int = MAX_MESSAGE_BYTES,
) -> SyncResult:
    """One bidirectional round (pull, then push) with the server at `url`; what `Peer.sync_with`
    does for a ws:// target.

    `progress(SyncProgress)` is called after every page (see sync.progress). Returns the
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
    check_tls_args(url, ssl)
    server_key = public_key_bytes(server_key)  # a bad key is refused before connecting
    ws = _open(url, max_size=max_size, open_timeout=open_timeout, ssl=ssl)
    session = peer.session(Role.CLIENT, token=token, live=False, progress=ProgressMeter.wrap(progress),
                           server_key=server_key, binding=channel_binding(ws.socket), streaming=True)
    try:
        channel = Channel(ws, session, label=f"sync {url}")
        channel.run(idle_timeout=idle_timeout)
        return round_result(session, url, channel.closed_reason())
    finally:
        session.close()



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
        backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_CAP),
        max_size: int = MAX_MESSAGE_BYTES,
        open_timeout: float = OPEN_TIMEOUT,
    ):
        check_url(url)
        check_tls_args(url, ssl)
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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._live = threading.Event()
        self._gave_up = threading.Event()
        self._ws: Any = None
        self._closed = False
        self._thread = threading.Thread(target=self._supervise, name=f"sync-live {url}", daemon=True)

    def start(self) -> "LiveClient":
        """Start connecting in the background (`connect` does this). Returns self."""
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
                                    binding=channel_binding(ws.socket), streaming=True)
        channel = Channel(ws, session, label=f"live {self.url}", stats=self.stats)
        self.stats.add(connections=1)
        try:
            channel.run(db=self.db, on_progress=self._on_progress)
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
    backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_CAP),
) -> LiveClient:
    """Keep `db` in live sync with the server at `url` until closed; returns the started client.

    After the handshake and the initial pull+push round, each side pushes its new commits as
    they happen (noticed through `db.on_change`: this object's commits at once, other
    processes' within `Database.open(poll_interval=...)`). When the connection drops, the
    client reconnects with exponential backoff (`backoff=(initial, cap)` seconds) and resumes
    from the watermarks. `client.wait_connected(timeout)` waits for live mode. `server_key`
    and `ssl` as for `Peer.sync_with`; a permanent refusal (an untrusted key, a TLS mismatch)
    stops the reconnecting.

    Raises:
        TransportError: `url` is not a ws:// or wss:// URL (network failures are retried).
        ValueError: `ssl` for a ws:// URL, or `server_key` is not a public key.
    """
    return LiveClient(db, url, token=token, peer=peer, server_key=server_key, ssl=ssl, backoff=backoff).start()
