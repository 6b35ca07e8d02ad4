"""Starting up: build steps without the run-time environment, workers started before NATS.

Real processes throughout: ``manage.py`` subprocesses, a nats-server started on a port only
after the worker is already waiting for it, and the test database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.test import override_settings

from jetstream_bridge import Publisher
from jetstream_bridge.conf import get_config
from jetstream_bridge.exceptions import ConfigurationError
from jetstream_bridge.models import OutboxEvent, OutboxStatus
from jetstream_bridge.runtime import reset_runtime
from jetstream_bridge.testing.server import NatsServer, free_port
from jetstream_bridge.topology import ensure_topology
from tests.helpers import publish_incoming, spawn, stream_msg_ids
from tests.testapp.models import Effect

DURABLE = "startup-events"
WAITING = "waiting for NATS (attempt"


class Output:
    """Collect a subprocess's stdout and stderr lines as they come (the pipes never fill)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(process.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(pipe: Any, into: list[str]) -> None:
        for line in pipe:
            into.append(line)

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.stderr) < count:
            assert self.process.poll() is None, f"exited {self.process.returncode}: {self.text}"
            assert time.monotonic() < deadline, f"no {count} x {text!r} in: {self.text}"
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> int:
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for thread in self._threads:
            thread.join(5)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return code

    @property
    def text(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)


class LateNats:
    """A port where no server listens yet, and the nats-server that will come up there."""

    def __init__(self) -> None:
        self.server = NatsServer(port=free_port())
        # Credentials in the URL: the server does not check them, the logs must hide them.
        self.url = f"nats://user:secret@127.0.0.1:{self.server.port}"
        self.redacted = f"nats://user:***@127.0.0.1:{self.server.port}"


@pytest.fixture
def late_nats(jetstream_bridge: Any, settings: Any) -> Iterator[LateNats]:
    late = LateNats()
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "NATS_URLS": [late.server.url],
        "CONNECT_TIMEOUT": "1s",
    }
    try:
        yield late
    finally:
        reset_runtime()
        late.server.cleanup()


def worker_env(subprocess_env: dict[str, str], late: LateNats) -> dict[str, str]:
    return {**subprocess_env, "NATS_URLS": late.url}


def assert_waited_with_redacted_url(output: Output, late: LateNats) -> None:
    waits = [line for line in output.stderr if WAITING in line]
    assert len(waits) >= 2
    assert all(late.redacted in line and "Next attempt in" in line for line in waits), waits
    assert "secret" not in output.text


@pytest.mark.django_db(transaction=True)
def test_consume__started_before_nats_waits_then_handles_the_event_once(
    late_nats: LateNats, subprocess_env: dict[str, str]
) -> None:
    worker = Output(
        spawn(
            "jetstream_consume",
            "--durable",
            DURABLE,
            "--handler",
            "tests.testapp.handlers.record_effect",
            "--max-messages",
            "1",
            env=worker_env(subprocess_env, late_nats),
        )
    )
    worker.wait_for(WAITING, count=2)
    late_nats.server.start()
    ensure_topology()  # the consumer makes it too once connected; either may come first
    [event_id] = publish_incoming(get_config(), 1)
    assert worker.finish(timeout=90) == 0, worker.text
    assert "processed 1," in worker.text
    assert_waited_with_redacted_url(worker, late_nats)
    assert list(Effect.objects.values_list("event_id", flat=True)) == [event_id]


@pytest.mark.django_db(transaction=True)
def test_relay__started_before_nats_waits_then_sends_each_row_once(
    late_nats: LateNats, subprocess_env: dict[str, str], settings: Any
) -> None:
    # The stream exists on the server's store from an earlier life, as after a broker restart.
    late_nats.server.start()
    ensure_topology()
    reset_runtime()
    late_nats.server.stop()
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "OUTBOX_FAST_PATH": False}
    with transaction.atomic():
        sent = [
            Publisher()
            .publish(resource_type="order", event_type="created", payload={"id": i})
            .event_id
            for i in range(5)
        ]
    relay = Output(spawn("jetstream_relay", "--once", env=worker_env(subprocess_env, late_nats)))
    relay.wait_for(WAITING, count=2)
    late_nats.server.start()
    assert relay.finish(timeout=90) == 0, relay.text
    assert "relayed 5 event(s), 0 failed" in relay.text
    assert_waited_with_redacted_url(relay, late_nats)
    assert sorted(stream_msg_ids(get_config().stream_name)) == sorted(sent)
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}


