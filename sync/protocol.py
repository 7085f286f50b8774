"""The wire protocol: frozen, tagged `msgspec.Struct` messages as MessagePack in a versioned envelope.

Every message on the wire (and every frame of an export file) is one encoded `Envelope`:

    [PROTOCOL_VERSION, [tag, field, field, ...]]        (MessagePack arrays: array_like structs)

Messages:
    Hello(site_id, schema_version, fingerprint, db_version, token, live, watermark,
          incarnation, seen_incarnation, key, nonce, can)
        First message of each side: who it is, its schema, its current db_version (for
        progress). The client's Hello carries the token and whether it wants live mode; the
        server's Hello carries `watermark`: the *client's* db_version up to which the server
        already holds the client's changes (where the client's push starts). Both carry the
        sender's `incarnation`; the server's also its record of the client: "I hold your
        changes up to `watermark`, the last ones from your `seen_incarnation`". The client
        refuses to go on if its file does not continue that history (a copy: see
        engine.lineage and DuplicateSiteError). With key authentication the client's Hello
        carries its Ed25519 public `key` and a fresh `nonce`, and the server's Hello (sent
        only after the Proof) its grant `can` ("read" or "write"; "" when the client was
        admitted by token or openly).
    Challenge(site_id, key, nonce, issued_at, signature, bound)
        The server's answer to a Hello with a key: its site, public key, fresh nonce, the time
        of issue and its signature of the session transcript (sync.challenge); `bound`: the
        transcript includes the TLS channel binding.
    Proof(signature)
        The client's signature of the same transcript. Only then does the server read its
        database and reply with its Hello.
    Pull(since, seen_incarnation)
        The client's answer to the server's Hello: send me your changes after your
        db_version `since` (the watermark the client holds for the server), the last ones
        I hold from your `seen_incarnation` (the server checks its history the same way).
    Changes(since, upto, rows, part, more_parts, caught_up)
        A page: all changes the receiver lacks with sender db_version in (since, upto], whole
        db_version groups only. A group too large for one page is sent as parts 0..n of one
        (since, upto) range, `more_parts` true on all but the last; the receiver merges the
        group in one transaction that commits with the last part (sync.inbox). `caught_up`
        marks the page that reaches the sender's db_version at the time it was read.
    Ack(upto, part, watermark, applied)
        The receiver applied (or, for a part, took) the page (upto, part); `watermark` is now its
        stored watermark for the sender; `applied` counts the changes that took effect. Acks, not
        sends, advance what the sender assumes the receiver has; an ack also acknowledges the
        pages sent before that one (sync.session). `covered` (0: no claim) is the
        *acknowledging* side's db_version up to which the page's sender now holds everything
        the acknowledging side has for it (the merge of this page only re-stamped the sender's
        own changes); the sender may store it as its watermark, saving an empty page back.
    Error(code, message)
        A refusal. The sender of an Error stops; the receiver raises the matching SyncError.

Schema evolution rule (msgspec's): new fields go last with a default; a field's type never
changes; an incompatible change bumps PROTOCOL_VERSION, which a peer refuses with a clear
error before decoding the body.

A row of a page is a 9-element array `[table, pk, cid, val, col_version, db_version,
site_id, cl, seq]` — exactly the columns of `crsql_changes`. Rows are decoded straight into
tuples (no per-change object on the hot path) that `executemany` consumes; `Change` is the
same array as a typed struct, for code that wants names.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

from .errors import MessageTooLargeError, ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "SiteHex",
    "parse_site_id",
    "ChangeRow",
    "Change",
    "Hello",
    "Challenge",
    "Proof",
    "Pull",
    "Changes",
    "Ack",
    "Error",
    "Message",
    "Envelope",
    "encode",
    "decode",
    "site_bytes",
    "site_hex",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
"""Default hard limit for one encoded message; transports must accept at least this much."""

_U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
SiteHex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]


def parse_site_id(text: str) -> str:
    """A site id as written by people or files: 32 hex characters, any case, normalized.

    Raises:
        ValueError: `text` is not a site id.
    """
    site = text.strip().lower()
    if len(site) != 32 or any(c not in "0123456789abcdef" for c in site):
        raise ValueError(f"{text!r} is not a site id (32 hex characters)")
    return site
_SiteBlob = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
_PkBlob = Annotated[bytes, msgspec.Meta(min_length=2)]
_KeyBytes = Annotated[bytes, msgspec.Meta(max_length=128)]
"""Keys, nonces, signatures: bounded here, their exact sizes checked by sync.challenge (which
raises the typed MalformedChallengeError)."""

ChangeRow = tuple[_Name, _PkBlob, _Name, Any, _U63, _U63, _SiteBlob, _U63, _U63]
"""One change as it travels: table, pk, cid, val, col_version, db_version, site_id, cl, seq.
`val` is checked (None/int/float/str/bytes) by sync.changes, msgspec cannot type a union
holding both str and bytes."""


_Incarnation = Annotated[str, msgspec.Meta(max_length=64)]


class Change(msgspec.Struct, array_like=True, frozen=True):
    """One row of `crsql_changes`, named; encodes exactly like a `ChangeRow`."""

    table: str
    pk: bytes
    cid: str
    val: Any
    col_version: int
    db_version: int
    site_id: bytes
    cl: int
    seq: int


class Hello(msgspec.Struct, tag="hello", array_like=True, frozen=True):
    site_id: SiteHex
    schema_version: _U63
    fingerprint: Annotated[str, msgspec.Meta(max_length=128)]
    db_version: _U63
    token: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    live: bool = False
    watermark: _U63 | None = None
    incarnation: _Incarnation = ""
    seen_incarnation: _Incarnation = ""
    key: _KeyBytes | None = None
    nonce: _KeyBytes | None = None
    can: Annotated[str, msgspec.Meta(max_length=16)] = ""


class Challenge(msgspec.Struct, tag="challenge", array_like=True, frozen=True):
    site_id: SiteHex
    key: _KeyBytes
    nonce: _KeyBytes
    issued_at: _U63
    signature: _KeyBytes
    bound: bool = False


class Proof(msgspec.Struct, tag="proof", array_like=True, frozen=True):
    signature: _KeyBytes


class Pull(msgspec.Struct, tag="pull", array_like=True, frozen=True):
    since: _U63
    seen_incarnation: _Incarnation = ""


class Changes(msgspec.Struct, tag="changes", array_like=True, frozen=True):
    since: _U63
    upto: _U63
    rows: list[ChangeRow]
    part: _U63 = 0
    more_parts: bool = False
    caught_up: bool = False


class Ack(msgspec.Struct, tag="ack", array_like=True, frozen=True):
    upto: _U63
    part: _U63
    watermark: _U63
    applied: _U63 = 0
    covered: _U63 = 0


class Error(msgspec.Struct, tag="error", array_like=True, frozen=True):
    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=4096)]


Message = Union[Hello, Challenge, Proof, Pull, Changes, Ack, Error]


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    v: int
    body: Message


class _Head(msgspec.Struct, array_like=True, frozen=True):
    """The envelope with its body left undecoded: read the version before trusting the rest."""

    v: int
    body: msgspec.Raw


_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(_Head)
_body_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """The wire bytes of `message` in the current envelope."""
    return _encoder.encode(Envelope(PROTOCOL_VERSION, message))


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse wire bytes into a message, checking size, envelope version and every field type.

    Raises:
        MessageTooLargeError: `data` is longer than `max_bytes` (nothing is parsed).
        ProtocolError: garbage, truncated bytes, an unknown tag, a wrong field type or an
            unsupported protocol version.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary message, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageTooLargeError(len(data), max_bytes)
    try:
        head = _head_decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as error:  # msgspec raises UnicodeDecodeError for bad UTF-8
        raise ProtocolError(f"malformed message envelope: {error}") from error
    if head.v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {head.v}; this peer speaks version {PROTOCOL_VERSION}"
        )
    try:
        message: Message = _body_decoder.decode(head.body)
        return message
    except (msgspec.DecodeError, ValueError) as error:
        raise ProtocolError(f"malformed message: {error}") from error


def site_bytes(site_hex: str) -> bytes:
    """A 32-hex-character site id as the 16-byte blob cr-sqlite stores."""
    return bytes.fromhex(site_hex)


def site_hex(site: bytes) -> str:
    return site.hex()
