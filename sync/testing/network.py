"""The simulated network of a test cluster: whole encoded messages, faults reproducible from a seed.

A round is one sync connection between two replicas, driven exactly like a real transport
drives `sync.session.Session` (see `sync.peer.run_in_process`, the fault-free reference):
every message is the encoded bytes a socket would carry, fed to the other side's
`receive()`. Between the two, the network may lose, duplicate, reorder or delay a message.

Time is virtual: a message sent at tick t arrives at t + 1 (later if delayed). The
transport's idle timeout is counted in ticks too, so a round whose only message in flight
was dropped *stalls* and fails as a real transport would after its timeout — nothing
is retried inside the round. The next round resumes from the stored watermarks.

Faults come from two places, both reproducible:
- `Faults(drop=0.1, ...)`: probabilities drawn from the cluster's seeded generator, four
  draws per message whatever happens, so one seed gives one sequence of faults;
- explicit faults for one round, by message index (0 = the client's hello, counted in send
  order over both directions): `Drop(3)`, `Duplicate(0)`, `Reorder(4)`, `Delay(2, ticks=20)`,
  `Disconnect(after=5)`. Hypothesis generates and shrinks these (see sync.testing.schedules).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from typing import Any

import msgspec

from sync.errors import SyncError, TransportError
from sync.protocol import Changes, decode
from sync.session import Session, State

__all__ = [
    "Faults",
    "MessageFault",
    "Drop",
    "Duplicate",
    "Reorder",
    "Delay",
    "Disconnect",
    "Sent",
    "Round",
    "Network",
]


class Faults(msgspec.Struct, frozen=True, repr_omit_defaults=True):
    """Random faults of the simulated network, per message, drawn from the cluster's seed.

    `delay` holds a message back 1..`max_delay` ticks; `timeout` is the transport's idle
    timeout in ticks (a round with nothing delivered for longer fails). Keep `max_delay`
    below `timeout` for delays that only reorder; raise it to make delays time rounds out.

    Raises:
        ValueError: a probability outside [0, 1] or a non-positive tick count.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    max_delay: int = 3
    timeout: int = 10

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder", "delay"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} is a probability in [0, 1], not {value!r}")
        if self.max_delay < 1 or self.timeout < 1:
            raise ValueError(f"Faults.max_delay and Faults.timeout are >= 1 tick ({self.max_delay}, {self.timeout})")

    @property
    def any(self) -> bool:
        return bool(self.drop or self.duplicate or self.reorder or self.delay)


class MessageFault(msgspec.Struct, frozen=True):
    """Base of the explicit faults of one round; `at` is the message index in send order."""

    at: int

    def __post_init__(self) -> None:
        if self.at < 0:
            raise ValueError(f"{type(self).__name__}.at is a message index >= 0, not {self.at}")


class Drop(MessageFault, frozen=True):
    """Message `at` is lost."""


class Duplicate(MessageFault, frozen=True):
    """Message `at` arrives twice."""


class Reorder(MessageFault, frozen=True):
    """Message `at` overtakes every message still in flight."""


class Delay(MessageFault, frozen=True):
    """Message `at` arrives `ticks` ticks late (past the idle timeout: the round times out)."""

    ticks: int = 3


class Disconnect(msgspec.Struct, frozen=True):
    """The connection breaks after `after` messages were delivered."""

    after: int


_DEFAULT_TIMEOUT = Faults().timeout


class Sent(msgspec.Struct):
    """One message put on the wire: who sent it, what it was, what the network did to it."""

    index: int
    sender: int
    receiver: int
    kind: str
    rows: int
    size: int
    fault: str = ""
    delivered: int = 0
    data: bytes = b""

    def describe(self) -> str:
        what = f"{self.kind}[{self.rows}]" if self.kind == "changes" else self.kind
        return f"#{self.index} r{self.sender}->r{self.receiver} {what}"


