"""Progress reports of a sync round: the estimate as a pure function, the `progress=` callback
of `Peer.sync_with` (in-process and WebSocket) and the CLI's `sync --progress` bar."""

from __future__ import annotations

import pytest

from engine import Database
from sync import Peer, SyncProgress, SyncResult
from sync.changes import Limits
from sync.cli import main
from sync.progress import ProgressMeter, estimate
from sync.websocket import serve

SITE = "ab" * 16


def add_topics(db: Database, prefix: str, count: int) -> None:
    """`count` topic rows, one transaction (one db_version) each."""
    for i in range(count):
        with db.transaction() as tx:
            tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES (?, 'wf', ?)", (f"{prefix}{i}", f"{prefix}{i}"))


# -- the estimate --------------------------------------------------------------------------


def test_estimate_spreads_the_remaining_changes_over_the_remaining_versions():
    result = SyncResult(
        pulled=300, pushed=100, bytes_received=1_000, bytes_sent=500, remote_site=SITE,
        remote_db_version=110, pull_from=10, pulled_upto=60,  # half of the pull span (100 versions)
        push_from=5, push_to=55, pushed_upto=30,              # half of the push span (50 versions)
    )
    progress = estimate(result, elapsed_seconds=4.0)
    assert progress == SyncProgress(
        changes=400, pulled=300, pushed=100, bytes=1_500, elapsed_seconds=4.0, rate=100.0,
        fraction=0.5, total_changes=800, eta_seconds=4.0, remote_site=SITE,
    )


def test_estimate_is_unknown_before_the_hello_and_complete_for_an_empty_round():
    before = estimate(SyncResult(), elapsed_seconds=0.0)
    assert (before.fraction, before.total_changes, before.eta_seconds, before.rate) == (None, None, None, 0.0)
    nothing_to_do = estimate(SyncResult(remote_site=SITE, remote_db_version=7, pull_from=7, pulled_upto=7,
                                        push_from=3, push_to=3, pushed_upto=3), elapsed_seconds=0.5)
    assert (nothing_to_do.fraction, nothing_to_do.total_changes, nothing_to_do.eta_seconds) == (1.0, 0, 0.0)


def test_estimate_clamps_versions_moved_past_the_span():
    # commits made during the round are pushed too: the push goes beyond push_to
    result = SyncResult(pushed=12, remote_site=SITE, remote_db_version=4, pull_from=4, pulled_upto=4,
                        push_from=0, push_to=10, pushed_upto=14)
    progress = estimate(result, elapsed_seconds=2.0)
    assert (progress.fraction, progress.total_changes, progress.eta_seconds) == (1.0, 12, 0.0)


def test_a_meter_times_the_round_with_the_clock_it_is_given():
    now = iter([100.0, 102.5])
    seen: list[SyncProgress] = []
    meter = ProgressMeter(seen.append, now=lambda: next(now))
    meter(SyncResult(pulled=50, remote_site=SITE, remote_db_version=10, pulled_upto=5))
    assert seen[0].elapsed_seconds == 2.5 and seen[0].rate == 20.0
    assert seen[0].fraction == 0.5 and seen[0].eta_seconds == 2.5


# -- the callback ------------------------------------------------------------------------------


def assert_a_sound_series(reports: list[SyncProgress], result: SyncResult, remote_site: str) -> None:
    """Counts and bytes only grow, the fraction only grows and ends at 1, the last report is
    the round's result, and somewhere in between the round was visibly part-way."""
    assert len(reports) >= 4
    for before, after in zip(reports, reports[1:]):
        assert after.changes >= before.changes and after.bytes > before.bytes
        assert after.fraction >= before.fraction
    for report in reports:
        assert report.changes == report.pulled + report.pushed
        assert report.remote_site == remote_site and report.rate >= 0
        assert 0 < report.fraction <= 1 and report.total_changes >= report.changes
    last = reports[-1]
    assert (last.pulled, last.pushed) == (result.pulled, result.pushed)
    assert (last.fraction, last.total_changes, last.eta_seconds) == (1.0, result.pulled + result.pushed, 0.0)
    assert last.bytes == result.bytes_received + result.bytes_sent
    assert any(0 < r.fraction < 1 and r.eta_seconds > 0 for r in reports)


def test_sync_with_reports_progress_in_process(open_db):
    a, b = open_db("a"), open_db("b")
    add_topics(a, "a", 20)
    add_topics(b, "b", 10)
    reports: list[SyncProgress] = []
    result = Peer(b, limits=Limits(page_changes=9)).sync_with(Peer(a), progress=reports.append)
    assert (result.pulled, result.pushed) == (60, 30)  # 3 changes per topic row
    assert_a_sound_series(reports, result, a.site_id)


def test_sync_with_a_url_reports_the_same_fields(open_db):
    hub, client = open_db("hub"), open_db("client")
    add_topics(hub, "h", 12)
    reports: list[SyncProgress] = []
    with serve(hub, peer=Peer(hub, limits=Limits(page_changes=6))) as server:
        result = Peer(client).sync_with(server.url, progress=reports.append)
    assert result.pulled == 36
    assert_a_sound_series(reports, result, hub.site_id)


# -- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--progress", None])
def test_cli_sync_draws_a_bar_with_progress_and_lines_without(capsys, tmp_path, flag):
    hub_path, client_path = tmp_path / "hub.db", tmp_path / "client.db"
    with Database.open(hub_path) as hub:
        add_topics(hub, "h", 30)
    Database.open(client_path).close()
    with Database.open(hub_path) as hub, serve(hub) as server:
        code = main(["sync", str(client_path), server.url, *([flag] if flag else [])])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() == f"pulled 90 changes, pushed 0 changes ({server.url})"
    if flag is None:  # stderr is no terminal here: one line per page, no bar
        assert "crdt-sync: ... pulled 90, pushed 0" in err and "%|" not in err
        return
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("crdt-sync: 100%|") and "| 90/90 changes, " in final, final
    assert final.endswith(" changes/s, ETA 00:00") and " MB, " in final, final
