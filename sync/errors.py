"""Errors raised by the sync package.

    SyncError                      root: anything sync refuses or cannot do
    ├── ProtocolError              malformed, truncated, oversized or unexpected message (code "protocol")
    │   ├── MessageTooLargeError   a message above the size limit (code "too_large")
    │   ├── InvalidChangeError     a change for an unknown table/column, a bad pk or site id (code "invalid_change")
    │   └── MalformedChallengeError  a key handshake field of the wrong size or out of turn (code "bad_challenge")
    ├── AuthError                  missing or wrong token, no key where one is required (code "auth")
    │   ├── UnknownPeerError       the client's public key is not in the trust list (code "unknown_peer")
    │   ├── UntrustedServerError   the server proved no key, or not the expected one (code "untrusted_server")
    │   ├── BadSignatureError      a handshake signature does not verify (code "bad_signature")
    │   ├── ReplayError            a handshake nonce seen before within its window (code "replay"; retryable)
    │   ├── ExpiredChallengeError  the challenge was answered too late (code "expired_challenge"; retryable)
    │   └── NotAuthorizedError     a trusted peer wrote beyond its grant: read-only or a table not
    │                              on its list (code "not_authorized"; carries `table`, `peer_name`)
    ├── SchemaMismatchError        the peers' CRR schemas differ (code "schema_mismatch")
    ├── DuplicateSiteError         two database files share one site id: a copy (code "duplicate_site")
    ├── ApplyError                 merging valid changes failed locally (code "apply_failed")
    ├── CorruptFileError           an export file is truncated, tampered or not ours (code "corrupt_file")
    ├── TransportError             could not connect, connection lost or closed mid-round (carries `url`)
    │   └── TLSError               TLS failed: ws:// against a TLS server or the reverse, a refused certificate
    └── PeerRefusedError           the remote sent an Error message: carries `code` and `message`

A refusal received from the remote is raised as `PeerRefusedError` combined with the local
class for its code, so `except AuthError` catches a wrong token whether this side or the
remote noticed it, and `except PeerRefusedError` catches every remote refusal:

    RefusedAuthError(PeerRefusedError, AuthError), RefusedSchemaMismatchError(...), ...

`permanent` is true for errors a retry will not fix (AuthError and its subclasses except
ReplayError and ExpiredChallengeError, SchemaMismatchError, DuplicateSiteError, TLSError, and
their refusals): a reconnecting client stops on them.

Every error has a `code` (the wire code sent in an `Error` message) and its facts as
attributes (table, column, fingerprints, site ids, ...).
"""

from __future__ import annotations

__all__ = [
    "SyncError",
    "ProtocolError",
    "MessageTooLargeError",
    "InvalidChangeError",
    "MalformedChallengeError",
    "AuthError",
    "UnknownPeerError",
    "UntrustedServerError",
    "BadSignatureError",
    "ReplayError",
    "ExpiredChallengeError",
    "NotAuthorizedError",
    "SchemaMismatchError",
    "DuplicateSiteError",
    "ApplyError",
    "CorruptFileError",
    "TransportError",
    "TLSError",
    "PeerRefusedError",
    "refusal",
]


class SyncError(Exception):
    """Root of every error the sync package raises on purpose."""

    code = "error"
    permanent = False

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class ProtocolError(SyncError):
    """A message that does not follow the protocol (garbage, truncated, wrong types, out of order)."""

    code = "protocol"


class MessageTooLargeError(ProtocolError):
    code = "too_large"
    size = limit = 0  # class defaults: a remote refusal carries only code and message

    def __init__(self, size: int, limit: int, what: str = "message"):
        self.size, self.limit = size, limit
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")


class InvalidChangeError(ProtocolError):
    """A change this replica's schema cannot hold; nothing of its page is applied."""

    code = "invalid_change"
    table = column = ""

    def __init__(self, message: str, *, table: str = "", column: str = ""):
        self.table, self.column = table, column
        super().__init__(message)


class MalformedChallengeError(ProtocolError):
    """A key-handshake field of the wrong size, missing, or a handshake message out of turn."""

    code = "bad_challenge"


class AuthError(SyncError):
    """The peer did not prove who it is (token or key); nothing was read or applied."""

    code = "auth"
    permanent = True


class UnknownPeerError(AuthError):
    """The client's public key is not in this replica's trust list (`crdt-sync trust`)."""

    code = "unknown_peer"
    public_key = ""

    def __init__(self, message: str, *, public_key: str = ""):
        self.public_key = public_key
        super().__init__(message)


class UntrustedServerError(AuthError):
    """The server proved no key, or a key other than the one this client expects."""

    code = "untrusted_server"
    public_key = ""

    def __init__(self, message: str, *, public_key: str = ""):
        self.public_key = public_key
        super().__init__(message)


class BadSignatureError(AuthError):
    """A handshake signature does not verify with the key the peer announced."""

    code = "bad_signature"


class ReplayError(AuthError):
    """A handshake nonce this side saw before within its window: a recorded hello sent again.
    A genuine peer's next attempt uses a fresh nonce, so a retry may succeed."""

    code = "replay"
    permanent = False


