"""The wheel, installed into a fresh venv outside the repository, works on its own.

The module builds the wheel the way `make wheel` does (from a copy of the source tree, so the
checkout's build/ and dist/ are left alone), installs it into a new venv in a temp folder
(its dependencies come from the package registry) and runs, from a working directory with no
checkout in it: the README quickstart, the `crdt-sync` CLI (init, status, serve + sync with
its progress bar, doctor), `python -m engine doctor` and a two-replica sync through the API. Every one of them must use the migrations and the
cr-sqlite library bundled in the wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import msgspec
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret"
NOT_BUILT = ("tests", "bench", "examples", ".git", ".venv", "build", "dist", ".build", "__pycache__",
             ".pytest_cache", ".hypothesis", ".mypy_cache", "*.egg-info", "*.db", "*.db-*", "demo-data")


class Installed(msgspec.Struct, frozen=True):
    wheel: Path
    venv: Path
    cwd: Path  # an empty folder outside the repository: where the commands run
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def python(self, code: str) -> str:
        """Run `code` with the venv's Python; return its stdout (fails the test on an error)."""
        done = self.run(self.bin("python"), "-c", code)
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_BUILT))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", work / "dist", source],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (work / "dist").glob("*.whl")
    # the bundled copies go into the build directory only: a source tree never holds stale ones
    assert not (source / "engine" / "_bundled").exists()
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    install = subprocess.run([*pip, "--python", venv / "bin" / "python", "install", wheel],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    cwd = work / "app"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CRSQLITE_PATH", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return Installed(wheel, venv, cwd, env)


def test_the_wheel_is_platform_specific_and_carries_the_extension_and_migrations(installed):
    assert re.fullmatch(r"crdt_execution_store-[\w.]+-py3-none-linux_\w+\.whl", installed.wheel.name)
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert "engine/_bundled/crsqlite.so" in names
    assert {"engine/py.typed", "sync/py.typed", "sync/testing/__init__.py"} <= names
    bundled = {Path(n).name for n in names if n.startswith("engine/_bundled/migrations/")}
    assert bundled == {p.name for p in (ROOT / "migrations").glob("*.sql")}


def test_the_installed_engine_uses_its_bundled_files_not_the_checkout(installed):
    out = installed.python(
        "import engine, engine.database as d, engine.migrations as m\n"
        "print(engine.__file__); print(d.extension_path()); print(m.DEFAULT_MIGRATIONS_DIR)"
    )
    package, extension, migrations = (Path(line) for line in out.splitlines())
    site = installed.venv / "lib"
    assert package.is_relative_to(site) and not package.is_relative_to(ROOT)
    assert extension == package.parent / "_bundled" / "crsqlite.so"
    assert migrations == package.parent / "_bundled" / "migrations"


def readme_quickstart() -> tuple[str, list[str]]:
    """The first Python example under "## Usage" in the README, and the outputs its comments
    promise (`print(...)   # {'text': 'hello'}`)."""
    usage = (ROOT / "README.md").read_text().split("\n## Usage\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.DOTALL).group(1)
    promised = re.findall(r"^\s*print\(.*\)\s+#\s*(.+?)\s*$", code, re.MULTILINE)
    assert promised, "the quickstart no longer shows its outputs in comments"
    return code, promised


def test_the_readme_quickstart_runs_and_prints_what_it_promises(installed):
    code, promised = readme_quickstart()
    assert installed.python(code).splitlines() == promised
    assert (installed.cwd / "replica.db").is_file()


def test_two_replicas_sync_through_the_api(installed):
    out = installed.python(
        "import sync\n"
        "from engine import Database\n"
        "with Database.open('left.db') as a, Database.open('right.db') as b:\n"
        "    a.events.publish('wf', 'inbox', 'from-a', {'n': 1})\n"
        "    b.events.publish('wf', 'inbox', 'from-b', {'n': 2})\n"
        "    result = sync.Peer(b).sync_with(sync.Peer(a))\n"
        "    for db in (a, b):\n"
        "        print(sorted(e.message_id for e in db.events.peek('wf', 'inbox')))\n"
        "    print(result.pulled > 0, result.pushed > 0)\n"
    )
    assert out.splitlines() == ["['from-a', 'from-b']", "['from-a', 'from-b']", "True True"]


def test_the_cli_inits_shows_status_serves_and_syncs(installed):
    hub, client = installed.cwd / "hub.db", installed.cwd / "client.db"
    for path in (hub, client):
        done = installed.run("crdt-sync", "init", str(path))
        assert done.returncode == 0 and done.stdout.startswith(f"created {path}: site id "), done.stderr
    installed.python(f"from engine import Database\nwith Database.open({str(hub)!r}) as db:\n"
                     "    db.events.publish('wf', 'inbox', 'm1', {})\n")
    server = subprocess.Popen(["crdt-sync", "serve", str(hub), "--port", "0", "--token", TOKEN],
                              cwd=installed.cwd, env=installed.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, server.kill)
    watchdog.start()
    try:
        banner = server.stdout.readline()
        assert " on ws://127.0.0.1:" in banner, banner + server.stderr.read()
        url = banner.split(" on ")[1].split(";")[0]
        done = installed.run("crdt-sync", "sync", str(client), url, "--token", TOKEN, "--progress")
        assert done.returncode == 0, done.stderr
        assert re.fullmatch(rf"pulled [1-9]\d* changes, pushed 0 changes \({re.escape(url)}\)\n", done.stdout)
        assert "crdt-sync: 100%|" in done.stderr and " changes/s, ETA " in done.stderr
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        if server.poll() is None:
            server.kill()
            server.wait()
    status = installed.run("crdt-sync", "status", str(client))
    assert status.returncode == 0 and "known peers:    1" in status.stdout, status.stderr
    assert "open conflicts: 0" in status.stdout
    doctor = installed.run("crdt-sync", "doctor", str(client))
    assert doctor.returncode == 0 and re.search(r"^sync peers: +1$", doctor.stdout, re.MULTILINE), doctor.stderr


def test_python_dash_m_engine_doctor_finds_the_bundled_extension(installed):
    path = installed.cwd / "doctor.db"
    installed.python(f"from engine import Database\nDatabase.open({str(path)!r}).close()")
    done = installed.run(installed.bin("python"), "-m", "engine", "doctor", str(path))
    assert done.returncode == 0, done.stderr
    extension = re.search(r"^extension: +(.+)$", done.stdout, re.MULTILINE).group(1)
    assert extension.endswith("/engine/_bundled/crsqlite.so") and extension.startswith(str(installed.venv))
    missing = installed.run(installed.bin("python"), "-m", "engine", "doctor", "absent.db")
    assert missing.returncode == 1 and missing.stderr.startswith("python -m engine: error: cannot read absent.db")
