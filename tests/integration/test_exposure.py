"""Safe by default: the included health URL tells anonymous callers only the status, and the
metrics view answers 403 to anyone but staff users and holders of ``METRICS_TOKEN``."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, RequestFactory

from jetstream_bridge import metrics
from jetstream_bridge.topology import ensure_topology

pytestmark = pytest.mark.django_db(transaction=True)

HEALTH_TOKEN = "h3alth-T0ken-7f1e"
METRICS_TOKEN = "m3trics-T0ken-2c9a"
DB_HOST = "db-internal.example"


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "HEALTH_TOKEN": HEALTH_TOKEN,
        "METRICS_TOKEN": METRICS_TOKEN,
    }
    from jetstream_bridge.conf import get_config

    ensure_topology(durable="alpha-events")
    return get_config()


def user(*, staff: bool) -> Any:
    return get_user_model().objects.create_user(
        username=f"u-{'staff' if staff else 'plain'}", password="x", is_staff=staff
    )


def health(client: Client, **headers: str) -> tuple[int, dict[str, Any]]:
    response = client.get("/health/jetstream/", headers=headers)
    return response.status_code, response.json()


# -- health --------------------------------------------------------------------------------


def test_health__anonymous_callers_get_only_the_status(bridge: Any, client: Client) -> None:
    assert health(client) == (200, {"status": "healthy"})
    assert health(client, Authorization="Bearer wrong-token") == (200, {"status": "healthy"})
    client.force_login(user(staff=False))
    assert health(client) == (200, {"status": "healthy"})


def test_health__staff_and_token_holders_get_the_details(bridge: Any, client: Client) -> None:
    status, body = health(client, Authorization=f"Bearer {HEALTH_TOKEN}")
    assert status == 200
    assert body["stream"]["name"] == bridge.stream_name
    assert body["servers"]
    client.force_login(user(staff=True))
    status, body = health(client)
    assert body["stream"]["name"] == bridge.stream_name


def test_health__a_database_error_does_not_show_the_host_to_anonymous_callers(
    bridge: Any, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outbox backlog fails with the driver's message, which names the database host.
    from django.db import DatabaseError

    from jetstream_bridge.outbox import OutboxStore

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseError(f'connection to server at "{DB_HOST}" (10.1.2.3), port 5432 failed')

    monkeypatch.setattr(OutboxStore, "backlog", fail)
    _, body = health(client)
    assert DB_HOST not in str(body)
    assert list(body) == ["status"]
    _, body = health(client, Authorization=f"Bearer {HEALTH_TOKEN}")
    assert DB_HOST in str(body)  # the details still help whoever may see them


def test_health__without_a_token_configured_no_bearer_is_accepted(
    jetstream_bridge: Any, client: Client
) -> None:
    ensure_topology(durable="alpha-events")
    assert health(client, Authorization="Bearer ") == (200, {"status": "healthy"})
    assert health(client, Authorization="Bearer None") == (200, {"status": "healthy"})


# -- metrics -------------------------------------------------------------------------------


def scrape(request: Any, *, auth: str | None = None) -> int:
    if auth is not None:
        request.META["HTTP_AUTHORIZATION"] = auth
    return metrics.metrics_view(request).status_code


def test_metrics__anonymous_and_plain_users_are_forbidden(bridge: Any) -> None:
    from django.contrib.auth.models import AnonymousUser

    request = RequestFactory().get("/metrics")
    assert scrape(request) == 403
    request.user = AnonymousUser()
    assert scrape(request, auth="Bearer wrong") == 403
    request = RequestFactory().get("/metrics")
    request.user = user(staff=False)
    assert scrape(request) == 403


def test_metrics__staff_users_and_token_holders_may_scrape(bridge: Any) -> None:
    assert scrape(RequestFactory().get("/metrics"), auth=f"Bearer {METRICS_TOKEN}") == 200
    request = RequestFactory().get("/metrics")
    request.user = user(staff=True)
    assert scrape(request) == 200
