"""The pytest plugin of sync.testing, run on generated test files with pytester: it is
registered by the entry point, reads the marker and the command-line options, and a
failing test's report carries the seed, the replay command and the schedule.

Inner runs leave out the Hypothesis plugin (its terminal summary imports all of
Hypothesis, seconds per run) and the cache; each run checks several tests."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import hypothesis  # noqa: F401  imported once here, not again by every inner run

pytest_plugins = ["pytester"]

NOTES_APP = Path(__file__).resolve().parent.parent / "examples" / "notes_app" / "migrations"

PASSING = f"""
import pytest

OPENED = []

@pytest.mark.cluster(n=2, seed=5, schema_dir={str(NOTES_APP)!r})
def test_marker(cluster, replicas):
    assert (cluster.n, cluster.seed, cluster.schema_dir.name) == (2, 5, "migrations")
    assert len(replicas) == 2 and replicas[1] is cluster.replica(1)
    old = replicas[1]
    cluster.restart(1)
    assert replicas[1] is not old and replicas[1] is cluster.replica(1)
    assert [db.site_id for db in replicas] == [db.site_id for db in cluster]

def test_defaults(cluster):
    assert (cluster.n, cluster.seed) == (3, 0)
    assert "topics" in cluster.state(0)

@pytest.mark.cluster(4, setup=lambda index, db, peer: OPENED.append(index))
def test_positional_n_and_setup(cluster):
    assert cluster.n == 4 and OPENED == [0, 1, 2, 3]

@pytest.mark.cluster(n=2, schema_dir="migrations")
def test_relative_schema_dir(cluster):
    cluster.write(0, "INSERT INTO notes (id) VALUES ('n1')")
    cluster.sync_all()
    assert cluster.query(1, "SELECT id FROM notes") == [("n1",)]
"""

FAILING = """
import pytest
from hypothesis import given, settings, strategies as st
from sync.testing import Cluster, run_schedule, schedules, sql_op

INSERT = sql_op("INSERT OR REPLACE INTO topics (id) VALUES (?)", st.sampled_from(["a", "b"]))

@pytest.mark.cluster(n=3, seed=7)
def test_diverges(cluster):
    cluster.write(0, "INSERT INTO topics (id, name) VALUES ('t1', 'a')")
    cluster.partition([[0, 1], [2]])
    cluster.sync_all()
    cluster.assert_converged()

def test_own_cluster():
    with Cluster(2, seed=3) as cluster:
        cluster.note("about to fail")
        raise RuntimeError("boom")

def test_no_cluster():
    assert False

@pytest.mark.cluster(replicas=3)
def test_marker_typo(cluster):
    pass

@settings(max_examples=50, derandomize=True, deadline=None, database=None)
@given(schedules([INSERT], n_replicas=2, max_steps=6))
def test_property(schedule):
    with Cluster(2, seed=9) as cluster:
        run_schedule(cluster, schedule)
        assert cluster.query(1, "SELECT count(*) FROM topics") == [(0,)]
"""


def run(pytester, *args: str):
    return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)


def sections(output: str) -> list[str]:
    """The plugin's report sections, one string each."""
    parts = output.split("sync.testing cluster (replay)")[1:]
    return [part.split("\n_____")[0].split("\n=====")[0] for part in parts]


def test_the_plugin_is_registered_through_the_entry_point(pytestconfig):
    points = importlib.metadata.entry_points(group="pytest11")
    assert any(p.name == "sync_testing" and p.value == "sync.testing.plugin" for p in points)
    assert pytestconfig.pluginmanager.has_plugin("sync_testing")


def test_marker_fixtures_and_a_relative_schema_dir(pytester):
    (pytester.mkdir("migrations") / "0001_notes.sql").write_text((NOTES_APP / "0001_notes.sql").read_text())
    pytester.makepyfile(PASSING)
    run(pytester).assert_outcomes(passed=4)


def test_options_set_seed_and_replica_count(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.cluster(seed=1)
        def test_seed(cluster):
            assert (cluster.n, cluster.seed) == (2, 42)
    """)
    run(pytester, "--cluster-seed=42", "--cluster-replicas=2").assert_outcomes(passed=1)
    refused = run(pytester, "--cluster-seed=nope")
    assert refused.ret != 0
    assert "--cluster-seed takes an integer or 'random', not 'nope'" in refused.stderr.str()


def test_failures_report_seed_replay_command_and_schedule(pytester):
    pytester.makepyfile(test_fails=FAILING)
    result = run(pytester)
    result.assert_outcomes(failed=4, errors=1)
    output = result.stdout.str()
    fixture, own, shrunk = sections(output)
    assert "the `cluster` fixture: seed 7, 3 replicas, schema " in fixture
    assert "replay exactly: pytest 'test_fails.py::test_diverges' --cluster-seed=7" in fixture
    for line in ["   1. open 3 replicas on migrations/ (seed 7)",
                 "   2. r0: INSERT INTO topics (id, name) VALUES ('t1', 'a')",
                 "   3. partition [[0, 1], [2]]",
                 "assert_converged r0,r1,r2: FAILED at topics {'id': 't1'}"]:
        assert line in fixture
    assert "replicas diverge: table topics, row (id='t1')" in output
    assert "the last Cluster this test opened" in own and "seed 3, 2 replicas" in own
    assert "   2. note: about to fail" in own
    assert "@pytest.mark.cluster got unknown arguments ['replicas']" in output
    # Hypothesis replays the shrunk example last: that is the cluster the report shows
    assert "seed 9, 2 replicas" in shrunk and "schedule (2 steps):" in shrunk
    assert "   2. r1: Sql(sql='INSERT OR REPLACE INTO topics (id) VALUES (?)', params=('a',))" in shrunk

    replay = run(pytester, "test_fails.py::test_diverges", "--cluster-seed=7")
    replay.assert_outcomes(failed=1)
    assert sections(replay.stdout.str()) == [fixture]


def test_a_random_seed_is_printed_when_the_test_fails(pytester):
    pytester.makepyfile("""
        def test_fails(cluster):
            assert cluster.seed < 0
    """)
    result = run(pytester, "--cluster-seed=random")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["sync.testing: --cluster-seed=random", "replay exactly: pytest * --cluster-seed=*"])
