"""Errors raised by the sync package.

    SyncError                      root: anything sync refuses or cannot do
    ├── ProtocolError              malformed, truncated, oversized or unexpected message (code "protocol")
    │   ├── MessageTooLargeError   a message above the size limit (code "too_large")
    │   └── InvalidChangeError     a change for an unknown table/column, a bad pk or site id (code "invalid_change")
    ├── AuthError                  missing or wrong token (code "auth")
    ├── SchemaMismatchError        the peers' CRR schemas differ (code "schema_mismatch")
    ├── DuplicateSiteError         two database files share one site id: a copy (code "duplicate_site")
    ├── ApplyError                 merging valid changes failed locally (code "apply_failed")
    ├── CorruptFileError           an export file is truncated, tampered or not ours (code "corrupt_file")
    ├── TransportError             could not connect, connection lost or closed mid-round (carries `url`)
    └── PeerRefusedError           the remote sent an Error message: carries `code` and `message`

A refusal received from the remote is raised as `PeerRefusedError` combined with the local
class for its code, so `except AuthError` catches a wrong token whether this side or the
remote noticed it, and `except PeerRefusedError` catches every remote refusal:

    RefusedAuthError(PeerRefusedError, AuthError), RefusedSchemaMismatchError(...), ...

`permanent` is true for errors a retry will not fix (AuthError, SchemaMismatchError,
DuplicateSiteError and their refusals): a reconnecting client stops on them.

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
    "DuplicateSiteError",
    "ApplyError",
    "CorruptFileError",
    "TransportError",
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


class RefusedDuplicateSiteError(PeerRefusedError, DuplicateSiteError):
    pass


_REFUSALS: dict[str, type[PeerRefusedError]] = {
    "protocol": RefusedProtocolError,
    "too_large": RefusedMessageTooLargeError,
    "invalid_change": RefusedInvalidChangeError,
    "auth": RefusedAuthError,
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

