"""Schedules as plain data: steps a test (or Hypothesis) lists and `run_schedule` executes.

    schedule = [
        Op(0, Sql("INSERT INTO notes (id, body) VALUES (?, ?)", ("n1", "a"))),
        Partition(((0, 1), (2,))),
        Op(2, Sql("UPDATE notes SET body = ? WHERE id = ?", ("b", "n1"))),
        Sync(0, 2, faults=(Drop(3),)),
        Heal(),
        SyncAll(),
    ]
    run_schedule(cluster, schedule)

Every step is a small frozen Struct whose repr is the Python that builds it, so a failing
example Hypothesis prints can be pasted back into a test. `schedules(...)` generates them
from your own operation strategies; since each step holds only small integers, tuples and
your operations, Hypothesis shrinks a failure to a few readable steps (no opaque seeds).

An operation is any callable `op(db)`; give it a readable repr (a frozen msgspec Struct or
dataclass with `__call__`), or use `Sql(statement, params)` / the `sql_op(...)` strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from engine.database import Database

from .network import Delay, Disconnect, Drop, Duplicate, MessageFault, Reorder

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from .cluster import Cluster

__all__ = [
    "Sql",
    "Step",
    "Op",
    "Sync",
    "SyncAll",
    "Partition",
    "Heal",
    "Restart",
    "Advance",
    "run_schedule",
    "schedules",
    "sql_op",
]


class Sql(msgspec.Struct, frozen=True, repr_omit_defaults=True):
    """An operation: one SQL statement with its parameters, in its own transaction."""

    sql: str
    params: tuple[Any, ...] = ()

    def __call__(self, db: Database) -> None:
        with db.transaction() as tx:
            tx.execute(self.sql, self.params)


class Step(msgspec.Struct, frozen=True, repr_omit_defaults=True):
    """Base of the schedule steps: `run(cluster)` performs it (and the cluster records it)."""

    def run(self, cluster: "Cluster") -> None:  # pragma: no cover - every step overrides it
        raise NotImplementedError


class Op(Step, frozen=True):
    """Apply operation `op` (a callable taking the Database) on replica `replica`."""

    replica: int
    op: Any

    def run(self, cluster: "Cluster") -> None:
        cluster.apply(self.replica, self.op)


class Sync(Step, frozen=True):
    """One round, `a` the client and `b` the server, with explicit faults of its messages."""

    a: int
    b: int
    faults: tuple[MessageFault | Disconnect, ...] = ()

    def run(self, cluster: "Cluster") -> None:
        cluster.sync(self.a, self.b, faults=self.faults)


class SyncAll(Step, frozen=True):
    """Rounds between all connected pairs until quiescent."""

    def run(self, cluster: "Cluster") -> None:
        cluster.sync_all()


class Partition(Step, frozen=True):
    """Split the network into `groups` (replicas not listed are alone)."""

    groups: tuple[tuple[int, ...], ...]

    def run(self, cluster: "Cluster") -> None:
        cluster.partition(self.groups)


class Heal(Step, frozen=True):
    """Reconnect every replica."""

    def run(self, cluster: "Cluster") -> None:
        cluster.heal()


class Restart(Step, frozen=True):
    """Close replica `replica` and reopen it from disk."""

    replica: int

    def run(self, cluster: "Cluster") -> None:
        cluster.restart(self.replica)


class Advance(Step, frozen=True):
    """Move the clock of `replica` (every clock if None) forward `ms` milliseconds."""

    ms: int
    replica: int | None = None

    def run(self, cluster: "Cluster") -> None:
        cluster.advance(self.ms, self.replica)


def run_schedule(cluster: "Cluster", schedule: Sequence[Step], *,
                 expected_errors: tuple[type[BaseException], ...] = (),
                 after_step: Callable[["Cluster", Step], Any] | None = None) -> None:
    """Execute the steps in order on `cluster` (each one lands in `cluster.schedule`).

    `expected_errors`: exception types an operation may raise as a normal outcome (e.g. the
    NotFoundError of an update on a row another replica deleted); they are recorded and the
    schedule goes on. `after_step(cluster, step)` runs after every step: the place for
    invariants that must hold at all times (`cluster.last_round` is the latest sync round).

    Raises:
        ValueError: a step names a replica the cluster does not have (before anything runs).
        Whatever a step raises otherwise (a sync failure the network does not explain,
            an operation's unexpected error, ...).
    """
    for number, step in enumerate(schedule):
        for index in _indices(step):
            if not 0 <= index < cluster.n:
                raise ValueError(f"step {number} {step!r} names replica {index}; the cluster has {cluster.n}")
    for step in schedule:
        try:
            step.run(cluster)
        except expected_errors:
            pass  # already recorded by cluster.apply
        if after_step is not None:
            after_step(cluster, step)


def _indices(step: Step) -> list[int]:
    if isinstance(step, (Op, Restart)):
        return [step.replica]
    if isinstance(step, Advance):
        return [] if step.replica is None else [step.replica]
    if isinstance(step, Sync):
        return [step.a, step.b]
    if isinstance(step, Partition):
        return [i for group in step.groups for i in group]
    return []


# -- Hypothesis strategies (hypothesis is imported only when they are used) ---------------


def sql_op(statement: str, *params: SearchStrategy[Any]) -> SearchStrategy[Sql]:
    """A strategy of `Sql(statement, params)`, one strategy per `?` parameter.

        sql_op("UPDATE notes SET body = ? WHERE id = ?", st.text(max_size=3), st.sampled_from(IDS))
    """
    from hypothesis import strategies as st

    return st.tuples(*params).map(lambda values: Sql(statement, values))


def schedules(operations: Any, n_replicas: int = 3, *, min_steps: int = 1, max_steps: int = 25,
              faults: bool = True, partitions: bool = True, restarts: bool = True,
              sync_all: bool = True, clock: bool = True, max_message: int = 12) -> SearchStrategy[list[Step]]:
    """A Hypothesis strategy of schedules: lists of steps that apply your `operations` on
    random replicas, interleaved with syncs (some with message faults), partitions, heals,
    restarts and clock moves.

    Args:
        operations: a strategy of operations, or a list of them (any is drawn).
        n_replicas: replica indices go 0..n_replicas-1 (use a Cluster that large).
        faults: Sync steps may carry Drop/Duplicate/Reorder/Delay/Disconnect faults on
            their first `max_message` messages.
        partitions, restarts, sync_all, clock: include those kinds of steps.

    Shrinking removes steps, drops faults, merges partition groups and moves indices
    towards 0, so a failure ends as a short list such as
    `[Op(replica=0, op=Sql(...)), Sync(a=0, b=1, faults=(Drop(at=3),))]`.

    Raises:
        ValueError: n_replicas < 1.
    """
    from hypothesis import strategies as st

    if n_replicas < 1:
        raise ValueError(f"n_replicas must be >= 1, not {n_replicas}")
    ops = st.one_of(*operations) if isinstance(operations, (list, tuple)) else operations
    replica = st.integers(0, n_replicas - 1)
    # (weight, strategy): operations and syncs are the substance of a schedule
    kinds: list[tuple[int, SearchStrategy[Step]]] = [(3, st.builds(Op, replica, ops))]
    if n_replicas > 1:
        kinds.append((2, _syncs(n_replicas, faults, max_message)))
        if sync_all:
            kinds.append((1, st.just(SyncAll())))
        if partitions:
            kinds += [(1, _partitions(n_replicas)), (1, st.just(Heal()))]
    if restarts:
        kinds.append((1, st.builds(Restart, replica)))
    if clock:
        kinds.append((1, st.builds(Advance, st.integers(1, 60_000), st.one_of(st.none(), replica))))
    # a weighted choice of kind, then the step: one_of would pick uniformly (and it merges
    # identical branches, so listing one twice does not weigh it)
    choices = [strategy for weight, strategy in kinds for _ in range(weight)]
    step = st.integers(0, len(choices) - 1).flatmap(lambda k: choices[k])
    return st.lists(step, min_size=min_steps, max_size=max_steps)


def _syncs(n: int, faults: bool, max_message: int) -> SearchStrategy[Sync]:
    from hypothesis import strategies as st

    pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 2)).map(
        lambda p: (p[0], p[1] + (p[1] >= p[0])))  # b != a, and shrinks towards (0, 1)
    if not faults:
        return pairs.map(lambda p: Sync(p[0], p[1]))
    at = st.integers(0, max_message - 1)
    one_fault = st.one_of(
        st.builds(Drop, at),
        st.builds(Duplicate, at),
        st.builds(Reorder, at),
        st.builds(Delay, at, st.sampled_from([2, 20])),
        st.builds(Disconnect, at),
    )
    fault_lists = st.one_of(st.just(()), st.lists(one_fault, min_size=1, max_size=2).map(tuple))
    return st.builds(lambda p, f: Sync(p[0], p[1], f), pairs, fault_lists)


def _partitions(n: int) -> SearchStrategy[Partition]:
    """Each replica gets a group label; shrinks towards one group (no split)."""
    from hypothesis import strategies as st

    def groups(labels: list[int]) -> Partition:
        found: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            found.setdefault(label, []).append(index)
        return Partition(tuple(tuple(g) for _, g in sorted(found.items())))

    return st.lists(st.integers(0, n - 1), min_size=n, max_size=n).map(groups)
