"""Process, wait and verification helpers shared by the chaos scenarios.

Every scenario owns its nats-server(s) and worker processes, starts them on loopback and stops
them by PID. Waits poll a condition against a deadline; nothing sleeps for a fixed time to let
a race settle.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from jetstream_bridge.broker import Connection
from jetstream_bridge.core.envelope import MSG_ID_HEADER
from jetstream_bridge.core.errors import JetStreamBridgeError
from jetstream_bridge.models import OutboxEvent, OutboxStatus
from jetstream_bridge.runtime import get_runtime
from jetstream_bridge.testing.server import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[2]
RESULTS_FILE = ROOT / ".chaos-results.json"
FULL = os.environ.get("JSB_CHAOS_SCALE", "").lower() == "full"
SEED = int(os.environ.get("JSB_CHAOS_SEED", "20240611"))

# Timings short enough that a campaign drains in seconds after its last fault. ACK_WAIT is
# how long a message held by a killed worker waits before it is redelivered; DUPLICATE_WINDOW
# must outlast RELAY_LEASE (check E015) so a re-sent lease is dropped by the server.
CHAOS_SETTINGS: dict[str, Any] = {
    "CONNECT_TIMEOUT": "2s",
    "REQUEST_TIMEOUT": "2s",
    "ACK_WAIT": "5s",
    "MAX_DELIVER": 10,
    "BACKOFF": ["200ms", "500ms", "1s"],
    "RELAY_LEASE": "5s",
    "DUPLICATE_WINDOW": "5m",
    "RELAY_RETRY_BACKOFF": ["200ms", "500ms", "1s"],
    "RELAY_POLL_INTERVAL": "200ms",
    "RELAY_BATCH_SIZE": 200,
}

PRODUCER_APP, CONSUMER_APP = "alpha", "beta"
DURABLE = "chaos"


def scaled(reduced: Any, full: Any) -> Any:
    """Pick the campaign size: ``JSB_CHAOS_SCALE=full`` (``make chaos``) or the CI default."""
    return full if FULL else reduced


def rng(name: str) -> random.Random:
    """A random source per scenario, reproducible with ``JSB_CHAOS_SEED``."""
    return random.Random(f"{SEED}:{name}")


def require_postgres() -> None:
    import pytest

    if connection.vendor != "postgresql":
        pytest.skip(
            "multi-process chaos scenarios need PostgreSQL (set DATABASE_URL=postgres://...): "
            "SQLite serialises writers across processes, so the run would measure lock waits"
        )


# -- settings and environment for worker processes -------------------------------------------


def database_url(application_name: str | None = None) -> str:
    db = django_settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    url = f"postgres://{user}@{host}:{port}/{db['NAME']}"
    return f"{url}?application_name={application_name}" if application_name else url


def worker_env(
    *, app: str, dest: str, urls: Iterable[str], role: str, overrides: dict[str, Any]
) -> dict[str, str]:
    """Environment for ``python -m django ...``: the test database and this bridge's settings.

    ``role`` becomes the PostgreSQL ``application_name``, so a test can find (and terminate)
    one kind of worker's database sessions.
    """
    bridge = {**django_settings.JETSTREAM_BRIDGE, **overrides}
    bridge.update(APP_NAME=app, DESTINATION_APP=dest, NATS_URLS=list(urls))
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        PYTHONPATH=str(ROOT),
        DATABASE_URL=database_url(f"jsb-chaos-{role}"),
        JSB_TEST_OVERRIDES=json.dumps(bridge),
    )
    env.pop("PYTHONDEVMODE", None)
    return env


# -- worker processes --------------------------------------------------------------------------


class Worker:
    """One ``python -m django <command>`` process, logging to a file (never a pipe that fills)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> Worker:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start #{self.starts}: {' '.join(self.args)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "django", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def kill(self) -> None:
        """SIGKILL by PID: a crash with no chance to clean up."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.kills += 1

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM by PID and wait for the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s\n{self.tail()}")

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Fleet:
    """The worker processes of one scenario; long-running ones must never die on their own."""

    log_dir: Path
    workers: list[Worker] = field(default_factory=list)

    def add(self, worker: Worker) -> Worker:
        self.workers.append(worker)
        return worker.start()

    def check(self) -> None:
        """Fail at once if a worker exited unexpectedly (producers may exit 0 when done)."""
        for worker in self.workers:
            code = worker.returncode
            if code is None:
                continue
            if code != 0 or not worker.name.startswith("producer"):
                raise AssertionError(
                    f"{worker.name} exited with {code} unexpectedly:\n{worker.tail()}"
                )

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every worker still running; return the exit codes."""
        codes = {}
        for worker in self.workers:
            if worker.running:
                codes[worker.name] = worker.terminate()
        return codes

    def kill_all(self) -> None:
        for worker in self.workers:
            if worker.running:
                worker.kill()


