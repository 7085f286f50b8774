"""Errors raised by the sync package.

    SyncError                      root: anything sync refuses or cannot do
    ├── ProtocolError              malformed, truncated, oversized or unexpected message (code "protocol")
    │   ├── MessageTooLargeError   a message above the size limit (code "too_large")
    │   └── InvalidChangeError     a change for an unknown table/column, a bad pk or site id (code "invalid_change")
    ├── AuthError                  missing or wrong token (code "auth")
    ├── SchemaMismatchError        the peers' CRR schemas differ (code "schema_mismatch")
    ├── ApplyError                 merging valid changes failed locally (code "apply_failed")
    ├── CorruptFileError           an export file is truncated, tampered or not ours (code "corrupt_file")
    ├── TransportError             could not connect, connection lost or closed mid-round (carries `url`)
    ├── StreamGapError             a NATS stream no longer holds changes this replica lacks (sync.nats)
    └── PeerRefusedError           the remote sent an Error message: carries `code` and `message`

A refusal received from the remote is raised as `PeerRefusedError` combined with the local
class for its code, so `except AuthError` catches a wrong token whether this side or the
remote noticed it, and `except PeerRefusedError` catches every remote refusal:

    RefusedAuthError(PeerRefusedError, AuthError), RefusedSchemaMismatchError(...), ...

`permanent` is true for errors a retry will not fix (AuthError, SchemaMismatchError and
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
    "AuthError",
    "SchemaMismatchError",
    "ApplyError",
    "CorruptFileError",
    "TransportError",
    "StreamGapError",
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


class AuthError(SyncError):
    code = "auth"
    permanent = True


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


class StreamGapError(SyncError):
    """A stream page of `origin` starts after what this replica holds of that origin: the pages
    in between left the stream (retention) before this replica read them. Nothing is applied;
    a bootstrap from a peer that holds them closes the gap (sync.nats)."""

    code = "stream_gap"
    permanent = True

    def __init__(self, origin: str, since: int, held: int, hint: str = ""):
        self.origin, self.since, self.held = origin, since, held
        super().__init__(
            f"the stream's next page of site {origin} starts after its db_version {since}, but this "
            f"replica holds its changes only up to {held}: the pages in between are no longer in the "
            f"stream" + (f"; {hint}" if hint else "")
        )


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


class RefusedSchemaMismatchError(PeerRefusedError, SchemaMismatchError):
    pass


class RefusedApplyError(PeerRefusedError, ApplyError):
    pass


_REFUSALS: dict[str, type[PeerRefusedError]] = {
    "protocol": RefusedProtocolError,
    "too_large": RefusedMessageTooLargeError,
    "invalid_change": RefusedInvalidChangeError,
    "auth": RefusedAuthError,
    "schema_mismatch": RefusedSchemaMismatchError,
    "apply_failed": RefusedApplyError,
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

