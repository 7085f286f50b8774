"""The pytest plugin of sync.testing (registered through the `pytest11` entry point).

Fixtures:
    cluster    a `Cluster` (closed after the test), files under the test's tmp_path
    replicas   the cluster's Databases as a live sequence (`replicas[i]` follows restarts)

Settings, per test:
    @pytest.mark.cluster(n=3, seed=7, schema_dir="migrations", faults=Faults(drop=0.1), limits=...,
                         setup=fn)   # fn(index, db, peer) whenever a replica opens
    a relative `schema_dir` is relative to the test file's folder; the ini option
    `cluster_schema_dir` (relative to the rootdir) is the default for every test.
Command line:
    --cluster-seed=N       overrides every seed (replay a failure); `random` picks one per test
    --cluster-replicas=N   replica count where the marker does not say

When a test fails, its report gets a section with the seed, the command that replays it
and the cluster's schedule — for the `cluster` fixture, or else for the last Cluster the
test opened itself (with Hypothesis: the final, shrunk example).
"""

from __future__ import annotations

import random
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import pytest

from engine.database import Database

from .cluster import Cluster, forget_last_opened, last_opened

__all__ = ["ReplicaView", "cluster", "replicas"]

_CLUSTER = pytest.StashKey[Cluster]()
_REPORTED = pytest.StashKey[bool]()
_MARKER_KEYS = {"n", "seed", "schema_dir", "faults", "limits", "setup"}
DEFAULT_REPLICAS = 3


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sync-cluster", "multi-replica clusters (sync.testing)")
    group.addoption("--cluster-seed", default=None, metavar="N|random",
                    help="seed of every `cluster` fixture, overriding @pytest.mark.cluster(seed=...); "
                         "'random' picks one per test (printed when the test fails)")
    group.addoption("--cluster-replicas", type=int, default=None, metavar="N",
                    help=f"replicas of a `cluster` fixture whose marker gives no n (default {DEFAULT_REPLICAS})")
    parser.addini("cluster_schema_dir", "default migrations folder of `cluster` fixtures (relative to the rootdir)",
                  default="")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker; check --cluster-seed before any test runs.

    Raises:
        pytest.UsageError: --cluster-seed is neither an integer nor 'random'.
    """
    seed = config.getoption("--cluster-seed", None)
    if seed is not None and seed != "random":
        try:
            int(seed)
        except ValueError:
            raise pytest.UsageError(f"--cluster-seed takes an integer or 'random', not {seed!r}") from None
    config.addinivalue_line(
        "markers",
        "cluster(n=3, seed=0, schema_dir=None, faults=None, limits=None, setup=None): settings of the "
        "`cluster` fixture "
        "(sync.testing)",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("--cluster-seed")
    return f"sync.testing: --cluster-seed={seed}" if seed is not None else None


# -- fixtures --------------------------------------------------------------------------


class ReplicaView(Sequence[Database]):
    """The cluster's Databases, looked up on every access (so `restart` is followed)."""

    def __init__(self, owner: Cluster):
        self.cluster = owner

    @overload
    def __getitem__(self, index: int) -> Database: ...

    @overload
    def __getitem__(self, index: slice) -> list[Database]: ...

    def __getitem__(self, index: int | slice) -> Database | list[Database]:
        if isinstance(index, slice):
            return [self.cluster.replica(i) for i in range(self.cluster.n)[index]]
        return self.cluster.replica(index)

    def __len__(self) -> int:
        return self.cluster.n

    def __iter__(self) -> Iterator[Database]:
        return iter([self.cluster.replica(i) for i in range(self.cluster.n)])

    def __repr__(self) -> str:
        return f"<replicas of {self.cluster!r}>"


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A Cluster set up by @pytest.mark.cluster(...) and --cluster-seed / --cluster-replicas."""
    settings = _settings(request)
    opened = Cluster(directory=tmp_path / "cluster", **settings)
    request.node.stash[_CLUSTER] = opened
    yield opened
    opened.close()


@pytest.fixture
def replicas(cluster: Cluster) -> ReplicaView:
    """The `cluster` fixture's Databases: `replicas[0]`, `len(replicas)`, iteration."""
    return ReplicaView(cluster)


def _settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Cluster keyword arguments from the marker, the ini option and the command line.

    Fails the test (at setup) for an unknown marker argument.
    """
    marker = request.node.get_closest_marker("cluster")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    if marker and marker.args:
        kwargs.setdefault("n", marker.args[0])
    unknown = set(kwargs) - _MARKER_KEYS
    if unknown:
        pytest.fail(f"@pytest.mark.cluster got unknown arguments {sorted(unknown)}; "
                    f"known: {sorted(_MARKER_KEYS)}", pytrace=False)
    config = request.config
    kwargs.setdefault("n", config.getoption("--cluster-replicas") or DEFAULT_REPLICAS)
    schema_dir = kwargs.get("schema_dir")
    if schema_dir is None and config.getini("cluster_schema_dir"):
        kwargs["schema_dir"] = Path(config.rootpath) / config.getini("cluster_schema_dir")
    elif schema_dir is not None and not Path(schema_dir).is_absolute():
        kwargs["schema_dir"] = Path(request.path).parent / schema_dir
    seed = config.getoption("--cluster-seed")
    if seed == "random":
        kwargs["seed"] = random.SystemRandom().randrange(2**31)
    elif seed is not None:
        kwargs["seed"] = int(seed)  # checked in pytest_configure
    return kwargs


# -- failure reports -----------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    forget_last_opened()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and not item.stash.get(_REPORTED, False):
        text = _failure_text(item)
        if text:
            item.stash[_REPORTED] = True
            report.sections.append(("sync.testing cluster (replay)", text))
    return report


def _failure_text(item: pytest.Item) -> str | None:
    fixture = item.stash.get(_CLUSTER, None)
    found = fixture or last_opened()
    if found is None:
        return None
    if fixture is not None:
        how = (f"the `cluster` fixture: seed {found.seed}, {found.n} replicas, schema {found.schema_dir}\n"
               f"replay exactly: pytest '{item.nodeid}' --cluster-seed={found.seed}")
    else:
        how = (f"the last Cluster this test opened (with Hypothesis: the shrunk example): seed {found.seed}, "
               f"{found.n} replicas, schema {found.schema_dir}\n"
               f"replay: the same steps on Cluster({found.n}, seed={found.seed}, ...)")
    return f"{how}\nschedule ({len(found.schedule)} steps):\n{found.schedule_text()}"