def wait_until(
    condition: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    tick: Callable[[], None] | None = None,
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if tick is not None:
            tick()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- NATS and database inspection ------------------------------------------------------------


def nats_call(job: Callable[[Connection], Any], timeout: float = 120) -> Any:
    return get_runtime().call(job, timeout=timeout)


def read_stream(stream: str) -> list[Any]:
    """Every message stream ``stream`` stores (subject, headers, body), in order."""
    from tests.helpers import stream_messages

    return stream_messages(stream)


def effect_ids() -> list[str]:
    from tests.testapp.models import Effect

    return list(Effect.objects.values_list("event_id", flat=True))


def outbox_state() -> dict[str, Any]:
    counts = Counter(OutboxEvent.objects.values_list("status", flat=True))
    stuck = OutboxEvent.objects.filter(
        status=OutboxStatus.PUBLISHING, locked_until__lt=timezone.now()
    ).count()
    return {"counts": dict(counts), "stuck_publishing": stuck}


def outbox_drained(expected: int) -> bool:
    return OutboxEvent.objects.filter(status=OutboxStatus.SENT).count() >= expected


def consumer_settled(stream: str, durable: str = DURABLE) -> bool:
    try:
        info = nats_call(lambda c: c.jsm.consumer_info(stream, durable), timeout=30)
    except JetStreamBridgeError:
        return False  # a node is restarting or a leader is being elected: ask again
    return bool(info) and info.num_pending == 0 and info.num_ack_pending == 0


# -- verdict -------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What a campaign delivered, judged from the Effect table, the outbox and the stream."""

    expected: int
    applied: int
    distinct: int
    lost: int
    duplicated: int
    unexpected: int
    outbox: dict[str, Any]
    stream_missing: int
    stream_copies: int
    retried_rows: int  # rows a relay claimed or a failed fast path left to it

    def assert_exactly_once(self) -> None:
        problems = []
        if not (self.applied == self.distinct == self.expected):
            problems.append(
                f"effects: {self.applied} rows, {self.distinct} distinct, {self.expected} expected"
            )
        if self.lost or self.duplicated or self.unexpected:
            problems.append(
                f"lost {self.lost}, duplicated {self.duplicated}, unexpected {self.unexpected}"
            )
        if self.stream_missing:
            problems.append(f"{self.stream_missing} event(s) never reached the stream")
        sent = self.outbox["counts"].get(OutboxStatus.SENT, 0)
        if self.outbox["counts"] and sent != sum(self.outbox["counts"].values()):
            problems.append(f"outbox not drained: {self.outbox['counts']}")
        if self.outbox["stuck_publishing"]:
            problems.append(f"{self.outbox['stuck_publishing']} row(s) stuck publishing")
        assert not problems, "; ".join(problems)


def judge(expected_ids: set[str], stream: str, subject: str) -> Verdict:
    applied = effect_ids()
    counts = Counter(applied)
    got = set(counts)
    on_stream = Counter(
        m.headers.get(MSG_ID_HEADER, "") for m in read_stream(stream) if m.subject == subject
    )
    return Verdict(
        expected=len(expected_ids),
        applied=len(applied),
        distinct=len(got),
        lost=len(expected_ids - got),
        duplicated=sum(n - 1 for n in counts.values() if n > 1),
        unexpected=len(got - expected_ids),
        outbox=outbox_state(),
        stream_missing=len(expected_ids - set(on_stream)),
        stream_copies=sum(n - 1 for i, n in on_stream.items() if n > 1 and i in expected_ids),
        retried_rows=OutboxEvent.objects.filter(attempts__gt=0).count(),
    )


def expected_ids(producers: int, per_producer: int) -> set[str]:
    return {f"p{p}-{n:06d}" for p in range(producers) for n in range(per_producer)}


# -- campaigns and results -----------------------------------------------------------------

recorded: list[dict[str, Any]] = []


def record(figures: dict[str, Any]) -> None:
    """Keep one scenario's figures for the summary line and the results file."""
    figures = {"scale": "full" if FULL else "reduced", **figures}
    recorded.append(figures)
    try:
        previous = json.loads(RESULTS_FILE.read_text())
    except (FileNotFoundError, ValueError):
        previous = {}
    previous.setdefault("scenarios", {})[figures["scenario"]] = figures
    previous["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS_FILE.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


def summary_line(figures: dict[str, Any]) -> str:
    keys = ("events", "faults", "lost", "duplicated", "drain_s", "elapsed_s")
    main = " ".join(f"{key}={figures[key]}" for key in keys if key in figures)
    return f"{figures['scenario']:<16} [{figures['scale']}] {main}"


class Campaign:
    """One scenario's servers, settings and worker processes, all torn down by PID."""

    def __init__(self, name: str, settings: Any, tmp_path: Path) -> None:
        self.name = name
        self.scenario = name
        self.settings = settings
        self.tmp_path = tmp_path
        self.servers: list[NatsServer] = []
        self.fleet = Fleet(tmp_path)
        self.env_token = f"c{uuid.uuid4().hex[:10]}"
        self.overrides: dict[str, Any] = {}
        self.faults = 0
        self.started = time.monotonic()
        self.last_fault = self.started

    # -- servers and settings --

    def server(self, **kwargs: Any) -> NatsServer:
        server = NatsServer(**kwargs)
        self.servers.append(server)
        return server.start(timeout=60)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def configure(self, **overrides: Any) -> Any:
        """Point this process's bridge at the campaign's servers (as the producer app)."""
        from jetstream_bridge.conf import get_config
        from jetstream_bridge.runtime import reset_runtime

        self.overrides = {**CHAOS_SETTINGS, **overrides}
        self.settings.JETSTREAM_BRIDGE = {
            **self.settings.JETSTREAM_BRIDGE,
            **self.overrides,
            "ENV": self.env_token,
            "APP_NAME": PRODUCER_APP,
            "DESTINATION_APP": CONSUMER_APP,
            "NATS_URLS": self.urls,
        }
        reset_runtime()
        return get_config()

    # -- workers --

    def env(self, role: str, *, consumer: bool) -> dict[str, str]:
        app, dest = (CONSUMER_APP, PRODUCER_APP) if consumer else (PRODUCER_APP, CONSUMER_APP)
        return worker_env(
            app=app,
            dest=dest,
            urls=self.urls,
            role=role,
            overrides={**self.overrides, "ENV": self.env_token},
        )

    def producer(self, index: int, count: int, *, batch: int = 50) -> Worker:
        args = ["chaos_produce", "--count", str(count), "--tag", f"p{index}"]
        args += ["--batch", str(batch)]
        return self.fleet.add(
            Worker(f"producer-{index}", args, self.env("producer", consumer=False), self.tmp_path)
        )

    def relay(self, index: int) -> Worker:
        return self.fleet.add(
            Worker(
                f"relay-{index}",
                ["jetstream_relay"],
                self.env("relay", consumer=False),
                self.tmp_path,
            )
        )

    def consumer(
        self, index: int, *, handler: str = "tests.testapp.handlers.record_effect"
    ) -> Worker:
        args = ["jetstream_consume", "--durable", DURABLE, "--batch-size", "50"]
        args += ["--handler", handler]
        return self.fleet.add(
            Worker(f"consumer-{index}", args, self.env("consumer", consumer=True), self.tmp_path)
        )

    def fault(self) -> None:
        self.faults += 1
        self.last_fault = time.monotonic()

    def teardown(self) -> None:
        from jetstream_bridge.runtime import reset_runtime

        self.fleet.kill_all()
        reset_runtime()
        for server in self.servers:
            server.cleanup()


def cluster_config(name: str, port: int, routes: list[int]) -> str:
    route_urls = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
    return f"cluster {{\n  name: {name}\n  listen: 127.0.0.1:{port}\n  routes: [{route_urls}]\n}}\n"


def cluster_ports(size: int) -> list[tuple[int, int]]:
    """(client port, cluster port) per node."""
    return [(free_port(), free_port()) for _ in range(size)]


# -- the traffic campaign shared by the broker, worker, cluster and database scenarios ----------


def distinct_effects() -> int:
    from tests.testapp.models import Effect

    return int(Effect.objects.values("event_id").distinct().count())


def progress(total: int) -> float:
    """How far a campaign is: half for events in the outbox, half for effects applied."""
    written = OutboxEvent.objects.count()
    return (written + distinct_effects()) / (2 * total)


@dataclass
class Traffic:
    """Producers publishing through the outbox, relays and consumers running throughout."""

    campaign: Campaign
    config: Any
    producers: int
    per_producer: int
    relays: int = 1
    consumers: int = 2
    producer_batch: int = 50

    @property
    def total(self) -> int:
        return self.producers * self.per_producer

    def start(self) -> None:
        for index in range(self.relays):
            self.campaign.relay(index)
        for index in range(self.consumers):
            self.campaign.consumer(index)
        for index in range(self.producers):
            self.campaign.producer(index, self.per_producer, batch=self.producer_batch)

    def inject(
        self,
        faults: int,
        fault: Callable[[int], None],
        *,
        seed: str,
        timeout: float,
        until: float = 0.9,
    ) -> None:
        """Call ``fault(k)`` ``faults`` times at random points of the campaign's progress."""
        chooser = rng(seed)
        points = sorted(chooser.uniform(0.05, until) for _ in range(faults))
        for k, point in enumerate(points):
            wait_until(
                lambda point=point: progress(self.total) >= point,
                timeout=timeout,
                what=f"progress {point:.0%} before fault {k + 1}",
                tick=self.campaign.fleet.check,
            )
            fault(k)
            self.campaign.fault()

    def drain(self, *, timeout: float) -> float:
        """Wait until every event is applied and everything settled; return the seconds since
        the last fault."""
        campaign = self.campaign
        try:
            wait_until(
                lambda: (
                    distinct_effects() >= self.total
                    and outbox_drained(self.total)
                    and consumer_settled(self.config.stream_name)
                ),
                timeout=timeout,
                what="every event applied, the outbox drained and the consumer settled",
                interval=0.5,
                tick=campaign.fleet.check,
            )
        except AssertionError as exc:
            verdict = judge(self.expected, self.config.stream_name, self.subject)
            tails = "\n".join(f"--- {w.name}\n{w.tail(15)}" for w in campaign.fleet.workers)
            raise AssertionError(f"{exc}\n{verdict}\n{tails}") from None
        return time.monotonic() - campaign.last_fault

    @property
    def expected(self) -> set[str]:
        return expected_ids(self.producers, self.per_producer)

    @property
    def subject(self) -> str:
        return str(self.config.subjects.publish)

    def finish(self, *, drain_timeout: float, **figures: Any) -> dict[str, Any]:
        """Drain, stop every worker with SIGTERM, judge and record the figures."""
        campaign = self.campaign
        drain_s = self.drain(timeout=drain_timeout)
        for worker in campaign.fleet.workers:
            if worker.name.startswith("producer"):
                code = worker.wait(120)
                assert code == 0, f"{worker.name} exited {code}\n{worker.tail()}"
        codes = campaign.fleet.stop_all()
        assert all(code == 0 for code in codes.values()), (
            f"workers did not exit 0 on SIGTERM: {codes}"
        )
        verdict = judge(self.expected, self.config.stream_name, self.subject)
        result = {
            "scenario": campaign.scenario,
            "events": self.total,
            "faults": campaign.faults,
            "lost": verdict.lost,
            "duplicated": verdict.duplicated,
            "drain_s": round(drain_s, 1),
            "elapsed_s": round(time.monotonic() - campaign.started, 1),
            "stream_copies": verdict.stream_copies,
            "rows_via_relay": verdict.retried_rows,
            "worker_starts": {w.name: w.starts for w in campaign.fleet.workers},
            **figures,
        }
        record(result)
        verdict.assert_exactly_once()
        return result
