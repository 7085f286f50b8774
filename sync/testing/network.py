"""The simulated network of a test cluster: whole encoded messages, faults reproducible from a seed.

A round is one sync connection between two replicas, driven exactly like a real transport
drives `sync.session.Session` (see `sync.peer.run_in_process`, the fault-free reference):
every message is the encoded bytes a socket would carry, fed to the other side's
`receive()`. Between the two, the network may lose, duplicate, reorder or delay a message.

Time is virtual: a message sent at tick t arrives at t + 1 (later if delayed). The
transport's idle timeout is counted in ticks too, so a round whose only message in flight
was dropped *stalls* and fails as a real transport would after its timeout — nothing
is retried inside the round. The next round resumes from the stored watermarks.

`Link` is one connection in flight (start, deliver — possibly a few messages at a time —,
notify in live mode, outcome); `Network.run` drives a link to the end of its round.

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
from collections.abc import Callable, Sequence
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
    "Link",
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

    def __repr__(self) -> str:  # without the bytes
        fault = f", fault={self.fault!r}" if self.fault else ""
        return f"Sent({self.describe()!r}, size={self.size}, delivered={self.delivered}{fault})"


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
        return _pages(self.messages, sender)

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

    def link(self, client: Session, server: Session, ends: tuple[int, int], *,
             faults: Sequence[MessageFault | Disconnect] = (), random_faults: bool = True) -> "Link":
        """A connection between two sessions over this network (not started yet)."""
        return Link(client, server, ends, rng=self.rng, faults=faults,
                    random_faults=self.faults if random_faults else None)

    def run(self, client: Session, server: Session, ends: tuple[int, int], *,
            faults: Sequence[MessageFault | Disconnect] = (), random_faults: bool = True) -> Round:
        """Drive one round to its end (or its failure) and return what happened.

        The sessions are not closed here (the caller owns them). Never raises for what the
        sessions or the network did: that is in the returned Round.
        """
        link = self.link(client, server, ends, faults=faults, random_faults=random_faults)
        link.start()
        link.deliver()
        return link.outcome()


class Link:
    """One connection between a client and a server session through the simulated network.

    `deliver()` moves messages until nothing is in flight (or a `limit` of deliveries: a
    pause, to act on the databases mid-round); in live mode `notify()` is what a transport
    does on a commit notification. The link breaks (`error`) on an idle timeout or an
    explicit `Disconnect`; after that nothing moves. `outcome()` summarizes it as a Round.
    """

    def __init__(self, client: Session, server: Session, ends: tuple[int, int] = (0, 1), *,
                 rng: random.Random | None = None, faults: Sequence[MessageFault | Disconnect] = (),
                 random_faults: Faults | None = None, on_close: Callable[["Link"], Any] | None = None):
        self.client, self.server = client, server
        self.on_close = on_close
        self.ends = ends
        self.rng = rng or random.Random(0)
        self.messages: list[Sent] = []
        self.error: TransportError | None = None
        self.delivered = 0
        self.random = random_faults if random_faults is not None and random_faults.any else None
        self.timeout = random_faults.timeout if random_faults is not None else _DEFAULT_TIMEOUT
        self.explicit: dict[int, list[MessageFault]] = {}
        self.cut: int | None = None
        for fault in faults:
            if isinstance(fault, Disconnect):
                self.cut = fault.after if self.cut is None else min(self.cut, fault.after)
            else:
                self.explicit.setdefault(fault.at, []).append(fault)
        self._queue: list[tuple[int, int, int, bool]] = []  # (tick, order, message index, to the server?)
        self._now = self._last = self._order = 0
        self._started = False

    # -- driving ---------------------------------------------------------------------------

    def start(self) -> "Link":
        """Send the client's opening message(s). Idempotent; returns the link."""
        if not self._started:
            self._started = True
            self._send(self.client, self.client.start())
        return self

    def deliver(self, limit: int | None = None) -> int:
        """Deliver messages (and send the replies) until nothing is in flight, the link
        breaks, or `limit` deliveries were made by this call. Returns the deliveries made."""
        self.start()
        made = 0
        while self._queue and self.error is None and (limit is None or made < limit):
            tick, _, index, to_server = heapq.heappop(self._queue)
            if tick - self._last > self.timeout:
                self._break(f"timed out: nothing arrived for {tick - self._last} ticks (idle timeout {self.timeout})")
                break
            if self.cut is not None and self.delivered >= self.cut:
                self._break(f"connection lost after {self.cut} deliveries")
                break
            self._now = self._last = tick
            target = self.server if to_server else self.client
            if target.finished:
                continue  # that end has closed its connection
            self.delivered += 1
            made += 1
            sent = self.messages[index]
            sent.delivered += 1
            self._send(target, target.receive(sent.data))
        return made

    def notify(self) -> int:
        """Live mode: both sides were told "local commits may have happened"; deliver what
        that sent (and its consequences). Returns the deliveries made."""
        self._send(self.client, self.client.local_changes())
        self._send(self.server, self.server.local_changes())
        return self.deliver()

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Close both sessions (idempotent); then `on_close(link)` runs, once."""
        self.client.close()
        self.server.close()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self)

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what happened ---------------------------------------------------------------------

    def pages(self, sender: int | None = None) -> list[Changes]:
        """The Changes pages delivered so far (at least once), in send order; only `sender`'s
        (a replica index) if given."""
        return _pages(self.messages, sender)

    def outcome(self) -> Round:
        """The round so far. Not ok while the client's round is unfinished: with nothing in
        flight that is a stall, which a real transport ends with its timeout."""
        client, server = self.client, self.server
        rnd = Round(self.ends[0], self.ends[1], messages=self.messages)
        rnd.pulled, rnd.pushed = client.result.pulled, client.result.pushed
        rnd.applied = client.result.applied + server.result.applied
        rnd.ok = (client.state is State.DONE or (client.live and client.caught_up)) and not (
            client.failed or server.failed or self.error)
        if not rnd.ok:
            rnd.error = client.error or server.error or self.error or TransportError(
                f"round stalled in state {client.state.value}: nothing left in flight, the transport timed out")
        rnd.faulted = bool(rnd.faults) or self.error is not None
        return rnd

    # -- the network's doing -----------------------------------------------------------------

    def _break(self, reason: str) -> None:
        self.error = TransportError(reason)
        self._queue.clear()

    def _send(self, sender: Session, messages: list[bytes]) -> None:
        to_server = sender is self.client
        a, b = self.ends if to_server else self.ends[::-1]
        for data in messages:
            index = len(self.messages)
            kind, rows = _summary(data)
            sent = Sent(index, a, b, kind, rows, len(data), data=data)
            self.messages.append(sent)
            if self.error is not None:
                sent.fault = "lost (connection broken)"
                continue
            drop, duplicate, reorder, delay = self._decide(index)
            if drop:
                sent.fault = "dropped"
                continue
            tick = self._now + 1 + delay
            order = self._order = self._order + 1
            if reorder and self._queue:
                tick = min(tick, min(entry[0] for entry in self._queue))
                order = -order
                sent.fault = "reordered"
            elif delay:
                sent.fault = f"delayed {delay} tick{'s' if delay > 1 else ''}"
            heapq.heappush(self._queue, (tick, order, index, to_server))
            if duplicate:
                sent.fault = " and ".join(filter(None, [sent.fault, "duplicated"]))
                self._order += 1
                heapq.heappush(self._queue, (tick, self._order, index, to_server))

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


def _pages(messages: list[Sent], sender: int | None) -> list[Changes]:
    decoded = (decode(m.data) for m in messages
               if m.kind == "changes" and m.delivered and (sender is None or m.sender == sender))
    return [page for page in decoded if isinstance(page, Changes)]  # kind "changes" is always a page
