"""Health check, command, view and django-health-check plugin against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import pytest
from django.test import RequestFactory
from django.utils import timezone

from jetstream_bridge.core.topology_plan import desired_subjects
from jetstream_bridge.health import HEALTHY, UNHEALTHY, UNREACHABLE, check, check_async
from jetstream_bridge.models import OutboxEvent
from jetstream_bridge.topology import ensure_topology
from jetstream_bridge.views import HealthView
from tests.helpers import manage, nats, publish_incoming

pytestmark = pytest.mark.django_db(transaction=True)

DURABLE = "alpha-events"
SECRET = "s3cr3t-pa55w0rd"


@pytest.fixture
def bridge(jetstream_bridge: Any) -> Any:
    ensure_topology(durable=DURABLE)
    return jetstream_bridge


@pytest.fixture
def nats_down(jetstream_bridge: Any, settings: Any) -> Any:
    """Point the bridge at a port nothing listens on, with credentials in the URL."""
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "NATS_URLS": [f"nats://user:{SECRET}@127.0.0.1:1"],
        "CONNECT_TIMEOUT": "2s",
    }
    from jetstream_bridge.conf import get_config

    return get_config()


def test_health__healthy_bridge_reports_every_part(bridge: Any) -> None:
    report = check()
    assert report.status == HEALTHY, report.problems
    assert report.problems == ()
    assert report.connected
    assert report.jetstream
    assert report.server_version.startswith("2.")
    assert report.round_trip_ms is not None
    assert report.round_trip_ms > 0
    assert report.stream is not None
    assert report.stream.exists
    assert set(report.stream.subjects) == set(desired_subjects(bridge))
    assert report.subjects == {s: bridge.stream_name for s in desired_subjects(bridge)}
    [consumer] = report.consumers
    assert (consumer.durable, consumer.stream, consumer.lag) == (DURABLE, bridge.stream_name, 0)
    assert consumer.filter_subjects == (bridge.subjects.subscribe,)
    assert report.outbox is not None
    assert report.outbox.unsent == 0
    assert report.dlq is not None
    assert (report.dlq.subject, report.dlq.messages) == (bridge.subjects.dlq, 0)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["status"] == "healthy"
    assert data["consumers"][0]["lag"] == 0
    assert "error" not in data


def test_health__async_twin_gives_the_same_answer(bridge: Any) -> None:
    report = asyncio.run(check_async())
    assert report.status == HEALTHY, report.problems
    assert [c.durable for c in report.consumers] == [DURABLE]


def test_health__other_apps_consumers_on_the_shared_stream_are_not_reported(bridge: Any) -> None:
    from jetstream_bridge.core.topology_plan import consumer_config

    # The peer's durable reads the subject this app publishes to, in the same stream.
    peer = consumer_config(bridge, "beta-events", bridge.subjects.publish)
    nats(lambda c: c.jsm.create_consumer(bridge.stream_name, peer))
    assert [c.durable for c in check().consumers] == [DURABLE]


def test_health__missing_stream_is_unhealthy(jetstream_bridge: Any) -> None:
    report = check()
    assert report.status == UNHEALTHY
    assert report.stream is not None
    assert not report.stream.exists
    assert any("jetstream_ensure_topology" in p for p in report.problems)


def test_health__lagging_consumer_is_unhealthy_over_the_threshold(bridge: Any) -> None:
    publish_incoming(bridge, 10)
    lagging = check(max_consumer_lag=5)
    assert lagging.status == UNHEALTHY
    [consumer] = lagging.consumers
    assert (consumer.num_pending, consumer.num_ack_pending, consumer.lag) == (10, 0, 10)
    assert lagging.problems == (f"consumer {DURABLE} has 10 unacknowledged message(s) (limit 5)",)
    assert check(max_consumer_lag=10).status == HEALTHY
    assert check().status == HEALTHY  # no threshold: lag is reported, not judged
    assert asyncio.run(check_async(max_consumer_lag=5)).status == UNHEALTHY


def test_health__named_durable_that_does_not_exist_is_unhealthy(bridge: Any) -> None:
    report = check([DURABLE, "nobody"])
    assert report.status == UNHEALTHY
    assert [(c.durable, c.exists) for c in report.consumers] == [(DURABLE, True), ("nobody", False)]
    assert report.problems == (f"consumer nobody does not exist on stream {bridge.stream_name}",)
    assert check(["bad.name"]).status == UNHEALTHY


def test_health__old_unsent_outbox_row_is_unhealthy(bridge: Any) -> None:
    OutboxEvent.objects.create(
        event_id="stuck",
        subject=bridge.subjects.publish,
        enqueued_at=timezone.now() - timedelta(hours=1),
    )
    OutboxEvent.objects.create(event_id="done", subject=bridge.subjects.publish, status="sent")
    report = check(max_outbox_age="10m")
    assert report.status == UNHEALTHY
    assert report.outbox is not None
    assert report.outbox.counts == {"pending": 1, "sent": 1}
    assert report.outbox.unsent == 1
    assert report.outbox.oldest_unsent_age is not None
    assert report.outbox.oldest_unsent_age > 3500
    assert "oldest unsent outbox row is 1h old (limit 10m)" in report.problems[0]
    assert check(max_outbox_age=7200).status == HEALTHY


def test_health__dlq_depth_counts_messages_on_the_dlq_subject(bridge: Any) -> None:
    for _ in range(3):
        nats(lambda c: c.publish(bridge.subjects.dlq, b"{}"))
    report = check(max_dlq_depth=2)
    assert report.dlq is not None
    assert report.dlq.messages == 3
    assert report.status == UNHEALTHY
    assert check(max_dlq_depth=3).status == HEALTHY


def test_health__unreachable_nats_answers_fast_and_hides_the_password(nats_down: Any) -> None:
    started = time.monotonic()
    report = check()
    elapsed = time.monotonic() - started
    assert report.status == UNREACHABLE
    assert elapsed < 5
    assert not report.connected
    assert report.servers == ("nats://user:***@127.0.0.1:1",)
    text = json.dumps(report.to_dict()) + repr(report)
    assert SECRET not in text
    assert "could not connect" in report.problems[0]
    started = time.monotonic()
    assert asyncio.run(check_async()).status == UNREACHABLE
    assert time.monotonic() - started < 5


# -- manage.py jetstream_health -----------------------------------------------------------------


def test_health_command__healthy_prints_a_table_and_exits_0(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    result = manage("jetstream_health", env=subprocess_env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "status       HEALTHY" in result.stdout
    assert DURABLE in result.stdout
    assert f"0 message(s) on {bridge.subjects.dlq}" in result.stdout


def test_health_command__lag_over_threshold_exits_1_with_json(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    publish_incoming(bridge, 7)
    result = manage(
        "jetstream_health", "--json", "--max-lag", "3", "--durable", DURABLE, env=subprocess_env
    )
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "unhealthy"
    assert data["consumers"][0]["num_pending"] == 7
    assert data["thresholds"]["max_consumer_lag"] == 3


def test_health_command__missing_stream_exits_1(
    jetstream_bridge: Any, subprocess_env: dict[str, str]
) -> None:
    result = manage("jetstream_health", env=subprocess_env)
    assert result.returncode == 1, result.stderr
    assert "MISSING" in result.stdout


@pytest.mark.parametrize("output", [[], ["--json"]], ids=["table", "json"])
def test_health_command__nats_down_exits_2_fast_without_the_secret(
    nats_down: Any, subprocess_env: dict[str, str], output: list[str]
) -> None:
    started = time.monotonic()
    result = manage("jetstream_health", *output, env=subprocess_env, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed < 10
    assert "unreachable" in result.stdout.lower()
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr


# -- the view -------------------------------------------------------------------------------------


def test_health_view__200_when_healthy(bridge: Any, client: Any) -> None:
    response = client.get("/health/jetstream/")
    assert response.status_code == 200
    assert response.json()["status"] == "healthy"
    assert "no-cache" in response["Cache-Control"]


def test_health_view__503_when_unreachable_without_the_secret(nats_down: Any, client: Any) -> None:
    response = client.get("/health/jetstream/")
    assert response.status_code == 503
    assert response.json()["status"] == "unreachable"
    assert SECRET not in response.content.decode()


def test_health_view__thresholds_and_status_only_mode(bridge: Any) -> None:
    publish_incoming(bridge, 3)
    request = RequestFactory().get("/health/")
    view = HealthView.as_view(max_consumer_lag=2, detail=False)
    response = asyncio.run(view(request))
    assert response.status_code == 503
    assert json.loads(response.content) == {"status": "unhealthy"}
    relaxed = asyncio.run(HealthView.as_view(max_consumer_lag=3)(request))
    assert relaxed.status_code == 200


# -- django-health-check plugin -----------------------------------------------------------------


@pytest.fixture
def health_check_plugin() -> Any:
    base = pytest.importorskip("health_check.base")
    if not hasattr(base, "HealthCheck"):
        pytest.skip("django-health-check < 4 (the plugin targets the 4.x API)")
    from jetstream_bridge.contrib import health_check

    return health_check


def test_health_check_plugin__passes_when_healthy(bridge: Any, health_check_plugin: Any) -> None:
    result = asyncio.run(health_check_plugin.JetStream(durables=(DURABLE,)).get_result())
    assert result.error is None


def test_health_check_plugin__lag_is_an_unexpected_result(
    bridge: Any, health_check_plugin: Any
) -> None:
    from health_check.exceptions import ServiceReturnedUnexpectedResult

    publish_incoming(bridge, 2)
    result = asyncio.run(health_check_plugin.JetStream(max_consumer_lag=1).get_result())
    assert isinstance(result.error, ServiceReturnedUnexpectedResult)
    assert "2 unacknowledged" in str(result.error)


def test_health_check_plugin__unreachable_is_service_unavailable_from_the_cause(
    nats_down: Any, health_check_plugin: Any
) -> None:
    from health_check.exceptions import ServiceUnavailable

    from jetstream_bridge.core.errors import NatsUnavailable

    check_ = health_check_plugin.JetStream()
    result = asyncio.run(check_.get_result())
    assert isinstance(result.error, ServiceUnavailable)
    assert isinstance(result.error.__cause__, NatsUnavailable)
    assert SECRET not in str(result.error) + repr(check_)


def test_health_check_plugin__runs_in_health_check_view(
    bridge: Any, health_check_plugin: Any
) -> None:
    from health_check.views import HealthCheckView

    view = HealthCheckView.as_view(
        checks=[("jetstream_bridge.contrib.health_check.JetStream", {"durables": (DURABLE,)})]
    )
    response = asyncio.run(view(RequestFactory().get("/ht/", {"format": "json"})))
    assert response.status_code == 200
    [(name, outcome)] = json.loads(response.content).items()
    assert name.startswith("JetStream(")
    assert outcome == "OK"
