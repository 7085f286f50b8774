"""Child process of B6: one sync in a fresh interpreter, so its peak RSS is its own.

    python -m bench.memory ours|raw SOURCE.db TARGET.db

Opens both replicas, resets the kernel's peak-RSS mark (VmHWM) to the current RSS, runs one
sync (ours: `sync.Peer(target).sync_with(sync.Peer(source))`; raw: the raw copy), and prints
one JSON line: RSS before, peak, growth in MB, seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from engine import Database, ManualClock  # noqa: E402

from bench.data import NOW_MS, raw_copy  # noqa: E402
from bench.harness import reset_peak_rss, rss_kb  # noqa: E402

__all__ = ["measure"]


def measure(mode: str, source_path: str, target_path: str) -> dict:
    """Run one sync of `mode` and report its memory.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in ("ours", "raw"):
        raise ValueError(f"mode must be 'ours' or 'raw', not {mode!r}")
    import sync  # imported before the measurement starts, like everything else

    source = Database.open(source_path, clock=ManualClock(start_ms=NOW_MS))
    target = Database.open(target_path, clock=ManualClock(start_ms=NOW_MS))
    try:
        if mode == "ours":
            source_peer, target_peer = sync.Peer(source), sync.Peer(target)
            work = lambda: target_peer.sync_with(source_peer)  # noqa: E731
        else:
            work = lambda: raw_copy(source, target)  # noqa: E731
        reset_peak_rss()
        before, _ = rss_kb()
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        _, peak = rss_kb()
        received = target.connection.execute("SELECT count(*) FROM crsql_changes").fetchall()[0][0]
    finally:
        source.close()
        target.close()
    return {"mode": mode, "rss_before_mb": round(before / 1024, 1), "peak_mb": round(peak / 1024, 1),
            "growth_mb": round((peak - before) / 1024, 1), "seconds": round(seconds, 3), "received": received}


if __name__ == "__main__":
    print(json.dumps(measure(*sys.argv[1:4])))