class Round(msgspec.Struct):
    """The outcome of one round between `client` and `server` (replica indices).

    `ok` means the client's session completed; `error` is the session's SyncError or the
    transport's (a stall, a timeout, a cut connection, a partition). `faulted` says the
    network interfered, so a failure may be the network's doing rather than a bug.
    """

    client: int
    server: int
    ok: bool = False
    pulled: int = 0
    pushed: int = 0
    applied: int = 0
    error: Any = None
    blocked: bool = False
    faulted: bool = False
    messages: list[Sent] = msgspec.field(default_factory=list)

    @property
    def moved(self) -> int:
        """Changes that crossed the wire and were applied or acknowledged."""
        return self.pulled + self.pushed

    @property
    def delivered(self) -> int:
        return sum(m.delivered for m in self.messages)

    @property
    def faults(self) -> list[Sent]:
        return [m for m in self.messages if m.fault]

    def pages(self, sender: int | None = None) -> list[Changes]:
        """The Changes pages delivered (at least once), in send order; only `sender`'s if given."""
        return [
            decode(m.data)
            for m in self.messages
            if m.kind == "changes" and m.delivered and (sender is None or m.sender == sender)
        ]

    def raise_for_error(self) -> None:
        """Raises:
            SyncError: the round failed (the session's error or the transport's)."""
        if self.error is not None:
            raise self.error

    def describe(self) -> str:
        """One schedule line: outcome, counts, and every fault the network applied."""
        head = f"sync r{self.client}<->r{self.server}: "
        if self.blocked:
            return head + "blocked by the partition"
        sent = len(self.messages)
        if self.ok:
            text = f"ok, pulled {self.pulled}, pushed {self.pushed} ({sent} messages)"
        else:
            text = (f"FAILED after {self.delivered} deliveries of {sent} messages "
                    f"(pulled {self.pulled}, pushed {self.pushed}): {type(self.error).__name__}: {self.error}")
        faults = "; ".join(f"{m.describe()} {m.fault}" for m in self.faults)
        return head + text + (f" | faults: {faults}" if faults else "")


def _summary(data: bytes) -> tuple[str, int]:
    """(kind, rows) of an encoded message, for the schedule."""
    try:
        message = decode(data)
    except SyncError:
        return "garbage", 0
    kind = type(message).__name__.lower()
    return kind, len(message.rows) if isinstance(message, Changes) else 0


