"""Progress of a sync round: counts, bytes, rate and an estimate of what remains.

    def show(p: SyncProgress) -> None:
        print(f"{p.changes} changes, {p.bytes / 1e6:.1f} MB, {p.rate:.0f}/s, ETA {p.eta_seconds}")

    Peer(db).sync_with("ws://hub:8765", progress=show)

`progress=` of `Peer.sync_with` and `sync_with_url` is called after every page applied or
acknowledged, on the thread that runs the round, with a `SyncProgress`. (A `Session` built
by hand reports its raw `SyncResult` instead; `ProgressMeter` turns one into the other.)

What the estimate means. The protocol does not count a backlog before sending it: the
hellos carry db_versions, and each side knows its watermark for the other. So the round's
size is known as a span of db_versions — the remote's versions from our watermark for it up
to its db_version (pull), then ours from its watermark for us up to our db_version (push) —
and `fraction` is the share of that span already moved. Versions differ in size (one is a
whole transaction) and some hold nothing for this peer (its own changes coming back), so
`fraction`, `total_changes` and `eta_seconds` are estimates: they assume the changes yet to
come are spread over the remaining versions as those moved so far were, and they sharpen as
the round proceeds. A single transaction larger than a page moves in parts, and the
fraction steps over it only when its last part is applied. The counts are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from .session import SyncResult

__all__ = ["SyncProgress", "ProgressCallback", "ProgressMeter", "estimate"]


class SyncProgress(msgspec.Struct, frozen=True):
    """One progress report of a round; see the module docstring for what is estimated."""

    changes: int  # changes moved so far, both directions (pulled + pushed)
    pulled: int  # changes in pages applied here
    pushed: int  # changes in pages the remote acknowledged
    bytes: int  # bytes received plus bytes sent (encoded messages)
    elapsed_seconds: float
    rate: float  # changes per second since the round began
    fraction: float | None  # share of the round's db_version span moved, 0..1 (None: not known yet)
    total_changes: int | None  # estimated changes in the whole round (None: not known yet)
    eta_seconds: float | None  # estimated seconds left (None: not known yet)
    remote_site: str = ""


ProgressCallback = Callable[[SyncProgress], None]


def _span(start: int, end: int, reached: int) -> tuple[int, int]:
    """(versions moved, versions in the span), the moved ones clamped into the span."""
    total = max(0, end - start)
    return min(total, max(0, reached - start)), total


def estimate(result: SyncResult, elapsed_seconds: float) -> SyncProgress:
    """The progress report for `result` after `elapsed_seconds` of the round (pure)."""
    changes = result.pulled + result.pushed
    pulled = _span(result.pull_from, result.remote_db_version, result.pulled_upto)
    pushed = _span(result.push_from, result.push_to, result.pushed_upto)
    span = pulled[1] + pushed[1]
    fraction: float | None
    if not result.remote_site:
        fraction = None  # no hello yet: the spans are unknown
    else:
        fraction = (pulled[0] + pushed[0]) / span if span else 1.0
    total = eta = None
    if fraction is not None and fraction > 0:
        total = max(changes, round(changes / fraction))
        eta = elapsed_seconds * (1 - fraction) / fraction
    return SyncProgress(
        changes=changes,
        pulled=result.pulled,
        pushed=result.pushed,
        bytes=result.bytes_received + result.bytes_sent,
        elapsed_seconds=elapsed_seconds,
        rate=changes / elapsed_seconds if elapsed_seconds > 0 else 0.0,
        fraction=fraction,
        total_changes=total,
        eta_seconds=eta,
        remote_site=result.remote_site,
    )


class ProgressMeter:
    """Adapts a `SyncProgress` callback to a session's `progress=` (which gets `SyncResult`s),
    timing the round from the meter's creation. `now` is injectable for tests."""

    def __init__(self, callback: ProgressCallback, *, now: Callable[[], float] = time.monotonic):
        self.callback = callback
        self._now = now
        self._started = now()

    def __call__(self, result: SyncResult) -> None:
        self.callback(estimate(result, self._now() - self._started))

    @classmethod
    def wrap(cls, callback: ProgressCallback | None) -> "ProgressMeter | None":
        """A meter for `callback`, or None when there is no callback (no cost per page)."""
        return cls(callback) if callback is not None else None
