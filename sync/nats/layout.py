"""The JetStream layout of one replicated database: names, the stream, the consumers, the bucket.

For a database name `app` (the fleet's shared name, not a file name):

    stream   CRDT_app             subjects crdt.app.>   (file storage; created if missing)
    subject  crdt.app.<site id>   the pages one replica publishes: its own changes only
    consumer r-<site id>          one durable push consumer per replica, over crdt.app.>
    bucket   CRDT_app_checkpoints key <site id>: what that replica held at a db_version (bootstrap)

A name is 1-64 characters of letters, digits, `_` and `-`: it must be one subject token and
part of a stream and a bucket name. A stream created elsewhere (an operator choosing its
retention, replicas or placement) is used as it is, provided it covers `crdt.<name>.>`.

`NatsOptions` holds the knobs of the connection, the consumer and the checkpoints.

Every published message carries three headers: `Nats-Msg-Id` (the server drops a republished id
inside the stream's duplicate window), `Crdt-Schema` (`<version>:<fingerprint>` of the
publisher's CRR schema; a receiver with another schema refuses the page) and
`Crdt-Incarnation` (the publishing file's incarnation, engine.lineage; recorded with the
origin's watermark, and how a replica notices another file publishing under its site id).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from ..changes import Limits
from ..errors import ProtocolError, SyncError

__all__ = [
    "NatsOptions",
    "SCHEMA_HEADER",
    "MSG_ID_HEADER",
    "INCARNATION_HEADER",
    "check_name",
    "stream_name",
    "subject_for",
    "origin_of",
    "consumer_name",
    "bucket_name",
    "ensure_stream",
    "ensure_bucket",
    "pin_consumer",
    "limits_for",
    "TRANSIENT_ERRORS",
    "retry_transient",
    "RunDb",
]

log = logging.getLogger("sync.nats")
_T = TypeVar("_T")

RunDb = Callable[..., Awaitable[Any]]
"""`await run_db(fn, *args)`: run `fn` on the replica's database thread (sync.nats.replica)."""

SCHEMA_HEADER = "Crdt-Schema"
MSG_ID_HEADER = "Nats-Msg-Id"
INCARNATION_HEADER = "Crdt-Incarnation"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SITE = re.compile(r"^[0-9a-f]{32}$")

TRANSIENT_ERRORS = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.FlushTimeoutError,
    nats.errors.NoServersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    TimeoutError,
    OSError,
)
"""What a lost or restarting server raises: retried after a backoff, never fatal."""


class NatsOptions(msgspec.Struct, frozen=True):
    """Tuning; the defaults suit a fleet on a LAN or the Internet."""

    connect_timeout: float = 2.0      # seconds for one connection attempt
    reconnect_wait: float = 0.25      # first backoff between attempts (doubles, capped at 5 s)
    api_timeout: float = 5.0          # JetStream API calls and publish acknowledgements
    ack_wait: float = 60.0            # a delivered, unacknowledged message is redelivered after this
    max_ack_pending: int = 64         # messages in flight to this replica (bounds its memory)
    idle_check: float = 10.0          # idle this long: check that the consumer still delivers
    checkpoint_interval: float = 1.0  # seconds between checkpoint writes while merging
    bootstrap_attempts: int = 3       # bootstraps tried for one gap before giving up