class Network:
    """Routes rounds between replicas: partitions, random faults, explicit per-round faults."""

    def __init__(self, rng: random.Random, faults: Faults | None = None):
        self.rng = rng
        self.faults = faults
        self._group_of: dict[int, int] | None = None

    # -- partitions ------------------------------------------------------------------

    def partition(self, groups: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Only replicas of one group can reach each other; unlisted replicas are alone.

        Returns the full list of groups (with the singletons added).

        Raises:
            ValueError: an index outside 0..n-1 or listed twice.
        """
        group_of: dict[int, int] = {}
        full: list[list[int]] = []
        for number, group in enumerate(groups):
            for index in group:
                if not 0 <= index < n:
                    raise ValueError(f"partition names replica {index}; the cluster has replicas 0..{n - 1}")
                if index in group_of:
                    raise ValueError(f"partition lists replica {index} in two groups")
                group_of[index] = number
            full.append(sorted(group))
        for index in range(n):
            if index not in group_of:
                group_of[index] = len(full)
                full.append([index])
        self._group_of = group_of
        return [g for g in full if g]

    def heal(self) -> None:
        self._group_of = None

    def connected(self, a: int, b: int) -> bool:
        return self._group_of is None or self._group_of[a] == self._group_of[b]

    # -- one round ---------------------------------------------------------------------

    def blocked(self, client: int, server: int) -> Round:
        """The round that could not connect: the partition separates the two."""
        error = TransportError(f"replicas {client} and {server} are in different partitions: no route")
        return Round(client, server, error=error, blocked=True, faulted=True)

    def run(self, client: Session, server: Session, ends: tuple[int, int], *,
            faults: Sequence[MessageFault | Disconnect] = (), random_faults: bool = True) -> Round:
        """Drive one round to its end (or its failure) and return what happened.

        The sessions are not closed here (the caller owns them). Never raises for what the
        sessions or the network did: that is in the returned Round.
        """
        return _Run(self, client, server, ends, faults, self.faults if random_faults else None).run()


class _Run:
    """The state of one round in flight: the queue ordered by (arrival tick, order)."""

    def __init__(self, network: Network, client: Session, server: Session, ends: tuple[int, int],
                 faults: Sequence[MessageFault | Disconnect], random_faults: Faults | None):
        self.rng = network.rng
        self.client, self.server = client, server
        self.ends = ends
        self.round = Round(ends[0], ends[1])
        self.random = random_faults if random_faults is not None and random_faults.any else None
        self.timeout = random_faults.timeout if random_faults is not None else _DEFAULT_TIMEOUT
        self.explicit: dict[int, list[MessageFault]] = {}
        self.cut: int | None = None
        for fault in faults:
            if isinstance(fault, Disconnect):
                self.cut = fault.after if self.cut is None else min(self.cut, fault.after)
            else:
                self.explicit.setdefault(fault.at, []).append(fault)
        self.queue: list[tuple[int, int, int, bool]] = []  # (tick, order, message index, to the server?)
        self.now = 0
        self.order = 0

    def run(self) -> Round:
        error = self._deliver_all()
        rnd = self.round
        client, server = self.client, self.server
        rnd.pulled, rnd.pushed = client.result.pulled, client.result.pushed
        rnd.applied = client.result.applied + server.result.applied
        rnd.ok = client.state is State.DONE and not server.failed
        if not rnd.ok:
            rnd.error = client.error or server.error or error or TransportError(
                f"round stalled in state {client.state.value}: nothing left in flight, the transport timed out")
        rnd.faulted = rnd.faulted or bool(rnd.faults) or error is not None
        return rnd

    def _deliver_all(self) -> TransportError | None:
        self._send(self.client, self.client.start())
        last = 0
        delivered = 0
        while self.queue:
            tick, _, index, to_server = heapq.heappop(self.queue)
            if tick - last > self.timeout:
                return TransportError(f"timed out: nothing arrived for {tick - last} ticks "
                                      f"(idle timeout {self.timeout})")
            if self.cut is not None and delivered >= self.cut:
                self.round.faulted = True
                return TransportError(f"connection lost after {self.cut} deliveries")
            self.now = last = tick
            target = self.server if to_server else self.client
            if target.finished:
                continue  # that end has closed its connection
            delivered += 1
            sent = self.round.messages[index]
            sent.delivered += 1
            self._send(target, target.receive(sent.data))
        return None

    def _send(self, sender: Session, messages: list[bytes]) -> None:
        to_server = sender is self.client
        a, b = self.ends if to_server else self.ends[::-1]
        for data in messages:
            index = len(self.round.messages)
            kind, rows = _summary(data)
            sent = Sent(index, a, b, kind, rows, len(data), data=data)
            self.round.messages.append(sent)
            drop, duplicate, reorder, delay = self._decide(index)
            if drop:
                sent.fault = "dropped"
                continue
            tick = self.now + 1 + delay
            order = self.order = self.order + 1
            if reorder and self.queue:
                tick = min(tick, min(entry[0] for entry in self.queue))
                order = -order
                sent.fault = "reordered"
            elif delay:
                sent.fault = f"delayed {delay} ticks"
            heapq.heappush(self.queue, (tick, order, index, to_server))
            if duplicate:
                sent.fault = " and ".join(filter(None, [sent.fault, "duplicated"]))
                self.order += 1
                heapq.heappush(self.queue, (tick, self.order, index, to_server))

    def _decide(self, index: int) -> tuple[bool, bool, bool, int]:
        """(drop, duplicate, reorder, delay ticks) for message `index`."""
        drop = duplicate = reorder = False
        delay = 0
        if self.random is not None:
            f, rng = self.random, self.rng
            draws = [rng.random() for _ in range(4)]
            drop, duplicate, reorder = draws[0] < f.drop, draws[1] < f.duplicate, draws[2] < f.reorder
            if draws[3] < f.delay:
                delay = rng.randint(1, f.max_delay)
        for fault in self.explicit.get(index, ()):
            if isinstance(fault, Drop):
                drop = True
            elif isinstance(fault, Duplicate):
                duplicate = True
            elif isinstance(fault, Reorder):
                reorder = True
            elif isinstance(fault, Delay):
                delay = max(delay, fault.ticks)
        return drop, duplicate, reorder, delay
