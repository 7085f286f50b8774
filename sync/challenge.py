"""Mutual authentication by Ed25519 challenge–response, as pure functions and small values (no I/O).

Both sides prove they hold the private key of the public key they announce, by signing one
*transcript* that binds everything identifying this session:

    client → server   Hello(..., key = client key, nonce = client nonce)
    server → client   Challenge(server site, server key, server nonce, issued_at, bound,
                                signature = server's signature of the transcript)
    client → server   Proof(signature = client's signature of the same transcript)

    transcript = (protocol version, client site, server site, client key, server key,
                  client nonce, server nonce, issued_at, TLS channel binding or b"")
    signed bytes = DOMAIN + role ("server" | "client") + 0x00 + msgpack(transcript)

Why each part:
- fresh 32-byte nonces from both sides (`secrets`): each signature covers the other side's
  nonce, so a recorded signature is worthless in any other session (replay);
- the role label: the server's signature can never be passed off as a client's (reflection);
- both site ids and both keys: a signature cannot be moved to another pair of replicas;
- `issued_at` (server clock): the server refuses a proof arriving after `CHALLENGE_TTL_MS`
  (only the server's clock judges it, so clock skew between machines does not matter);
- the TLS channel binding (`tls-unique` of the connection, when the server itself speaks TLS,
  which it announces with `bound`): a man in the middle who terminates TLS with each side sees
  two different bindings and cannot relay the signatures, so a client may skip certificate
  verification and still reach the right server. Python's `ssl` offers no `tls-exporter`
  (RFC 9266); on TLS 1.3 `tls-unique` is OpenSSL's Finished message, which hashes the whole
  handshake and is unique per connection;
- `ReplayGuard`: a nonce seen within the last window is refused outright (defence in depth:
  the fresh nonces already make a replayed message fail its signature check).

The signatures are `cryptography`'s Ed25519; nothing here is home-made cryptography.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

import msgspec

from .errors import ExpiredChallengeError, MalformedChallengeError, ReplayError
from .identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, verify_signature

__all__ = [
    "NONCE_BYTES",
    "CHALLENGE_TTL_MS",
    "DOMAIN",
    "Transcript",
    "ServerChallenge",
    "answer_challenge",
    "new_nonce",
    "check_key",
    "check_nonce",
    "check_signature_size",
    "sign_transcript",
    "verify_transcript",
    "ReplayGuard",
]

NONCE_BYTES = 32
CHALLENGE_TTL_MS = 60_000
"""How long a challenge may wait for its proof (the server's clock)."""
DOMAIN = b"crdt-sync key handshake v1\x00"

_encoder = msgspec.msgpack.Encoder()


def new_nonce() -> bytes:
    """32 unpredictable bytes from the operating system."""
    return secrets.token_bytes(NONCE_BYTES)


class Transcript(msgspec.Struct, array_like=True, frozen=True):
    """Everything both signatures of one handshake cover (see the module docstring)."""

    protocol: int
    client_site: str
    server_site: str
    client_key: bytes
    server_key: bytes
    client_nonce: bytes
    server_nonce: bytes
    issued_at: int
    binding: bytes = b""

    def signed_bytes(self, role: str) -> bytes:
        """The exact bytes `role` ("server" or "client") signs."""
        if role not in ("server", "client"):
            raise ValueError(f"unknown role {role!r}")
        return DOMAIN + role.encode() + b"\x00" + _encoder.encode(self)


def _check_size(value: bytes | None, size: int, what: str) -> bytes:
    if value is None:
        raise MalformedChallengeError(f"the {what} is missing")
    if len(value) != size:
        raise MalformedChallengeError(f"the {what} is {len(value)} bytes; expected {size}")
    return value


def check_key(value: bytes | None, what: str = "public key") -> bytes:
    """Raises:
        MalformedChallengeError: missing, or not a 32-byte Ed25519 public key."""
    return _check_size(value, PUBLIC_KEY_BYTES, what)


def check_nonce(value: bytes | None, what: str = "nonce") -> bytes:
    """Raises:
        MalformedChallengeError: missing, or not 32 bytes."""
    return _check_size(value, NONCE_BYTES, what)


def check_signature_size(value: bytes | None, what: str = "signature") -> bytes:
    """Raises:
        MalformedChallengeError: missing, or not 64 bytes."""
    return _check_size(value, SIGNATURE_BYTES, what)


def sign_transcript(identity: Identity, transcript: Transcript, role: str) -> bytes:
    return identity.sign(transcript.signed_bytes(role))


def verify_transcript(public_key: bytes, signature: bytes, transcript: Transcript, role: str) -> None:
    """Raises:
        BadSignatureError: `signature` is not `role`'s signature of `transcript` by `public_key`."""
    verify_signature(public_key, signature, transcript.signed_bytes(role))


class ServerChallenge:
    """The server's side of one handshake: issued on the client's hello, settled by its proof."""

    def __init__(self, transcript: Transcript, signature: bytes, ttl_ms: int = CHALLENGE_TTL_MS):
        self.transcript = transcript
        self.signature = signature
        self.ttl_ms = ttl_ms

    @classmethod
    def issue(
        cls,
        identity: Identity,
        *,
        protocol: int,
        client_site: str,
        server_site: str,
        client_key: bytes | None,
        client_nonce: bytes | None,
        now_ms: int,
        binding: bytes = b"",
        ttl_ms: int = CHALLENGE_TTL_MS,
    ) -> "ServerChallenge":
        """A fresh challenge for the client that announced `client_key` and `client_nonce`.

        Raises:
            MalformedChallengeError: the client's key or nonce is missing or has the wrong size.
        """
        transcript = Transcript(
            protocol=protocol,
            client_site=client_site,
            server_site=server_site,
            client_key=check_key(client_key, "client's public key"),
            server_key=identity.public_key,
            client_nonce=check_nonce(client_nonce, "client's nonce"),
            server_nonce=new_nonce(),
            issued_at=now_ms,
            binding=binding,
        )
        return cls(transcript, sign_transcript(identity, transcript, "server"), ttl_ms)

    def settle(self, proof_signature: bytes | None, now_ms: int) -> None:
        """Check the client's proof.

        Raises:
            MalformedChallengeError: the signature is missing or has the wrong size.
            ExpiredChallengeError: the proof came more than `ttl_ms` after the challenge.
            BadSignatureError: it is not the client key's signature of this transcript.
        """
        signature = check_signature_size(proof_signature, "client's proof")
        age = now_ms - self.transcript.issued_at
        if age > self.ttl_ms or age < 0:
            raise ExpiredChallengeError(
                f"the proof came {age} ms after the challenge; challenges expire after {self.ttl_ms} ms"
            )
        verify_transcript(self.transcript.client_key, signature, self.transcript, "client")


def answer_challenge(
    identity: Identity,
    *,
    protocol: int,
    client_site: str,
    client_nonce: bytes,
    server_site: str,
    server_key: bytes | None,
    server_nonce: bytes | None,
    issued_at: int,
    server_signature: bytes | None,
    binding: bytes = b"",
) -> tuple[Transcript, bytes]:
    """The client's side: check the server's signature, then sign the same transcript.

    The transcript is rebuilt from what the client itself sent (its site, key and nonce) and
    its own view of the channel (`binding`), so a server — or someone between — that signed
    anything else fails here. Whether `server_key` is the *expected* key is the caller's check.

    Returns:
        The transcript and the client's proof signature.

    Raises:
        MalformedChallengeError: a field missing or of the wrong size.
        BadSignatureError: the server's signature does not verify.
    """
    transcript = Transcript(
        protocol=protocol,
        client_site=client_site,
        server_site=server_site,
        client_key=identity.public_key,
        server_key=check_key(server_key, "server's public key"),
        client_nonce=client_nonce,
        server_nonce=check_nonce(server_nonce, "server's nonce"),
        issued_at=issued_at,
        binding=binding,
    )
    verify_transcript(transcript.server_key, check_signature_size(server_signature, "server's signature"),
                      transcript, "server")
    return transcript, sign_transcript(identity, transcript, "client")


class ReplayGuard:
    """Nonces seen in the last `window_ms`, at most `capacity` of them; thread-safe.

    One per `Peer`, shared by all its sessions. When more than `capacity` handshakes happen
    within one window the oldest nonces are forgotten early (memory stays bounded); a replay
    of one of those still fails, on the signature over this side's fresh nonce.
    """

    def __init__(self, window_ms: int = CHALLENGE_TTL_MS, capacity: int = 100_000):
        self.window_ms = window_ms
        self.capacity = capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, nonce: bytes, now_ms: int) -> None:
        """Record `nonce` as used now.

        Raises:
            ReplayError: `nonce` was seen within the window.
        """
        with self._lock:
            self._forget_before(now_ms - self.window_ms)
            seen_at = self._seen.get(nonce)
            if seen_at is not None:
                raise ReplayError(
                    f"handshake nonce {nonce[:4].hex()}… was already used {now_ms - seen_at} ms ago (a replayed hello?)"
                )
            self._seen[nonce] = now_ms
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)

    def _forget_before(self, cutoff_ms: int) -> None:
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if seen_at >= cutoff_ms:
                return
            del self._seen[oldest]

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)
