"""A real `nats-server -js` on a loopback port, for tests and benchmarks of `sync.nats`.

    with LocalNatsServer(tmp_path / "nats") as server:      # started, JetStream ready
        replica = sync.nats.replicate(db, server.url, name="app")
        server.restart()                                    # same port, same store

The server binary comes from the Debian package `nats-server` (`make test` installs it with
tools/install-nats-server.sh). It listens on 127.0.0.1 only, keeps its store under the given
directory, and is stopped (SIGTERM, then SIGKILL) by `stop()` / leaving the `with` block.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

__all__ = ["LocalNatsServer", "find_nats_server", "free_port"]

_FALLBACK = Path("/usr/sbin/nats-server")
_READY = "Server is ready"


def find_nats_server() -> str | None:
    """The path of the `nats-server` binary, or None if it is not installed."""
    found = shutil.which("nats-server")
    if found:
        return found
    return str(_FALLBACK) if _FALLBACK.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalNatsServer:
    """One nats-server process with JetStream; see the module docstring."""

    def __init__(self, root: str | Path, *, port: int | None = None, max_payload: int | None = None):
        binary = find_nats_server()
        if binary is None:
            raise FileNotFoundError(2, "nats-server is not installed (tools/install-nats-server.sh installs it)",
                                    "nats-server")
        self.binary = binary
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.root / "server.log"
        self.config_path = self.root / "nats.conf"
        lines = [f"listen: 127.0.0.1:{self.port}", f'jetstream {{ store_dir: "{self.root / "store"}" }}']
        if max_payload is not None:
            lines.append(f"max_payload: {max_payload}")
        self.config_path.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> "LocalNatsServer":
        """Start the process and wait until it reports ready.

        Raises:
            RuntimeError: it exited or was not ready within `timeout` seconds (its log is quoted).
        """
        if self.running:
            return self
        self._log = open(self.log_path, "a")
        offset = self.log_path.stat().st_size
        self._process = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                         stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while _READY not in self._log_since(offset):
            if self._process.poll() is not None or time.monotonic() > deadline:
                text = self._log_since(offset)
                self.stop()
                raise RuntimeError(f"nats-server on port {self.port} did not start:\n{text[-2000:]}")
            time.sleep(0.01)  # sleep-ok: waiting for another process, bounded by the deadline
        return self

    def stop(self) -> None:
        """Stop the process (graceful first). Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, errors="replace") as log:
            log.seek(offset)
            return log.read()

    def __enter__(self) -> "LocalNatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
