"""Who may connect: the admission part of one session (token, keys, trust list, grant), no I/O.

The session (sync.session) asks these objects at each step of the opening exchange and
carries on with the sync round only once they are satisfied:

    client                                              server
    Hello(site, schema, token, key, nonce) ───────────▶ ServerHandshake.on_hello:
                                                          token, then (if a key is announced or
                                                          required) replay, trust, challenge
                        ◀─────────── Challenge(server site, key, nonce, issued_at, signature)
    ClientHandshake.on_challenge: expected server key?
    server signature? ──▶ Proof(signature) ───────────▶ ServerHandshake.on_proof: in time?
                                                          client signature? → grant
                        ◀─────────── Hello(site, schema, watermark, can)   (nothing of the
                                                          database was read before this)

Modes: a server with `require_keys` admits only clients whose key is in its trust list (and
grants what the entry says); without it a client may still announce a key (it is verified,
and the server proves its own), and the shared token, when set, is checked first in both
modes. A client uses keys when it expects a server key (`server_key=`, or `require_keys` on
its Peer: the server's key must be in its trust list); it then refuses a server that does
not prove one.

Errors (sync.errors): `AuthError` (token, no key), `UnknownPeerError`, `UntrustedServerError`,
`BadSignatureError`, `ReplayError`, `ExpiredChallengeError`, `MalformedChallengeError`.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, TypedDict

from .challenge import ServerChallenge, answer_challenge, check_key, check_nonce, new_nonce
from .errors import AuthError, MalformedChallengeError, UnknownPeerError, UntrustedServerError
from .identity import format_public_key
from .protocol import PROTOCOL_VERSION, Challenge, Hello, Proof
from .trust import TrustEntry, find_trusted

if TYPE_CHECKING:
    from .peer import Peer

__all__ = ["ServerHandshake", "ClientHandshake"]


class _KeyFields(TypedDict, total=False):
    """The Hello fields a client adds for key authentication (see `ClientHandshake.hello_fields`)."""

    key: bytes
    nonce: bytes | None


class ServerHandshake:
    """The server's admission of one client. `grant` is the client's trust entry once
    admitted by key (None: admitted by token or openly — it may read and write everything)."""

    def __init__(self, peer: "Peer", *, binding: bytes = b""):
        self.peer = peer
        self.binding = binding
        self.grant: TrustEntry | None = None
        self.client_key: bytes | None = None
        self._challenge: ServerChallenge | None = None

    @property
    def awaiting_proof(self) -> bool:
        return self._challenge is not None

    def on_hello(self, hello: Hello) -> Challenge | None:
        """Admit or challenge the client of `hello`; a Challenge to send, or None: admitted.

        Raises:
            AuthError: a wrong or missing token, or no key where keys are required.
            MalformedChallengeError: the key or nonce has the wrong size.
            ReplayError: the nonce was used before (a replayed hello).
            UnknownPeerError: keys are required and this key is not trusted.
        """
        self._check_token(hello.token)
        if hello.key is None and hello.nonce is None:
            if self.peer.require_keys:
                raise AuthError("this peer admits only trusted keys and none was presented "
                                "(sync with a server key, e.g. server_key= or --keys)")
            return None
        key = check_key(hello.key, "client's public key")
        nonce = check_nonce(hello.nonce, "client's nonce")
        now = self.peer.db.clock.now_ms()
        self.peer.replay_guard.remember(nonce, now)
        if self.peer.require_keys:
            self.grant = find_trusted(self.peer.db, key)
            if self.grant is None:
                raise UnknownPeerError(
                    f"key {format_public_key(key)} is not trusted here (on this replica: "
                    f"crdt-sync trust DB {format_public_key(key)} --name NAME --can read|write)",
                    public_key=format_public_key(key),
                )
        self.client_key = key
        self._challenge = ServerChallenge.issue(
            self.peer.identity, protocol=PROTOCOL_VERSION, client_site=hello.site_id,
            server_site=self.peer.db.site_id, client_key=key, client_nonce=nonce,
            now_ms=now, binding=self.binding,
        )
        transcript = self._challenge.transcript
        return Challenge(
            site_id=transcript.server_site, key=transcript.server_key, nonce=transcript.server_nonce,
            issued_at=transcript.issued_at, signature=self._challenge.signature, bound=bool(self.binding),
        )

    def on_proof(self, proof: Proof) -> None:
        """Settle the challenge with the client's proof: then the client is admitted.

        Raises:
            MalformedChallengeError: no challenge is pending, or the signature has the wrong size.
            ExpiredChallengeError: the proof came too late.
            BadSignatureError: the proof is not the client key's signature of this session.
        """
        if self._challenge is None:
            raise MalformedChallengeError("a proof arrived but no challenge was sent")
        challenge, self._challenge = self._challenge, None
        challenge.settle(proof.signature, self.peer.db.clock.now_ms())

    def _check_token(self, token: str | None) -> None:
        expected = self.peer.token
        if expected is None:
            return
        if token is None:
            raise AuthError("this peer requires a token and none was presented")
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise AuthError("the presented token is wrong")


class ClientHandshake:
    """The client's side: announce a key and a nonce, then insist that the server proves the
    expected key (`server_key`, else one in the client's trust list)."""

    def __init__(self, peer: "Peer", *, server_key: bytes | None = None, binding: bytes = b""):
        self.peer = peer
        self.server_key = check_key(server_key, "expected server key") if server_key is not None else None
        self.binding = binding
        self.enabled = server_key is not None or peer.require_keys
        self.nonce = new_nonce() if self.enabled else None
        self.server: TrustEntry | None = None  # the server's entry when recognised by the trust list
        self.peer_key: bytes | None = None  # the key the server proved
        self.verified = False

    def hello_fields(self) -> _KeyFields:
        """The key and nonce for the client's Hello ({} without key authentication)."""
        if not self.enabled:
            return {}
        return {"key": self.peer.identity.public_key, "nonce": self.nonce}

    def on_challenge(self, challenge: Challenge) -> Proof:
        """Check the server's proof of its key; the Proof that answers it.

        Raises:
            MalformedChallengeError: a challenge this client did not ask for, or a bad field.
            UntrustedServerError: the server's key is not the expected one.
            ReplayError: the server's nonce was used before.
            BadSignatureError: the server's signature does not verify for this session.
        """
        if not self.enabled or self.nonce is None or self.verified:  # nonce is None exactly when not enabled
            raise MalformedChallengeError("the server sent a challenge this client did not ask for")
        key = check_key(challenge.key, "server's public key")
        self._check_expected(key)
        self.peer.replay_guard.remember(check_nonce(challenge.nonce, "server's nonce"), self.peer.db.clock.now_ms())
        _, signature = answer_challenge(
            self.peer.identity, protocol=PROTOCOL_VERSION, client_site=self.peer.db.site_id,
            client_nonce=self.nonce, server_site=challenge.site_id, server_key=key,
            server_nonce=challenge.nonce, issued_at=challenge.issued_at,
            server_signature=challenge.signature, binding=self.binding if challenge.bound else b"",
        )
        self.verified, self.peer_key = True, key
        return Proof(signature=signature)

    def on_server_hello(self, hello: Hello) -> None:
        """Raises:
            UntrustedServerError: keys were expected and the server welcomed us without
                proving one (a server without key authentication, or someone in between)."""
        if self.enabled and not self.verified:
            raise UntrustedServerError(
                f"server {hello.site_id} did not prove a key (it does not use key authentication?); "
                "refusing to sync with an unauthenticated server"
            )

    def _check_expected(self, key: bytes) -> None:
        if self.server_key is not None:
            if not hmac.compare_digest(key, self.server_key):
                raise UntrustedServerError(
                    f"the server proved key {format_public_key(key)}, expected {format_public_key(self.server_key)}",
                    public_key=format_public_key(key),
                )
            return
        self.server = find_trusted(self.peer.db, key)
        if self.server is None:
            raise UntrustedServerError(
                f"the server's key {format_public_key(key)} is not in this replica's trust list "
                "(crdt-sync trust, or pass the expected key as server_key=)",
                public_key=format_public_key(key),
            )