class ExpiredChallengeError(AuthError):
    """The answer to a challenge came after the challenge expired; a new connection gets a
    new challenge."""

    code = "expired_challenge"
    permanent = False


class NotAuthorizedError(AuthError):
    """A trusted peer tried to write what its grant does not allow (it is read-only, or the
    table is not on its list). The whole page is refused and nothing of it is applied."""

    code = "not_authorized"
    table = peer_name = ""

    def __init__(self, message: str, *, table: str = "", peer_name: str = ""):
        self.table, self.peer_name = table, peer_name
        super().__init__(message)


class SchemaMismatchError(SyncError):
    code = "schema_mismatch"
    permanent = True
    local_fingerprint = remote_fingerprint = ""
    local_version = remote_version = 0

    def __init__(
        self,
        message: str,
        *,
        local_fingerprint: str = "",
        remote_fingerprint: str = "",
        local_version: int = 0,
        remote_version: int = 0,
    ):
        self.local_fingerprint, self.remote_fingerprint = local_fingerprint, remote_fingerprint
        self.local_version, self.remote_version = local_version, remote_version
        super().__init__(message)


class DuplicateSiteError(SyncError):
    """Two database files use one site id (a copied file, a restored backup): their writes
    would share db_versions and peers would skip some of them. Nothing was exchanged. The fix:
    give the copy a site id of its own with `crdt-sync clone SRC DST` (`Database.clone_to`)."""

    code = "duplicate_site"
    permanent = True
    site_id = ""

    def __init__(self, message: str, *, site_id: str = ""):
        self.site_id = site_id
        super().__init__(message)


class ApplyError(SyncError):
    """Valid changes could not be merged here (disk full, lock timeout, ...); rolled back."""

    code = "apply_failed"


class CorruptFileError(SyncError):
    code = "corrupt_file"

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}; nothing was imported")


class TransportError(SyncError):
    """The connection could not be made or broke before the round finished (retryable)."""

    code = "transport"

    def __init__(self, message: str, *, url: str = ""):
        self.url = url
        super().__init__(message)


class TLSError(TransportError):
    """TLS could not be set up: a ws:// client against a wss:// server (or the reverse), or a
    certificate the client refused. Retrying the same way will not help."""

    code = "tls"
    permanent = True


class PeerRefusedError(SyncError):
    """The remote peer answered with an Error message."""

    code = "refused"

    def __init__(self, code: str, message: str, *, peer: str = ""):
        self.code = code
        self.remote_message = message
        self.peer = peer
        who = f"peer {peer}" if peer else "the peer"
        super().__init__(f"{who} refused ({code}): {message}")


class RefusedProtocolError(PeerRefusedError, ProtocolError):
    pass


class RefusedMessageTooLargeError(PeerRefusedError, MessageTooLargeError):
    pass


class RefusedInvalidChangeError(PeerRefusedError, InvalidChangeError):
    pass


class RefusedAuthError(PeerRefusedError, AuthError):
    pass


class RefusedMalformedChallengeError(PeerRefusedError, MalformedChallengeError):
    pass


class RefusedUnknownPeerError(PeerRefusedError, UnknownPeerError):
    pass


class RefusedUntrustedServerError(PeerRefusedError, UntrustedServerError):
    pass


class RefusedBadSignatureError(PeerRefusedError, BadSignatureError):
    pass


class RefusedReplayError(PeerRefusedError, ReplayError):
    pass


class RefusedExpiredChallengeError(PeerRefusedError, ExpiredChallengeError):
    pass


class RefusedNotAuthorizedError(PeerRefusedError, NotAuthorizedError):
    pass


class RefusedSchemaMismatchError(PeerRefusedError, SchemaMismatchError):
    pass


class RefusedApplyError(PeerRefusedError, ApplyError):
    pass


class RefusedDuplicateSiteError(PeerRefusedError, DuplicateSiteError):
    pass


_REFUSALS: dict[str, type[PeerRefusedError]] = {
    "protocol": RefusedProtocolError,
    "too_large": RefusedMessageTooLargeError,
    "invalid_change": RefusedInvalidChangeError,
    "bad_challenge": RefusedMalformedChallengeError,
    "auth": RefusedAuthError,
    "unknown_peer": RefusedUnknownPeerError,
    "untrusted_server": RefusedUntrustedServerError,
    "bad_signature": RefusedBadSignatureError,
    "replay": RefusedReplayError,
    "expired_challenge": RefusedExpiredChallengeError,
    "not_authorized": RefusedNotAuthorizedError,
    "schema_mismatch": RefusedSchemaMismatchError,
    "apply_failed": RefusedApplyError,
    "duplicate_site": RefusedDuplicateSiteError,
}


def refusal(code: str, message: str, *, peer: str = "") -> PeerRefusedError:
    """The exception for an Error(code, message) received from `peer`.

    The instance is a `PeerRefusedError` and, for a known code, also the local class of that
    code (an unknown code gives a plain `PeerRefusedError`). Only `PeerRefusedError.__init__`
    runs, so leaf fields such as `table` are left at their class defaults.
    """
    cls = _REFUSALS.get(code, PeerRefusedError)
    error = cls.__new__(cls)
    PeerRefusedError.__init__(error, code, message, peer=peer)
    return error

