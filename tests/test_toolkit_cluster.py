"""sync.testing.Cluster tests itself: replicas, the simulated network and its faults,
partitions, restarts, replays from a seed, and the convergence diff (which must catch a
write made outside the CRR path)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from engine import ManualClock
from engine.migrations import crr_tables
from sync.errors import SchemaMismatchError, TransportError
from sync.protocol import Changes, decode
from sync.testing import (
    MISSING,
    Cluster,
    ConvergenceError,
    Delay,
    Disconnect,
    Drop,
    Duplicate,
    Faults,
    NotQuiescentError,
    Reorder,
    START_MS,
)

NOTES_APP = Path(__file__).resolve().parent.parent / "examples" / "notes_app" / "migrations"
TOPIC = "INSERT INTO topics (id, workflow_id, name) VALUES (?, 'wf', ?)"


@pytest.fixture(autouse=True)
def quiet_sync_log(caplog):
    """Faulty rounds log a warning each; keep the output readable."""
    caplog.set_level(logging.ERROR, logger="sync")


def topics(cluster: Cluster, index: int) -> list[tuple]:
    return cluster.query(index, "SELECT id, name FROM topics ORDER BY id")


def outside_crr(cluster: Cluster, index: int, sql: str, params: tuple = ()) -> None:
    """A write cr-sqlite does not see: its triggers are switched off for the statement, so the
    change is in the table but never in crsql_changes (what a buggy app or a raw tool does)."""
    with cluster.replica(index).transaction() as tx:
        tx.execute("SELECT crsql_internal_sync_bit(1)")
        try:
            tx.execute(sql, params)
        finally:
            tx.execute("SELECT crsql_internal_sync_bit(0)")


# -- replicas -------------------------------------------------------------------------------


def test_opens_n_replicas_on_the_project_migrations_and_cleans_up():
    with Cluster(3) as cluster:
        folder = cluster.directory
        sites = {db.site_id for db in cluster}
        assert len(sites) == 3 and len(cluster) == 3
        with cluster.replica(2).reading() as s:
            assert {"topics", "events", "handler_runs", "mutations", "handler_state"} <= set(crr_tables(s.connection))
        assert sorted(p.name for p in folder.glob("*.db")) == ["r0.db", "r1.db", "r2.db"]
    assert cluster.closed and not folder.exists()
    with pytest.raises(RuntimeError, match="closed"):
        cluster.replica(0)


def test_opens_a_users_own_schema(tmp_path):
    with Cluster(2, schema_dir=NOTES_APP, directory=tmp_path) as cluster:
        with cluster.replica(1).reading() as s:
            assert crr_tables(s.connection) == ["notebooks", "notes"]
        cluster.write(0, "INSERT INTO notes (id, body) VALUES ('n1', 'hi')")
        assert cluster.sync(1, 0).pulled == 4  # one change per non-key column
        assert cluster.query(1, "SELECT id, body FROM notes") == [("n1", "hi")]
    assert (tmp_path / "r0.db").exists()  # a given directory is left to its owner


def test_bad_indices_and_arguments_are_refused():
    with Cluster(2) as cluster:
        with pytest.raises(IndexError, match="replicas 0..1"):
            cluster.replica(2)
        with pytest.raises(ValueError, match="itself"):
            cluster.sync(1, 1)
        with pytest.raises(ValueError, match="two groups"):
            cluster.partition([[0, 1], [1]])
        with pytest.raises(ValueError, match="replica 5"):
            cluster.partition([[0], [5]])
    with pytest.raises(ValueError, match="at least one"):
        Cluster(0)
    with pytest.raises(ValueError, match="probability"):
        Faults(drop=1.5)


def test_same_seed_same_site_ids_other_seed_others():
    with Cluster(3, seed=4) as a, Cluster(3, seed=4) as b, Cluster(3, seed=5) as c:
        assert [db.site_id for db in a] == [db.site_id for db in b]
        assert [db.site_id for db in a] != [db.site_id for db in c]


# -- rounds over the simulated network ----------------------------------------------------


def test_a_round_carries_encoded_messages_both_ways():
    with Cluster(2) as cluster:
        cluster.write(0, TOPIC, ("t1", "from r0"))
        cluster.write(1, TOPIC, ("t2", "from r1"))
        rnd = cluster.sync(0, 1)
        assert rnd.ok and (rnd.pulled, rnd.pushed, rnd.applied) == (3, 3, 6)
        assert [(m.sender, m.kind) for m in rnd.messages] == [
            (0, "hello"), (1, "hello"), (0, "pull"), (1, "changes"), (0, "ack"), (0, "changes"), (1, "ack")]
        assert all(m.delivered == 1 for m in rnd.messages)
        assert [p.rows[0][0] for p in rnd.pages(sender=1)] == ["topics"]
        assert isinstance(decode(rnd.messages[3].data), Changes)
        assert topics(cluster, 0) == topics(cluster, 1) == [("t1", "from r0"), ("t2", "from r1")]
        again = cluster.sync(1, 0)
        assert again.ok and again.moved == 0
        assert cluster.schedule[-2:] == (
            "sync r0<->r1: ok, pulled 3, pushed 3 (7 messages)",
            "sync r1<->r0: ok, pulled 0, pushed 0 (7 messages)",
        )


def test_a_dropped_message_stalls_the_round_and_the_next_round_resumes():
    with Cluster(2) as cluster:
        for i in range(3):
            cluster.write(1, TOPIC, (f"t{i}", "x"))
        lost = cluster.sync(0, 1, faults=[Drop(3)])  # the server's only page
        assert not lost.ok and lost.faulted and isinstance(lost.error, TransportError)
        assert "stalled" in str(lost.error) and topics(cluster, 0) == []
        assert lost.messages[3].fault == "dropped" and lost.messages[3].delivered == 0
        retry = cluster.sync(0, 1)
        assert retry.ok and retry.pulled == 9 and len(topics(cluster, 0)) == 3


def test_a_duplicated_page_is_applied_once():
    with Cluster(2) as cluster:
        cluster.write(1, TOPIC, ("t1", "once"))
        rnd = cluster.sync(0, 1, faults=[Duplicate(3)])
        assert rnd.ok and rnd.messages[3].delivered == 2
        assert (rnd.pulled, rnd.applied) == (3, 3)
        with cluster.replica(0).reading() as s:
            assert s.scalar("SELECT count(*) FROM crsql_changes") == 3


def test_reorder_delay_and_disconnect():
    with Cluster(2) as cluster:
        cluster.write(0, TOPIC, ("t0", "a"))
        cluster.write(1, TOPIC, ("t1", "b"))
        # the client's page (5) overtakes its ack of the server's page (4): still a good round
        reordered = cluster.sync(0, 1, faults=[Reorder(5)])
        assert reordered.ok and reordered.messages[5].fault == "reordered"
        cluster.write(1, TOPIC, ("t2", "c"))
        late = cluster.sync(0, 1, faults=[Delay(2, ticks=3)])  # late, within the idle timeout
        assert late.ok and late.pulled == 3
        cluster.write(1, TOPIC, ("t3", "d"))
        timed_out = cluster.sync(0, 1, faults=[Delay(2, ticks=20)])
        assert not timed_out.ok and "timed out" in str(timed_out.error)
        cut = cluster.sync(0, 1, faults=[Disconnect(after=3)])
        assert not cut.ok and cut.delivered == 3 and "connection lost" in str(cut.error)
        cluster.sync_all()
        cluster.assert_converged()
        assert len(topics(cluster, 0)) == 4


def test_random_faults_are_applied_at_the_configured_rates():
    faults = Faults(drop=0.2, duplicate=0.1, reorder=0.0, delay=0.3)
    with Cluster(3, seed=11, faults=faults) as cluster:
        for i in range(12):
            cluster.write(i % 3, TOPIC, (f"t{i}", "x"))
        rounds = cluster.sync_all()
        sent = [m for r in rounds for m in r.messages]
        assert len(sent) > 150
        share = {kind: sum(kind in m.fault for m in sent) / len(sent) for kind in ("dropped", "duplicated", "delayed")}
        assert 0.12 < share["dropped"] < 0.28 and 0.04 < share["duplicated"] < 0.17 and 0.2 < share["delayed"] < 0.4
        assert not any("reordered" in m.fault for m in sent)
        assert any(not r.ok for r in rounds) and rounds[-1].ok
        cluster.assert_converged()
        assert len(topics(cluster, 2)) == 12


def test_a_network_that_loses_everything_is_never_quiescent():
    with Cluster(2, faults=Faults(drop=1.0)) as cluster:
        cluster.write(0, TOPIC, ("t1", "x"))
        with pytest.raises(NotQuiescentError, match="not quiescent after 5 rounds"):
            cluster.sync_all(max_rounds=5)
        assert cluster.sync_all(faults=False)[0].pushed == 3  # a perfect network for this call


def test_a_failure_the_network_cannot_explain_is_raised():
    with Cluster(2) as cluster:
        with cluster.replica(1).transaction() as tx:  # replica 1 alone gets another CRR table
            tx.execute("CREATE TABLE extra (id TEXT NOT NULL PRIMARY KEY, v TEXT NOT NULL DEFAULT '')")
            tx.execute("SELECT crsql_as_crr('extra')")
        cluster.restart(1)  # its Peer reads the new schema
        with pytest.raises(SchemaMismatchError, match="schema mismatch"):
            cluster.sync(0, 1)
        with pytest.raises(ConvergenceError, match="table extra exists on some replicas only"):
            cluster.assert_converged()


def test_a_connection_can_pause_mid_round_and_stay_live():
    with Cluster(3) as cluster:
        cluster.write(0, TOPIC, ("t1", "x"))
        with cluster.connect(1, 0) as link:
            assert link.deliver(limit=2) == 2 and link.in_flight == 1  # hello, hello; the pull waits
            assert not link.outcome().ok and topics(cluster, 1) == []
            link.deliver()
            assert link.outcome().ok and topics(cluster, 1) == [("t1", "x")]
        assert cluster.schedule[-2:] == ("connect r1->r0", "closed sync r1<->r0: ok, pulled 3, pushed 0 (7 messages)")

        live = cluster.connect(2, 0, live=True)
        live.deliver()
        assert live.outcome().ok and live.client.state.value == "live" and topics(cluster, 2) == [("t1", "x")]
        cluster.write(0, TOPIC, ("t2", "y"))
        assert live.notify() > 0 and topics(cluster, 2) == [("t1", "x"), ("t2", "y")]
        live.notify()  # r2 tells r0 that its merge held nothing new for it (an empty page)
        assert live.notify() == 0  # idle
        live.close()
        assert cluster.schedule[-1].startswith("closed sync r2<->r0: ok, pulled 6")

        cluster.partition([[0], [1, 2]])
        with pytest.raises(TransportError, match="different partitions"):
            cluster.connect(1, 0)
        broken = cluster.connect(1, 2, faults=[Disconnect(after=1)])
        broken.deliver()
        assert "connection lost after 1 deliveries" in str(broken.outcome().error)
        broken.close()


# -- partitions and restarts ----------------------------------------------------------------


def test_partition_blocks_sync_between_groups_until_healed():
    with Cluster(3) as cluster:
        cluster.partition([[0, 1]])  # replica 2 is alone
        cluster.write(0, TOPIC, ("t1", "x"))
        blocked = cluster.sync(2, 0)
        assert blocked.blocked and not blocked.ok and blocked.messages == []
        rounds = cluster.sync_all()
        assert {(r.client, r.server) for r in rounds} == {(0, 1)}
        assert topics(cluster, 1) == [("t1", "x")] and topics(cluster, 2) == []
        cluster.assert_converged(replicas=[0, 1])
        with pytest.raises(ConvergenceError):
            cluster.assert_converged()
        cluster.heal()
        cluster.sync_all()
        cluster.assert_converged()
        assert "partition [[0, 1], [2]]" in cluster.schedule
        assert "sync r2<->r0: blocked by the partition" in cluster.schedule


def test_sync_all_over_a_line_of_pairs_relays_through_the_middle():
    with Cluster(3) as cluster:
        cluster.write(0, TOPIC, ("t0", "x"))
        cluster.write(2, TOPIC, ("t2", "y"))
        rounds = cluster.sync_all(pairs=[(0, 1), (2, 1)])
        assert {(r.client, r.server) for r in rounds} == {(0, 1), (2, 1)}
        cluster.assert_converged()
        assert "sync_all over [[0, 1], [2, 1]]:" in cluster.schedule
        cluster.partition([[0], [1, 2]])
        cluster.write(0, TOPIC, ("t3", "z"))
        assert cluster.sync_all(pairs=[(0, 1), (2, 1)]) == []  # 0-1 cut off, 2-1 already in sync
        assert cluster.schedule[-2] == "sync_all over [[2, 1]]:"
        assert topics(cluster, 2) == [("t0", "x"), ("t2", "y")]


def test_restart_keeps_data_watermarks_and_site_id():
    with Cluster(2) as cluster:
        cluster.write(0, TOPIC, ("t1", "x"))
        cluster.sync(1, 0)
        before = cluster.replica(1)
        site = before.site_id
        after = cluster.restart(1)
        assert after is not before and before.closed and after is cluster.replica(1)
        assert after.site_id == site and topics(cluster, 1) == [("t1", "x")]
        assert cluster.sync(1, 0).moved == 0  # the watermarks survived on disk
        cluster.write(1, "UPDATE topics SET name = 'y' WHERE id = 't1'")
        assert cluster.sync(0, 1).pulled == 1
        cluster.assert_converged()


def test_replicas_may_have_clocks_of_their_own_and_a_setup_hook():
    clocks = [ManualClock(START_MS), ManualClock(START_MS + 5)]
    opened = []

    def setup(index, db, peer):
        opened.append((index, db))
        db.on_merge(lambda tx, merged: merged_keys.append((index, sorted(merged))))

    merged_keys: list = []
    with Cluster(2, clock=clocks, setup=setup) as cluster:
        assert [i for i, _ in opened] == [0, 1] and opened[1][1] is cluster.replica(1)
        cluster.advance(10, replica=1)
        cluster.advance(1)
        assert [c.now_ms() for c in clocks] == [START_MS + 1, START_MS + 16]
        assert cluster.schedule[-2:] == ("clock of r1 +10 ms", "clock +1 ms")
        with pytest.raises(TypeError, match="clocks of their own"):
            cluster.clock
        cluster.restart(1)
        assert [i for i, _ in opened] == [0, 1, 1] and opened[2][1] is cluster.replica(1)
        cluster.write(0, TOPIC, ("t1", "x"))
        cluster.sync(0, 1)
        assert [index for index, _ in merged_keys] == [1]  # the hook survived the restart
    with pytest.raises(ValueError, match="1 clocks for 2 replicas"):
        Cluster(2, clock=[ManualClock()])


# -- the convergence diff --------------------------------------------------------------------


def test_a_write_outside_the_crr_path_is_reported_with_table_row_and_column():
    with Cluster(3, schema_dir=NOTES_APP) as cluster:
        cluster.write(0, "INSERT INTO notes (id, body, pinned) VALUES ('n1', 'same', 0)")
        cluster.write(0, "INSERT INTO notes (id, body, pinned) VALUES ('n2', 'same', 0)")
        cluster.sync_all()
        cluster.assert_converged()
        outside_crr(cluster, 1, "UPDATE notes SET body = 'changed' WHERE id = 'n2'")
        outside_crr(cluster, 1, "UPDATE notes SET pinned = 1 WHERE id = 'n2'")
        cluster.sync_all()  # nothing to move: cr-sqlite never saw those writes
        with pytest.raises(ConvergenceError) as failure:
            cluster.assert_converged()
        error = failure.value
        assert (error.table, error.pk, error.column) == ("notes", {"id": "n2"}, "body")
        assert error.difference.values == ["same", "changed", "same"]
        message = str(error)
        assert "replicas diverge: table notes, row (id='n2'), column body" in message
        assert "r1: 'changed'   <- differs from r0" in message
        assert "assert_converged r0,r1,r2: FAILED" in cluster.schedule[-1]


def test_a_row_only_one_replica_holds_is_reported_as_missing():
    with Cluster(3, schema_dir=NOTES_APP) as cluster:
        outside_crr(cluster, 2, "INSERT INTO notebooks (id, title) VALUES ('nb9', 'ghost')")
        outside_crr(cluster, 2, "INSERT INTO notes (id) VALUES ('n9')")
        difference = cluster.diff()
        assert difference.table == "notebooks" and difference.pk == {"id": "nb9"} and difference.column is None
        assert difference.values[:2] == [MISSING, MISSING] and difference.values[2][:2] == ("nb9", "ghost")
        assert difference.more_tables == ["notes"]
        assert cluster.diff(replicas=[0, 1]) is None


# -- reproducibility -------------------------------------------------------------------------


def random_workload(seed: int) -> tuple[str, list[dict], list[str]]:
    """Writes, partitions, restarts and syncs chosen by a generator seeded like the cluster."""
    rng = random.Random(seed)
    with Cluster(3, seed=seed, faults=Faults(drop=0.15, duplicate=0.1, reorder=0.2, delay=0.2)) as cluster:
        for step in range(30):
            choice = rng.random()
            a, b = rng.sample(range(3), 2)
            if choice < 0.45:
                cluster.write(a, "INSERT OR REPLACE INTO topics (id, name) VALUES (?, ?)",
                              (f"t{rng.randrange(4)}", f"v{step}"))
            elif choice < 0.8:
                cluster.sync(a, b)
            elif choice < 0.88:
                cluster.partition([[a, b]])
            elif choice < 0.94:
                cluster.heal()
            else:
                cluster.restart(a)
        cluster.converge()
        return "\n".join(cluster.schedule), [cluster.state(i) for i in range(3)], [db.site_id for db in cluster]


def test_the_same_seed_replays_the_same_schedule_and_final_state():
    first, again, other = random_workload(3), random_workload(3), random_workload(4)
    assert first == again
    assert first[0] != other[0]
    assert "faults:" in first[0] and "partition" in first[0]


def test_converge_heals_and_syncs_over_a_perfect_network():
    with Cluster(3, faults=Faults(drop=0.5)) as cluster:
        cluster.partition([[0], [1], [2]])
        for i in range(3):
            cluster.write(i, TOPIC, (f"t{i}", "x"))
        cluster.converge()
        assert len(topics(cluster, 1)) == 3
        assert cluster.schedule[-1] == "assert_converged r0,r1,r2: ok"
        assert "sync_all (perfect network):" in cluster.schedule