WORKERS = [
    ("jetstream_consume", "--durable", DURABLE),
    ("jetstream_relay",),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("command", WORKERS, ids=lambda c: c[0])
def test_worker__no_wait_exits_2_at_once_naming_the_redacted_server(
    late_nats: LateNats, subprocess_env: dict[str, str], command: tuple[str, ...]
) -> None:
    started = time.monotonic()
    worker = Output(spawn(*command, "--no-wait", env=worker_env(subprocess_env, late_nats)))
    assert worker.finish(timeout=60) == 2, worker.text
    took = time.monotonic() - started
    assert took < 10, f"--no-wait took {took:.1f}s"
    assert late_nats.redacted in "".join(worker.stderr)
    assert "secret" not in worker.text
    assert WAITING not in worker.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("command", WORKERS, ids=lambda c: c[0])
def test_worker__signal_while_waiting_exits_0_without_traceback(
    late_nats: LateNats, subprocess_env: dict[str, str], command: tuple[str, ...], signum: int
) -> None:
    worker = Output(spawn(*command, env=worker_env(subprocess_env, late_nats)))
    worker.wait_for(WAITING)
    worker.process.send_signal(signum)
    assert worker.finish(timeout=15) == 0, worker.text
    assert "Traceback" not in worker.text
    assert "stopped while waiting for NATS" in "".join(worker.stdout)


# -- build steps without the run-time environment ----------------------------------------------

PROJECT_SETTINGS = """
SECRET_KEY = "build-step"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
    "jetstream_bridge",
]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "/static/"
STATIC_ROOT = {static!r}
# What an image build sees: no DESTINATION_APP anywhere.
JETSTREAM_BRIDGE = {{"APP_NAME": "shop"}}
"""

# Our own suite's settings must not leak into the project's runs.
OURS = ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "PYTHONPATH", "NATS_URLS", "NATS_ENV")
OURS += ("APP_NAME", "DESTINATION_APP", "JSB_TEST_OVERRIDES", "PYTHONDEVMODE")


@pytest.fixture
def build_project(tmp_path: Path) -> dict[str, str]:
    """A project without DESTINATION_APP on a fresh SQLite file; return its environment."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    text = PROJECT_SETTINGS.format(db=str(tmp_path / "db.sqlite3"), static=str(tmp_path / "st"))
    (tmp_path / "shop" / "settings.py").write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    return {**env, "PYTHONPATH": str(tmp_path), "DJANGO_SETTINGS_MODULE": "shop.settings"}


def django(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build__migrate_and_collectstatic_pass_without_destination_app(
    build_project: dict[str, str], tmp_path: Path
) -> None:
    migrate = django(build_project, "migrate", "--no-input")
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "Applying jetstream_bridge.0001" in migrate.stdout
    collect = django(build_project, "collectstatic", "--no-input")
    assert collect.returncode == 0, collect.stdout + collect.stderr
    assert any((tmp_path / "st").rglob("*.css")), "collectstatic copied nothing"


def test_build__check_deploy_still_fails_naming_the_key(build_project: dict[str, str]) -> None:
    result = django(build_project, "check", "--deploy")
    assert result.returncode != 0
    assert "(jetstream_bridge.E003) JETSTREAM_BRIDGE['DESTINATION_APP'] is not set" in (
        result.stderr
    )
    assert "HINT: Add 'DESTINATION_APP': 'billing'" in result.stderr


@pytest.mark.parametrize("command", WORKERS, ids=lambda c: c[0])
def test_build__workers_refuse_to_start_without_destination_app(
    build_project: dict[str, str], command: tuple[str, ...]
) -> None:
    assert django(build_project, "migrate", "--no-input").returncode == 0
    result = django(build_project, *command)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "jetstream_bridge.E003" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.django_db
def test_publish__without_destination_app_raises_the_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DESTINATION_APP", raising=False)
    with (
        override_settings(JETSTREAM_BRIDGE={"APP_NAME": "shop"}),
        pytest.raises(ConfigurationError, match=r"E003.*HINT: Add 'DESTINATION_APP'"),
    ):
        Publisher().publish(resource_type="order", event_type="created", payload={})
    assert not OutboxEvent.objects.exists()
