"""Many replicas on NATS JetStream: changesets through a durable stream instead of a hub.

    import sync.nats
    with sync.nats.replicate(db, "nats://127.0.0.1:4222", name="app") as replica:
        replica.wait_connected(10)
        ...                                  # commits are published, everyone's are merged

Topology (for database name `app`):

    replica A ──publish own pages──▶ crdt.app.<A> ─┐
    replica B ──publish own pages──▶ crdt.app.<B> ─┼─▶ stream CRDT_app (crdt.app.>) ──▶ durable consumer per replica
    replica C ──publish own pages──▶ crdt.app.<C> ─┘

Each replica publishes only the changes it originated (whole db_version groups as the protocol's
msgspec `Changes` pages, parts for a group larger than a message) and reads every page of the
others through its own durable consumer, merging each through the same Inbox as the WebSocket
protocol: validated, merged and the origin's watermark stored in one transaction; the stream
position to resume from is stored after the merges it follows.

Guarantees:
- Exactly-once effect: delivery is at-least-once (acks follow commits; a redelivery or a
  republished page is recognised by the origin's watermark and applied as nothing).
- Per-origin order: one origin's pages are applied in its commit order; pages of different
  origins interleave in stream order. cr-sqlite converges whatever the interleaving.
- Transactions stay atomic: a group is applied in one transaction, split groups included.
- Restarts lose nothing: origin watermarks commit with the merges (`__sync_peers` under
  `nats:<site id>`), the resume point after them (`__sync_nats_positions`), the published
  position only after the server stored the page.
- After retention drops pages a replica still lacks, it never skips them: it bootstraps from a
  WebSocket peer (sync.nats.bootstrap explains why that is safe) or stops with
  `StreamGapError`.

- Copied files are noticed, not silently merged: every message names the publishing file's
  incarnation (engine.lineage), and a replica that reads, on its own subject, a page from an
  incarnation it does not continue, or finds its consumer (named after its site id) taken
  over by another process, stops with `DuplicateSiteError` (sync.nats.receiving, .consuming).

Not covered: changes that reach a replica only over WebSocket from a replica that is not on the
stream are merged there but not published (only origins publish); put every writer on the
stream. Copy detection needs both files on the stream with the other's page still in it;
until one stops, other replicas may already have merged one file's page and skipped the
other's for the same versions (see the README, "Many replicas: NATS JetStream").
"""

from __future__ import annotations

from ..errors import StreamGapError
from .bootstrap import Checkpoint
from .layout import NatsOptions, bucket_name, check_name, consumer_name, stream_name, subject_for
from .replica import NatsReplica, replicate

__all__ = [
    "replicate",
    "NatsReplica",
    "NatsOptions",
    "StreamGapError",
    "Checkpoint",
    "check_name",
    "stream_name",
    "subject_for",
    "consumer_name",
    "bucket_name",
]