def check_name(name: str) -> str:
    """`name` if it can name a replicated database on NATS.

    Raises:
        ValueError: it is empty, too long or has characters other than letters, digits, _ and -.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"database name {name!r} for NATS must be 1-64 letters, digits, '_' or '-'")
    return name


def stream_name(name: str) -> str:
    return f"CRDT_{check_name(name)}"


def subject_for(name: str, site_id: str) -> str:
    """The subject `site_id` publishes its own changes on."""
    return f"crdt.{check_name(name)}.{site_id}"


def _filter(name: str) -> str:
    return f"crdt.{check_name(name)}.>"


def origin_of(name: str, subject: str) -> str:
    """The site id a message's subject names as its origin.

    Raises:
        ProtocolError: the subject is not `crdt.<name>.<site id>`.
    """
    prefix = f"crdt.{name}."
    site = subject[len(prefix):] if subject.startswith(prefix) else ""
    if not _SITE.match(site):
        raise ProtocolError(f"message on subject {subject!r}: expected {prefix}<site id, 32 lowercase hex>")
    return site


def consumer_name(site_id: str) -> str:
    return f"r-{site_id}"


def bucket_name(name: str) -> str:
    return f"CRDT_{check_name(name)}_checkpoints"


async def ensure_stream(js: JetStreamContext, name: str) -> api.StreamInfo:
    """The stream of `name`, created (file storage, default limits) when missing.

    Raises:
        SyncError: a stream of that name exists but does not cover `crdt.<name>.>`.
    """
    stream = stream_name(name)
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        config = api.StreamConfig(name=stream, subjects=[_filter(name)], storage=api.StorageType.FILE)
        try:
            return await js.add_stream(config)
        except nats.js.errors.BadRequestError:  # another replica created it meanwhile
            info = await js.stream_info(stream)
    if _filter(name) not in (info.config.subjects or []):
        raise SyncError(f"stream {stream} exists with subjects {info.config.subjects}, not {_filter(name)}")
    return info


async def ensure_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """The checkpoint bucket of `name` (a JetStream key-value bucket keeping one value per key)."""
    bucket = bucket_name(name)
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(api.KeyValueConfig(bucket=bucket, history=1))


async def pin_consumer(js: JetStreamContext, name: str, site_id: str, start_seq: int, *, deliver_subject: str,
                       ack_wait: float, max_ack_pending: int,
                       deliver: Callable[[Msg], Awaitable[None]]) -> JetStreamContext.PushSubscription:
    """(Re)create this replica's durable consumer so that it delivers from stream sequence
    `start_seq` on, and subscribe `deliver` to it (`deliver_subject`: a fresh inbox of the
    connection, so nothing still in flight to an earlier pinning arrives on the new
    subscription). At most `max_ack_pending` messages are in flight to the replica: that bounds
    what it buffers, so the consumer needs no flow control.

    The replica owns its position: `start_seq` comes from its database, where it commits in the
    same transaction as the merge it follows. The server's ack floor can lag that (acks in
    flight when a connection drops), so the consumer is re-pinned rather than trusted.
    """
    stream, durable = stream_name(name), consumer_name(site_id)
    try:
        await js.delete_consumer(stream, durable)
    except nats.js.errors.NotFoundError:
        pass
    config = api.ConsumerConfig(
        durable_name=durable,
        deliver_subject=deliver_subject,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_ack_pending=max_ack_pending,
        filter_subject=_filter(name),
    )
    info = await js.add_consumer(stream, config)
    return await js.subscribe_bind(stream, info.config, durable, cb=deliver, manual_ack=True)


def limits_for(max_payload: int, limits: Limits | None = None) -> Limits:
    """Page limits whose encoded pages fit the server's `max_payload`.

    A page's byte bound is soft (it stops after the row that crosses it), so the bound is half
    the payload: a page overshoots it by one row at most. A single change larger than that
    half still fails to publish, with an error naming the server's limit.
    """
    base = limits or Limits()
    return Limits(
        page_changes=base.page_changes,
        page_bytes=min(base.page_bytes, max_payload // 2),
        max_message_bytes=min(base.max_message_bytes, max_payload),
    )


async def retry_transient(operation: Callable[[], Awaitable[_T]], *, what: str,
                          initial: float = 0.05, cap: float = 2.0) -> _T:
    """`await operation()` until it does not fail with a transient error (`TRANSIENT_ERRORS`:
    a lost or restarting server), backing off exponentially up to `cap` seconds. Anything else
    propagates, and so does cancellation."""
    delay = initial
    while True:
        try:
            return await operation()
        except TRANSIENT_ERRORS as error:
            log.debug("%s: %s; retrying in %.2fs", what, str(error) or type(error).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)
