"""Where an in-process sync spends its CPU, phase by phase, next to the raw floor.

    python -m bench.phases            # B8's shape: 20,000 events rows in ONE transaction
    python -m bench.phases --per-tx 100 --rows 16667     # B3's shape: 100-row transactions

Wraps the sync's phase methods (page reads, validation, encode/decode, the merge, the merge's
executemany) to sum each one's thread CPU time over one sync, after one raw copy of the same
source (the floor, bench.data.raw_copy) for comparison. Thread CPU time, not wall time: other
processes sharing the cores do not inflate it. Used by bench/PROFILE.md; not part of `make bench`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import sync  # noqa: E402
from engine import database  # noqa: E402
from sync import changes, inbox, outbox, session  # noqa: E402

from bench.data import CHANGES_PER_EVENT, Workspace, raw_copy  # noqa: E402

__all__ = ["measure", "main"]

_PHASES: list[tuple[Any, str, str]] = [
    (outbox.Outbox, "next_page", "send: read pages (Outbox.next_page)"),
    (session, "encode", "send: encode"),
    (session, "decode", "receive: decode"),
    (changes.CrrSchema, "validate", "receive: validate"),
    (inbox.Inbox, "apply", "receive: apply (the whole merge, validation included)"),
    (database.Session, "executemany", "receive: ... of which executemany (cr-sqlite's merge)"),
]


def _wrapped(function: Callable[..., Any], label: str, spent: dict[str, float]) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - started
    return timed


def measure(rows: int, per_tx: int) -> tuple[float, float, dict[str, float]]:
    """(floor CPU s, ours CPU s, CPU s per phase) for one in-process sync of `rows` events rows
    written `per_tx` rows per transaction."""
    spent: dict[str, float] = collections.defaultdict(float)
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in _PHASES]
    with Workspace() as ws:
        source = ws.source(rows * CHANGES_PER_EVENT, rows_per_tx=per_tx)
        floor_db = ws.fresh("floor")
        started = time.thread_time()
        raw_copy(source, floor_db)
        floor = time.thread_time() - started
        ws.discard(floor_db)
        for (owner, name, label) in _PHASES:
            setattr(owner, name, _wrapped(getattr(owner, name), label, spent))
        try:
            db = ws.fresh("ours")
            started = time.thread_time()
            sync.Peer(db).sync_with(sync.Peer(source))
            ours = time.thread_time() - started
            ws.discard(db)
        finally:
            for owner, name, function in originals:
                setattr(owner, name, function)
    return floor, ours, dict(spent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="events rows (12 changes each)")
    parser.add_argument("--per-tx", type=int, default=None, help="rows per transaction (default: all in one)")
    args = parser.parse_args(argv)
    floor, ours, spent = measure(args.rows, args.per_tx or args.rows)
    print(f"{args.rows * CHANGES_PER_EVENT:,} changes: floor {floor:.3f} s, ours {ours:.3f} s "
          f"({ours / floor:.2f}x), thread CPU time")
    for label, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {seconds:7.3f} s  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
