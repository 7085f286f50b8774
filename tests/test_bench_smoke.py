"""The benchmark harness still runs: `bench/run.py` in quick mode on B1 and B2.

Timings are never asserted (benchmarks are not timed tests, DESIGN.md §10); what is checked is
that the script runs as `make bench` runs it, measures both sides, prints the table and writes
a results file with the machine facts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_run_of_b1_b2_prints_table_and_writes_results(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "BENCH_QUICK": "1"}
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "B1,B2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "| B1 " in completed.stdout and "| B2 " in completed.stdout
    document = json.loads(out.read_text())
    assert document["settings"]["quick"] is True
    assert document["settings"]["selected"] == ["B1", "B2"]
    assert document["machine"]["cr-sqlite"] == "0.16.3"
    assert {"cpu_count", "python", "apsw", "sqlite", "msgspec", "websockets", "date"} <= set(document["machine"])
    rows = {row["id"]: row for row in document["rows"]}
    assert set(rows) == {"B1", "B2"}
    for row in rows.values():
        assert row["reps"] == 2
        assert len(row["samples_ours"]) == len(row["samples_baseline"]) == 2
        assert row["ours"] > 0 and row["baseline"] > 0
        assert row["ratio"] == row["ours"] / row["baseline"]
    assert rows["B1"]["target"] == "ratio <= 1.5" and isinstance(rows["B1"]["met"], bool)


def test_unknown_benchmark_id_is_refused(tmp_path):
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "B1,B99", "--out", str(tmp_path / "r.json")],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode != 0
    assert "unknown benchmark(s) B99" in completed.stderr
    assert not (tmp_path / "r.json").exists()


def test_quick_run_of_b8_measures_each_authentication_mode(tmp_path):
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "B10", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    rows = {row["id"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"B10-keys", "B10-tls"}
    for row in rows.values():
        assert row["unit"] == "ms" and row["ours"] > 0 and row["baseline"] > 0 and not row["notes"].startswith("failed")


def test_quick_run_of_the_two_process_rows_b5_b8(tmp_path):
    """B5 (hub and clients in three processes, with its hop breakdown) and B8 (a huge
    transaction, in-process and over WebSocket between two processes) run and report."""
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "B5,B8", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    rows = {row["id"]: row for row in json.loads(out.read_text())["rows"]}
    assert {"B5-p50", "B5-hub-p50", "B5-relay-p50", "B8", "B8-pull", "B8-push"} <= set(rows)
    assert all(row["ours"] > 0 and not row["notes"].startswith("failed") for row in rows.values())
    assert all("changes/s" in rows[b]["notes"] for b in ("B8", "B8-pull", "B8-push"))
    assert "B5 hop breakdown" in completed.stdout
    for hop in ("read", "merge", "commit", "handoff"):
        assert any(line.split()[:1] == [hop] for line in completed.stdout.splitlines()), hop
