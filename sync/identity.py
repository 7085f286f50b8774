"""A replica's identity: its Ed25519 key pair, kept in the replica's own file but never replicated.

    identity = load_identity(db)          # created on first need (`crdt-sync init` creates it)
    identity.public_text                  # 'ed25519:3q2-7w...' (what `crdt-sync id` prints)
    signature = identity.sign(data)
    verify_signature(identity.public_key, signature, data)   # BadSignatureError if not

Where the private key lives, and why
------------------------------------
In `__sync_identity`, a local table of the database (`__` tables are never CRRs, so the key
never enters `crsql_changes` and never travels). The alternative, a key file beside the
database with 0600 permissions, was weighed and not chosen:

- a replica *is* one SQLite file (its site id lives inside it too); the key stays with the
  site id through moves, renames and backups, and `:memory:` or test replicas need no second
  file. A key file separated from its database would silently turn into a new identity (and
  lose every trust entry naming it) after a copy that forgot it;
- creation is one transaction (`INSERT OR IGNORE` of the single row, then read back), so two
  processes opening a new replica at once agree on one key, where two file writers would race.

The price: whoever can read the database file can read the private key. That is the same
boundary as the data (a reader of the file reads every row, and a writer of it could rewrite
them anyway), so protect the file as you would protect the key: file permissions, an
encrypted disk. A copied database file carries the same identity; copies must not run as two
replicas (sync refuses a copy with `DuplicateSiteError`). A key belongs to the site id it was
made for: a clone (`crdt-sync clone`, `Database.clone_to`) has a new site id, so it gets a key
of its own on first need, and must be trusted anew.

The key is raw Ed25519 from the `cryptography` library; no cryptography is done here.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal, overload

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from engine.database import Database

from .errors import BadSignatureError

__all__ = [
    "Identity",
    "KEY_PREFIX",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "load_identity",
    "create_identity",
    "format_public_key",
    "parse_public_key",
    "public_key_bytes",
    "verify_signature",
]

KEY_PREFIX = "ed25519:"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

_TABLE = """
CREATE TABLE IF NOT EXISTS __sync_identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    algorithm   TEXT    NOT NULL DEFAULT 'ed25519',
    private_key BLOB    NOT NULL,
    public_key  BLOB    NOT NULL,
    site_id     TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL DEFAULT 0
)
"""


class Identity:
    """An Ed25519 key pair: signs handshake transcripts as this replica."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> "Identity":
        """A new random key pair (the operating system's random source, via `cryptography`)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> "Identity":
        """Raises:
            ValueError: `raw` is not a 32-byte Ed25519 private key."""
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @property
    def public_text(self) -> str:
        """The public key as people copy it: `ed25519:` + unpadded base64url (43 characters)."""
        return format_public_key(self.public_key)

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def __repr__(self) -> str:  # never the private key
        return f"<Identity {self.public_text}>"


def format_public_key(raw: bytes) -> str:
    """`ed25519:<base64url>` for a 32-byte public key.

    Raises:
        ValueError: `raw` is not 32 bytes.
    """
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
    return KEY_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_public_key(text: str) -> bytes:
    """The 32 raw bytes of a public key written as `crdt-sync id` prints it.

    Raises:
        ValueError: no `ed25519:` prefix, not base64url, or not 32 bytes (the message says which).
    """
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"{text!r} is not a public key: expected {KEY_PREFIX}<base64url> (see `crdt-sync id`)")
    body = text[len(KEY_PREFIX):]
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{text!r} is not a public key: bad base64url ({error})") from None
    if len(raw) != PUBLIC_KEY_BYTES or format_public_key(raw) != text:
        raise ValueError(f"{text!r} is not a public key: expected {PUBLIC_KEY_BYTES} bytes in canonical base64url")
    return raw


def public_key_bytes(key: str | bytes | None) -> bytes | None:
    """A public key given as text (`ed25519:...`) or raw bytes, as raw bytes (None stays None).

    Raises:
        ValueError: not a public key.
    """
    if key is None:
        return None
    if isinstance(key, bytes):
        format_public_key(key)  # checks the size
        return key
    return parse_public_key(key)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Check an Ed25519 signature.

    Raises:
        BadSignatureError: the signature does not verify, or the key or signature has the
            wrong size.
    """
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise BadSignatureError(
            f"a signature of {len(signature)} bytes by a key of {len(public_key)} bytes cannot be Ed25519"
        )
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except InvalidSignature:
        raise BadSignatureError(
            f"the signature does not verify with {format_public_key(public_key)}"
        ) from None


@overload
def load_identity(db: Database, *, create: Literal[True] = True) -> Identity: ...


@overload
def load_identity(db: Database, *, create: bool) -> Identity | None: ...


def load_identity(db: Database, *, create: bool = True) -> Identity | None:
    """This replica's key pair, created (once, whoever asks first) if it has none of its own.

    With `create=False`, None for a replica that has no key of its own yet (none at all, or
    only the key of the replica it was cloned from).
    """
    with db.reading() as session:
        exists = session.scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '__sync_identity'")
        row = session.one("SELECT private_key, site_id FROM __sync_identity WHERE id = 1") if exists else None
    if row is not None and row[1] == db.site_id:
        return Identity.from_private_bytes(row[0])
    return create_identity(db) if create else None


def create_identity(db: Database) -> Identity:
    """Give the replica a key pair unless it has one of its own; returns the one it has
    afterwards. A key made for another site id (this file is a clone) is replaced.

    One transaction: concurrent creators (threads or processes) all end up with the same key.
    """
    candidate = Identity.generate()
    with db.transaction() as tx:
        tx.execute(_TABLE)
        tx.execute(
            "INSERT INTO __sync_identity (id, algorithm, private_key, public_key, site_id, created_at) "
            "VALUES (1, 'ed25519', ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET private_key = excluded.private_key, public_key = excluded.public_key, "
            "site_id = excluded.site_id, created_at = excluded.created_at "
            "WHERE __sync_identity.site_id IS NOT excluded.site_id",
            (candidate.private_bytes(), candidate.public_key, db.site_id, tx.now_ms()),
        )
        raw = tx.scalar("SELECT private_key FROM __sync_identity WHERE id = 1")
    return Identity.from_private_bytes(raw)
