"""The entry point of a replica into sync: `Peer`, its result type and the in-process transport.

    a, b = Peer(db_a), Peer(db_b, token="s3cret")
    result = a.sync_with(b, token="s3cret")     # pull b's changes into a, then push a's to b
    result.pulled, result.pushed

`sync_with` takes another `Peer` (in-process: the messages still go through encode and
decode, exactly as on a network) or a `ws://host:port` URL (the WebSocket transport in
`sync.websocket`, imported only then).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.database import Database

from .changes import CrrSchema, Limits
from .watermarks import PeerWatermark, ensure_tables, watermarks
from .challenge import ReplayGuard
from .errors import ProtocolError
from .identity import Identity, load_identity, public_key_bytes
from .progress import ProgressCallback, ProgressMeter
from .session import Role, Session, SyncResult

if TYPE_CHECKING:
    from ssl import SSLContext

__all__ = ["Peer", "SyncResult", "run_in_process"]


class Peer:
    """One replica as a sync endpoint.

    `token` is what this peer demands from clients that connect to it (None: no token).
    `require_keys=True`: as a server, admit only clients that prove a key in this replica's
    trust list (`sync.trust`), each with its grant; as a client, insist that the server proves
    a key in that list (or the `server_key=` given to `sync_with`). `identity` is this
    replica's key pair, by default its own (created on first need; sync.identity). Creating a
    Peer creates the `__sync_` bookkeeping tables if needed.
    """

    def __init__(self, db: Database, token: str | None = None, *, limits: Limits | None = None,
                 require_keys: bool = False, identity: Identity | None = None):
        self.db = db
        self.token = token
        self.require_keys = require_keys
        self._identity = identity
        self.replay_guard = ReplayGuard()
        self.limits = limits or Limits()
        ensure_tables(db)
        self._schema_facts: tuple[int, CrrSchema, str, int] | None = None

    def _facts(self) -> tuple[int, CrrSchema, str, int]:
        """(schema cookie, CRR schema, fingerprint, schema version), re-read when the file's
        schema changed — another process may migrate it while this peer serves."""
        cookie = self.db.schema_cookie
        if self._schema_facts is None or self._schema_facts[0] != cookie:
            self._schema_facts = (cookie, CrrSchema.load(self.db), self.db.schema_fingerprint,
                                  self.db.schema_version)
        return self._schema_facts

    @property
    def schema(self) -> CrrSchema:
        """Which tables and columns a received change may carry."""
        return self._facts()[1]

    @property
    def fingerprint(self) -> str:
        """The schema fingerprint announced in Hello (see `Database.schema_fingerprint`)."""
        return self._facts()[2]

    @property
    def schema_version(self) -> int:
        return self._facts()[3]

    @property
    def site_id(self) -> str:
        return self.db.site_id

    @property
    def identity(self) -> Identity:
        """This peer's key pair (the database's own, created on first need)."""
        if self._identity is None:
            self._identity = load_identity(self.db)
        return self._identity

    def session(
        self,
        role: Role | str,
        *,
        token: str | None = None,
        live: bool = False,
        progress: Callable[[SyncResult], None] | None = None,
        server_key: str | bytes | None = None,
        binding: bytes = b"",
        streaming: bool = False,
    ) -> Session:
        """A new protocol session for one connection (see sync.session for the contract, and
        for what `streaming` promises).

        Raises:
            ValueError: `server_key` is not a public key.
        """
        return Session(self, Role(role), token=token, live=live, limits=self.limits, progress=progress,
                       server_key=public_key_bytes(server_key), binding=binding, streaming=streaming)

    def sync_with(
        self,
        target: "Peer | str",
        *,
        token: str | None = None,
        progress: ProgressCallback | None = None,
        server_key: str | bytes | None = None,
        ssl: "SSLContext | None" = None,
    ) -> SyncResult:
        """One round with `target`: pull what it has that we lack, then push what it lacks.

        `progress(SyncProgress)` is called after every page moved (counts, bytes, rate and
        an estimated ETA; see sync.progress). `server_key` (`ed25519:...` or 32 raw bytes):
        the key the server must prove (key authentication; see sync.handshake). `ssl`: the
        client TLS context for a wss:// URL (sync.tls.client_context).

        Raises:
            AuthError, SchemaMismatchError: the target refused us (as `PeerRefusedError`), e.g.
                `UnknownPeerError` (our key is not trusted there), `NotAuthorizedError`.
            UntrustedServerError, BadSignatureError: the server did not prove the expected key.
            ProtocolError, InvalidChangeError: the target sent something we refused.
            TLSError: TLS could not be set up (ws:// to a wss:// server, a refused certificate).
            SyncError: any other failure of the round; what was applied stays applied.
            ValueError: `server_key` is not a public key, `ssl` without a wss:// URL, or
                `target` is not a Peer or URL.
        """
        if isinstance(target, str):
            if not target.startswith(("ws://", "wss://")):
                raise ValueError(f"sync target {target!r} is neither a Peer nor a ws:// URL")
            from .websocket import sync_with_url

            return sync_with_url(self, target, token=token, progress=progress, server_key=server_key, ssl=ssl)
        if not isinstance(target, Peer):
            raise TypeError(f"sync target must be a Peer or a ws:// URL, not {type(target).__name__}")
        if target.db is self.db:
            raise ValueError("a peer cannot sync with itself")
        if ssl is not None:
            raise ValueError("ssl= applies to wss:// URLs, not to an in-process Peer")
        # in order, one thread driving both sessions to the end of the round and nothing else:
        # a streaming transport (a merge is never left waiting for a silent peer)
        client = self.session(Role.CLIENT, token=token, progress=ProgressMeter.wrap(progress), server_key=server_key,
                              streaming=True)
        server = target.session(Role.SERVER, streaming=True)
        run_in_process(client, server)
        return client.result

    def watermarks(self) -> list[PeerWatermark]:
        """What this replica knows of each peer it has synced with (for status displays)."""
        return watermarks(self.db)

    def __repr__(self) -> str:
        auth = "+".join(name for name, on in (("token", self.token), ("keys", self.require_keys)) if on) or "none"
        return f"<Peer site={self.site_id} auth={auth}>"


def run_in_process(client: Session, server: Session) -> None:
    """Drive a client and a server session to the end of a round, delivering every message
    as bytes in order. Closes both sessions.

    Raises:
        SyncError: the client's error (its own detection or the server's refusal), or a
            ProtocolError if the round stopped before finishing.
    """
    try:
        queue = deque((server, data) for data in client.start())
        while queue:
            target, data = queue.popleft()
            other = client if target is server else server
            queue.extend((other, reply) for reply in target.receive(data))
        client.raise_for_error()
        if server.error is not None:
            raise server.error
        if not client.finished:
            raise ProtocolError(f"the round stopped in state {client.state.value} before finishing")
    finally:
        client.close()
        server.close()

