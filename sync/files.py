"""The file transport, for replicas that never meet on a network.

    n = export_changes(db_a, "a-for-b.crsync", for_site=db_b.site_id)   # on A
    import_changes(db_b, "a-for-b.crsync")                               # on B, later

File layout: the 8-byte magic `CRSYNC\\x00\\x01`, then frames, each a 4-byte big-endian
length and one MessagePack value:

    FileHeader(protocol, site_id, for_site, schema_version, fingerprint, since, created_at)
    Changes ... (the same pages as on the wire: whole db_version groups, parts for big ones)
    FileTrailer(pages, changes, upto, sha256 of every byte before the trailer frame)

A file has no acknowledgement, so an export holds every change of the source except
those that originated at `for_site` (optionally only after the source db_version
`since=`). Import checks the whole file first (magic, checksum, count, schema fingerprint,
every table/column/pk, page ranges), then applies it in one transaction while hashing it
again: a truncated, tampered or foreign file raises and applies nothing. When the file was
made for this replica and starts at or before the watermark held for its source, the
watermark moves to the file's end, so the next network sync resumes after it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO, Union

import msgspec

from engine.database import Database

from .changes import INSERT_CHANGES, CrrSchema, Limits, report_merge
from .outbox import Outbox
from .watermarks import ensure_tables, received_watermark, store_received
from .errors import CorruptFileError, SchemaMismatchError, SyncError
from .protocol import PROTOCOL_VERSION, ChangeRow, Changes, SiteHex, parse_site_id

if TYPE_CHECKING:
    from hashlib import _Hash  # the type of hashlib.sha256() (named only in the stubs)

__all__ = ["export_changes", "import_changes", "FileHeader", "FileTrailer", "MAGIC"]

MAGIC = b"CRSYNC\x00\x01"
_LENGTH = struct.Struct(">I")
_NO_SITE = "0" * 32  # a site id no replica has: export everything


class FileHeader(msgspec.Struct, tag="file_header", array_like=True, frozen=True):
    protocol: int
    site_id: SiteHex
    for_site: SiteHex | None
    schema_version: int
    fingerprint: str
    since: int
    created_at: int
    incarnation: str = ""  # the exporter's (engine.lineage), recorded with its watermark


class FileTrailer(msgspec.Struct, tag="file_trailer", array_like=True, frozen=True):
    pages: int
    changes: int
    upto: int
    sha256: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Union[FileHeader, Changes, FileTrailer])


def export_changes(
    db: Database,
    path: str | os.PathLike[str],
    for_site: str | None = None,
    *,
    since: int = 0,
    limits: Limits | None = None,
) -> int:
    """Write the changes `for_site` may lack (all but its own, after db_version `since`) to
    `path`; return how many. The file appears atomically (written aside, then renamed).

    Raises:
        ValueError: `for_site` is not a 32-hex-character site id, or is this replica's.
    """
    if for_site is not None:
        for_site = parse_site_id(for_site)
        if for_site == db.site_id:
            raise ValueError("for_site is this replica itself: it has all its own changes")
    ensure_tables(db)
    limits = limits or Limits()
    path = Path(path)
    aside = path.with_name(path.name + ".part")
    header = FileHeader(PROTOCOL_VERSION, db.site_id, for_site, db.schema_version, db.schema_fingerprint,
                        since, db.clock.now_ms(), db.incarnation)
    outbox = Outbox(db, for_site or _NO_SITE, since, limits)
    outbox.ceiling = db.db_version
    digest = hashlib.sha256(MAGIC)
    pages = changes = 0
    try:
        with open(aside, "wb") as out:
            out.write(MAGIC)
            _write_frame(out, digest, header)
            while (page := outbox.next_page(marker=False)) is not None:
                _write_frame(out, digest, page)
                pages, changes = pages + 1, changes + len(page.rows)
                if not page.more_parts:
                    outbox.acknowledged(page.upto)
            _write_frame(out, None, FileTrailer(pages, changes, outbox.scanned, digest.digest()))
            out.flush()
            os.fsync(out.fileno())
        os.replace(aside, path)
    finally:
        outbox.close()
        aside.unlink(missing_ok=True)
    return changes


def import_changes(db: Database, path: str | os.PathLike[str]) -> int:
    """Apply an export file to `db` in one transaction; return the number of changes in it.

    Raises:
        CorruptFileError: not an export file, truncated, tampered (checksum, count, ranges)
            or holding a change this schema cannot hold; nothing is applied.
        SchemaMismatchError: the file was made from a replica with another CRR schema.
    """
    ensure_tables(db)
    schema = CrrSchema.load(db)
    path = str(path)
    header, trailer = _verify(db, path, schema)
    with db.transaction() as tx:
        digest = hashlib.sha256(MAGIC)
        with open(path, "rb") as src:
            for item in _frames(src, path, digest):
                rows = _foreign(item.rows, schema.own_site) if isinstance(item, Changes) else None
                if rows:
                    tx.executemany(INSERT_CHANGES, rows)
                    report_merge(db, tx, ((r[0], r[1]) for r in rows))
        if digest.digest() != trailer.sha256:
            raise CorruptFileError(path, "the file changed while it was being imported")
        if header.for_site == db.site_id and header.since <= received_watermark(db, header.site_id, tx):
            store_received(tx, header.site_id, trailer.upto, header.incarnation)
    return trailer.changes


def _foreign(rows: list[ChangeRow], own_site: bytes) -> list[ChangeRow]:
    """The rows of a page that are not this replica's own changes. A file made for every
    replica (no `for_site`) may hold ours: they are skipped, never merged as if they were
    new local writes (which a forged one would be)."""
    return [row for row in rows if row[6] != own_site]


def _write_frame(out: BinaryIO, digest: _Hash | None, message: msgspec.Struct) -> None:
    data = _encoder.encode(message)
    frame = _LENGTH.pack(len(data)) + data
    out.write(frame)
    if digest is not None:
        digest.update(frame)


def _frames(
    src: BinaryIO, path: str, digest: _Hash, max_frame: int = Limits().max_message_bytes
) -> Iterator[FileHeader | Changes | FileTrailer]:
    """Decoded frames after the magic; the trailer is yielded last and not hashed.

    Raises:
        CorruptFileError: bad magic, a truncated or oversized frame, an undecodable frame.
    """
    if src.read(len(MAGIC)) != MAGIC:
        raise CorruptFileError(path, "not a sync export file (bad magic)")
    while True:
        prefix = src.read(_LENGTH.size)
        if not prefix:
            return
        if len(prefix) < _LENGTH.size:
            raise CorruptFileError(path, "truncated frame length")
        (size,) = _LENGTH.unpack(prefix)
        if size > max_frame:
            raise CorruptFileError(path, f"frame of {size} bytes exceeds the {max_frame}-byte limit")
        data = src.read(size)
        if len(data) < size:
            raise CorruptFileError(path, "truncated frame")
        try:
            item = _decoder.decode(data)
        except (msgspec.DecodeError, ValueError) as error:  # bad UTF-8 raises UnicodeDecodeError
            raise CorruptFileError(path, f"undecodable frame: {error}") from error
        if not isinstance(item, FileTrailer):
            digest.update(prefix + data)
        yield item


def _verify(db: Database, path: str, schema: CrrSchema) -> tuple[FileHeader, FileTrailer]:
    """Read the whole file once without applying anything; return its header and trailer.

    Raises:
        CorruptFileError, SchemaMismatchError: see `import_changes`.
    """
    digest = hashlib.sha256(MAGIC)
    header = trailer = None
    pages = changes = 0
    upto = 0
    try:
        src = open(path, "rb")
    except OSError as error:
        raise CorruptFileError(path, f"cannot be read ({error.strerror})") from error
    with src:
        for item in _frames(src, path, digest):
            if trailer is not None:
                raise CorruptFileError(path, "data after the trailer")
            if header is None:
                if not isinstance(item, FileHeader):
                    raise CorruptFileError(path, "the first frame is not a file header")
                header = _check_header(db, path, item)
                upto = header.since
            elif isinstance(item, FileTrailer):
                trailer = item
            elif isinstance(item, Changes):
                upto = _check_page(path, schema, item, upto)
                pages, changes = pages + 1, changes + len(item.rows)
            else:
                raise CorruptFileError(path, "a second file header")
    if header is None or trailer is None:
        raise CorruptFileError(path, "truncated: no trailer")
    if digest.digest() != trailer.sha256:
        raise CorruptFileError(path, "checksum mismatch (the file was modified)")
    if (trailer.pages, trailer.changes, trailer.upto) != (pages, changes, upto):
        raise CorruptFileError(path, "the trailer does not match the pages")
    return header, trailer


def _check_header(db: Database, path: str, header: FileHeader) -> FileHeader:
    if header.protocol != PROTOCOL_VERSION:
        raise CorruptFileError(path, f"protocol version {header.protocol}, this code reads {PROTOCOL_VERSION}")
    if header.site_id == db.site_id:
        raise CorruptFileError(path, "the file was exported by this very replica")
    if header.fingerprint != db.schema_fingerprint:
        raise SchemaMismatchError(
            f"{path} was exported from schema version {header.schema_version} (fingerprint "
            f"{header.fingerprint}); this replica has version {db.schema_version} "
            f"(fingerprint {db.schema_fingerprint}); nothing was imported",
            local_fingerprint=db.schema_fingerprint,
            remote_fingerprint=header.fingerprint,
            local_version=db.schema_version,
            remote_version=header.schema_version,
        )
    return header


def _check_page(path: str, schema: CrrSchema, page: Changes, upto: int) -> int:
    """Validate one page and its place in the chain; return the chain's new end."""
    if page.since > upto:
        raise CorruptFileError(path, f"a page starts at {page.since} after the previous page ended at {upto}")
    try:
        schema.validate(_foreign(page.rows, schema.own_site), page.since, page.upto)
    except SyncError as error:
        raise CorruptFileError(path, f"invalid change: {error}") from error
    return max(upto, page.upto) if not page.more_parts else upto
