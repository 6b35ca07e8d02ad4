"""Prometheus metrics against a real nats-server and a real database, read by scraping."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import transaction
from django.test import RequestFactory
from prometheus_client import REGISTRY, generate_latest

from jetstream_bridge import Publisher, metrics
from jetstream_bridge.conf import get_config
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import build_envelope, encode
from jetstream_bridge.core.errors import NatsError
from jetstream_bridge.core.settings import BridgeConfig
from jetstream_bridge.outbox import NewEvent, OutboxStore
from jetstream_bridge.relay import Relay
from jetstream_bridge.runtime import reset_runtime
from jetstream_bridge.topology import ensure_topology
from tests.helpers import nats, publish_incoming, publish_raw, stream_count
from tests.testapp import handlers

pytestmark = pytest.mark.django_db(transaction=True)
DURABLE = "alpha-metrics"


def configure(settings: Any, **overrides: Any) -> BridgeConfig:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, **overrides}
    return get_config()


def sample(name: str, **labels: str) -> float | None:
    """One sample from a scrape of the default registry, as Prometheus would read it."""
    return REGISTRY.get_sample_value(name, labels)


def count(name: str, **labels: str) -> float:
    return sample(name, **labels) or 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> BridgeConfig:
    config = configure(
        settings,
        OUTBOX_FAST_PATH=False,  # the relay publishes, so its counters move
        MAX_DELIVER=2,
        ACK_WAIT="2s",
        BACKOFF=["200ms"],
        RELAY_RETRY_BACKOFF=["100ms"],
    )
    ensure_topology(durable=DURABLE)
    return config


def publish_order(number: int, **options: Any) -> Any:
    return Publisher().publish(
        resource_type="order", event_type="created", payload={"id": number}, **options
    )


def test_metrics__publish_and_relay_move_the_counters_and_the_backlog_gauges(
    bridge: BridgeConfig,
) -> None:
    queued = count("jetstream_bridge_published_total", status="queued")
    relayed = count("jetstream_bridge_relayed_total")
    failures = count("jetstream_bridge_relay_failures_total")

    for number in range(3):
        publish_order(number)
    # A row no stream captures: the relay's publish of it fails.
    OutboxStore(bridge).write(
        NewEvent(
            event_id="stray-1",
            subject="nowhere.at.all",
            envelope=build_envelope(
                producer="alpha", resource_type="order", event_type="lost", payload={}
            ),
            headers={},
            explicit_id=True,
        )
    )

    assert count("jetstream_bridge_published_total", status="queued") - queued == 3
    assert sample("jetstream_bridge_outbox_rows", status="pending") == 4
    assert sample("jetstream_bridge_outbox_rows", status="sent") == 0
    age = sample("jetstream_bridge_outbox_oldest_unsent_age_seconds")
    assert age is not None
    assert age > 0

    Relay().drain()

    assert count("jetstream_bridge_relayed_total") - relayed == 3
    assert count("jetstream_bridge_relay_failures_total") - failures == 1
    assert sample("jetstream_bridge_outbox_rows", status="pending") == 0
    assert sample("jetstream_bridge_outbox_rows", status="sent") == 3
    assert sample("jetstream_bridge_outbox_rows", status="failed") == 1
    assert sample("jetstream_bridge_scrape_success", source="outbox") == 1
    assert sample("jetstream_bridge_scrape_success", source="nats") == 1


def test_metrics__publish_without_outbox_counts_sent_duplicate_and_deferred(
    bridge: BridgeConfig, settings: Any
) -> None:
    configure(settings, USE_OUTBOX=False)
    before = {
        status: count("jetstream_bridge_published_total", status=status)
        for status in ("sent", "duplicate", "deferred")
    }
    publish_order(1, event_id="order-1")
    publish_order(1, event_id="order-1")
    with transaction.atomic():
        publish_order(2)
    wait_for(lambda: stream_count(bridge.stream_name) == 2)  # the deferred send, after commit
    after = {status: count("jetstream_bridge_published_total", status=status) for status in before}
    assert {status: after[status] - before[status] for status in before} == {
        "sent": 1,
        "duplicate": 1,
        "deferred": 1,
    }


def test_metrics__consuming_counts_each_outcome_times_handlers_and_reports_lag(
    bridge: BridgeConfig,
) -> None:
    labels = {"consumer": DURABLE}
    before = {
        outcome: count("jetstream_bridge_consumed_total", outcome=outcome, **labels)
        for outcome in ("processed", "duplicate", "retried", "dead_lettered")
    }
    dead = count("jetstream_bridge_dead_lettered_total", reason=dead_letter.MAX_DELIVER, **labels)
    timed = count("jetstream_bridge_handler_duration_seconds_count", **labels)

    publish_incoming(bridge, 3)
    publish_incoming(bridge, 1, payload={"poison": True}, start=100)
    twice = build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 200}
    )
    # Different Nats-Msg-Id, so the stream keeps both and the inbox sees a duplicate.
    publish_raw(bridge, encode(twice), {"Nats-Msg-Id": "first"})
    publish_raw(bridge, encode(twice), {"Nats-Msg-Id": "second"})

    lag = {"stream": bridge.stream_name, "consumer": DURABLE}
    assert sample("jetstream_bridge_consumer_pending_messages", **lag) == 6
    assert sample("jetstream_bridge_consumer_ack_pending_messages", **lag) == 0

    consumer = Consumer(
        durable_name=DURABLE,
        handler=handlers.always_fails,
        batch_size=10,
        stop_when_idle=True,
        idle_timeout=1.0,
    )
    stats = asyncio.run(consumer.run_async())
    assert (stats.processed, stats.duplicates, stats.retried, stats.dead_lettered) == (4, 1, 1, 1)

    moved = {
        outcome: count("jetstream_bridge_consumed_total", outcome=outcome, **labels) - value
        for outcome, value in before.items()
    }
    assert moved == {"processed": 4, "duplicate": 1, "retried": 1, "dead_lettered": 1}
    assert count(
        "jetstream_bridge_dead_lettered_total", reason=dead_letter.MAX_DELIVER, **labels
    ) == (dead + 1)
    # Four successful calls and two failing ones; the duplicate never reaches the handler.
    assert count("jetstream_bridge_handler_duration_seconds_count", **labels) - timed == 6
    assert sample("jetstream_bridge_consumer_pending_messages", **lag) == 0
    assert sample("jetstream_bridge_consumer_ack_pending_messages", **lag) == 0


def scraper_request() -> Any:
    """A request from a staff user (anyone else is refused: tests/integration/test_exposure)."""
    from django.contrib.auth.models import User

    request = RequestFactory().get("/metrics")
    request.user = User(username="scraper", is_staff=True, is_active=True)
    return request


def test_metrics__view_serves_the_default_registry(bridge: BridgeConfig) -> None:
    publish_order(1)
    response = metrics.metrics_view(scraper_request())
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    body = response.content.decode()
    assert 'jetstream_bridge_published_total{status="queued"}' in body
    assert 'jetstream_bridge_outbox_rows{status="pending"} 1.0' in body


@pytest.fixture(params=["refusing", "silent"])
def dead_nats_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A port that refuses connections, or one that accepts them and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        if request.param == "silent":
            listener.listen(8)
        yield f"nats://127.0.0.1:{listener.getsockname()[1]}"


def test_metrics__unreachable_nats_does_not_break_or_stall_the_scrape(
    settings: Any, dead_nats_url: str
) -> None:
    reset_runtime()
    # A connect that outlasts the scrape's own timeout.
    configure(settings, NATS_URLS=[dead_nats_url], CONNECT_TIMEOUT="3s", OUTBOX_FAST_PATH=False)
    try:
        publish_order(1)
        started = time.monotonic()
        text = generate_latest(REGISTRY).decode()
        assert time.monotonic() - started < metrics.SCRAPE_TIMEOUT + 1
        assert 'jetstream_bridge_scrape_success{source="nats"} 0.0' in text
        assert 'jetstream_bridge_scrape_success{source="outbox"} 1.0' in text
        assert 'jetstream_bridge_outbox_rows{status="pending"} 1.0' in text
        assert "jetstream_bridge_consumer_pending_messages{" not in text
    finally:
        # The scrape left its connect attempt running; let it fail before closing the loop.
        with pytest.raises(NatsError):
            nats(lambda conn: conn.flush())
        reset_runtime()


def test_metrics__without_prometheus_client_every_function_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Simulates the extra not being installed: the module checks this flag on every call.
    monkeypatch.setattr(metrics, "ENABLED", False)
    samples = [
        ("jetstream_bridge_published_total", {"status": "sent"}),
        ("jetstream_bridge_relayed_total", {}),
        ("jetstream_bridge_relay_failures_total", {}),
        ("jetstream_bridge_consumed_total", {"consumer": "c", "outcome": "processed"}),
        ("jetstream_bridge_dead_lettered_total", {"consumer": "c", "reason": dead_letter.REJECTED}),
    ]
    before = [REGISTRY.get_sample_value(name, labels) for name, labels in samples]

    def handler(event: dict[str, Any], subject: str, deliveries: int) -> None:
        pass

    metrics.published("sent")
    metrics.relayed(5, 2)
    metrics.consumed("c", "processed")
    metrics.dead_lettered("c", dead_letter.REJECTED)
    assert metrics.timed(handler, "c") is handler
    assert list(metrics.COLLECTOR.collect()) == []
    response = metrics.metrics_view(scraper_request())
    assert response.status_code == 501
    assert b"pip install 'django-jetstream-bridge[metrics]'" in response.content
    assert [REGISTRY.get_sample_value(name, labels) for name, labels in samples] == before


def test_metrics__module_imports_and_does_nothing_when_prometheus_client_is_absent() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # how a missing package looks to `import`
        from jetstream_bridge import metrics

        def handler(event, subject, deliveries):
            pass

        assert metrics.ENABLED is False
        metrics.published("sent")
        metrics.relayed(1, 1)
        metrics.consumed("c", "processed")
        metrics.dead_lettered("c", "rejected")
        assert metrics.timed(handler, "c") is handler
        assert list(metrics.COLLECTOR.collect()) == []
        print("no-op")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout.strip()) == (0, "no-op"), result.stderr
