"""The admin through Django's test client: actions, permissions and the status page."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from jetstream_bridge.admin import OutboxEventAdmin
from jetstream_bridge.conf import get_config
from jetstream_bridge.models import InboxEvent, OutboxEvent
from jetstream_bridge.topology import ensure_topology
from tests.admin_data import inbox_row, invoice_handlers, outbox_row, staff_user
from tests.helpers import nats, publish_incoming, stream_msg_ids
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db

OUTBOX = "/admin/jetstream_bridge/outboxevent/"
INBOX = "/admin/jetstream_bridge/inboxevent/"
STATUS = "/admin/jetstream_bridge/outboxevent/status/"
DURABLE = "alpha-events"


@pytest.fixture
def bridge(jetstream_bridge: Any) -> Any:
    return jetstream_bridge


@pytest.fixture
def handlers_registered() -> Any:
    with invoice_handlers():
        yield


@pytest.fixture
def nats_down(settings: Any) -> str:
    """Point the bridge at a port nobody listens on, with credentials in the URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "NATS_URLS": [f"nats://bob:hunter2@127.0.0.1:{port}"],
        "CONNECT_TIMEOUT": "1s",
    }
    return "hunter2"


def login(client: Client, user: Any) -> Client:
    client.force_login(user)
    return client


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


# -- outbox ---------------------------------------------------------------------------------


def test_admin__outbox_changelist_filters_by_status_and_finds_an_exact_event_id(
    admin_client: Client, bridge: Any
) -> None:
    sent = outbox_row(bridge, status="sent", number=1)
    failed = outbox_row(bridge, status="failed", number=2)
    page = admin_client.get(OUTBOX, {"status__exact": "failed"}).content.decode()
    assert failed.event_id in page
    assert sent.event_id not in page
    assert 'class="jsb-badge jsb-badge--failed"' in page
    assert STATUS in page  # the object-tools link to the status page
    found = admin_client.get(OUTBOX, {"q": sent.event_id}).content.decode()
    assert sent.event_id in found
    assert failed.event_id not in found
    prefix = admin_client.get(OUTBOX, {"q": sent.event_id[:8]}).content.decode()
    assert sent.event_id not in prefix  # exact match only: it uses the index


def test_admin__outbox_detail_is_read_only_and_pretty_prints_the_envelope(
    admin_client: Client, bridge: Any
) -> None:
    row = outbox_row(bridge)
    page = admin_client.get(f"{OUTBOX}{row.pk}/change/").content.decode()
    assert '<pre class="jsb-json">' in page
    assert "&quot;currency&quot;: &quot;EUR&quot;" in page  # indented JSON, not one line
    assert 'name="_save"' not in page
    assert f'action="{OUTBOX}{row.pk}/retry_publishing/"' in page
    assert admin_client.get(f"{OUTBOX}add/").status_code == 403


def test_admin__retry_publishing_sends_a_failed_row_at_once(
    admin_client: Client, bridge: Any
) -> None:
    ensure_topology()
    row = outbox_row(bridge, status="failed")
    response = admin_client.post(
        OUTBOX, {"action": "retry_publishing", "_selected_action": [row.pk]}, follow=True
    )
    assert messages_of(response) == ["1 event(s) published."]
    row.refresh_from_db()
    assert (row.status, row.last_error, row.locked_by) == ("sent", None, None)
    assert row.sent_at is not None
    assert row.stream_seq is not None
    assert stream_msg_ids(bridge.stream_name) == [row.event_id]


def test_admin__retry_publishing_requeues_unsent_rows_and_skips_sent_and_leased_ones(
    admin_client: Client, bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OutboxEventAdmin, "publish_on_retry", False)
    now = timezone.now()
    failed = outbox_row(bridge, status="failed", number=1)
    sent = outbox_row(bridge, status="sent", number=2)
    leased = outbox_row(bridge, status="pending", number=3)
    OutboxEvent.objects.filter(pk=leased.pk).update(
        status="publishing", locked_by="relay-1", locked_until=now + timezone.timedelta(minutes=1)
    )
    lapsed = outbox_row(bridge, status="pending", number=4)
    OutboxEvent.objects.filter(pk=lapsed.pk).update(
        status="publishing", locked_by="relay-0", locked_until=now - timezone.timedelta(minutes=1)
    )
    pks = [failed.pk, sent.pk, leased.pk, lapsed.pk]
    response = admin_client.post(
        OUTBOX, {"action": "retry_publishing", "_selected_action": pks}, follow=True
    )
    assert messages_of(response) == [
        "2 event(s) skipped: already sent, or being published by a relay.",
        "2 event(s) queued for the relay.",
    ]
    rows = {r.pk: r for r in OutboxEvent.objects.all()}
    for pk in (failed.pk, lapsed.pk):
        assert rows[pk].status == "pending"
        assert rows[pk].available_at <= timezone.now()
        assert (rows[pk].locked_by, rows[pk].locked_until) == (None, None)
    assert rows[sent.pk].status == "sent"
    assert (rows[leased.pk].status, rows[leased.pk].locked_by) == ("publishing", "relay-1")


def test_admin__retry_publishing_with_nats_down_leaves_the_row_to_the_relay(
    admin_client: Client, nats_down: str
) -> None:
    row = outbox_row(get_config(), status="failed", attempts=3)
    response = admin_client.post(
        OUTBOX, {"action": "retry_publishing", "_selected_action": [row.pk]}, follow=True
    )
    [message] = messages_of(response)
    assert message.startswith("1 event(s) queued for the relay; not published now: NatsUnavailable")
    assert "@127.0.0.1" in message
    assert nats_down not in response.content.decode()
    row.refresh_from_db()
    assert (row.status, row.attempts, row.locked_by) == ("pending", 3, None)
    assert row.available_at <= timezone.now()


def test_admin__retry_needs_the_retry_permission(client: Client, bridge: Any) -> None:
    row = outbox_row(bridge, status="failed")
    viewer = login(client, staff_user("viewer"))
    page = viewer.get(OUTBOX).content.decode()
    assert row.event_id in page
    assert "retry_publishing" not in page
    assert "retry_publishing" not in viewer.get(f"{OUTBOX}{row.pk}/change/").content.decode()
    viewer.post(OUTBOX, {"action": "retry_publishing", "_selected_action": [row.pk], "index": 0})
    assert viewer.post(f"{OUTBOX}{row.pk}/retry_publishing/").status_code == 403
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("failed", 3)

    operator = login(Client(), staff_user("operator", perms=("retry_outboxevent",)))
    assert "retry_publishing" in operator.get(OUTBOX).content.decode()


# -- inbox ----------------------------------------------------------------------------------


def test_admin__rerun_handler_applies_the_effect_once_and_marks_the_row_processed(
    admin_client: Client, bridge: Any, handlers_registered: None
) -> None:
    row = inbox_row(bridge, status="failed", deliveries=5)
    data = {"action": "rerun_handler", "_selected_action": [row.pk]}
    response = admin_client.post(INBOX, data, follow=True)
    assert messages_of(response) == ["1 event(s) processed."]
    row.refresh_from_db()
    assert (row.status, row.last_error, row.deliveries) == ("processed", None, 5)
    assert row.processed_at is not None
    assert list(Effect.objects.values_list("event_id", flat=True)) == [row.event_id]

    again = admin_client.post(INBOX, data, follow=True)
    assert messages_of(again) == ["1 event(s) skipped: already processed."]
    assert Effect.objects.count() == 1


def test_admin__rerun_handler_that_fails_again_records_the_error_and_keeps_no_writes(
    admin_client: Client, bridge: Any, handlers_registered: None
) -> None:
    row = inbox_row(bridge, event_type="flaky", payload={"fail_times": 99}, deliveries=5)
    response = admin_client.post(
        INBOX, {"action": "rerun_handler", "_selected_action": [row.pk]}, follow=True
    )
    assert messages_of(response) == [
        "1 event(s) failed again: RuntimeError: flaky failure on delivery 5"
    ]
    row.refresh_from_db()
    assert (row.status, row.last_error) == ("failed", "RuntimeError: flaky failure on delivery 5")
    assert not Effect.objects.exists()  # the handler's write rolled back with it


def test_admin__rerun_of_a_malformed_envelope_records_why(
    admin_client: Client, bridge: Any, handlers_registered: None
) -> None:
    row = inbox_row(bridge)
    InboxEvent.objects.filter(pk=row.pk).update(payload={})
    admin_client.post(INBOX, {"action": "rerun_handler", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert row.status == "failed"
    assert row.last_error.startswith("MalformedEnvelope: missing required field(s)")


def test_admin__rerun_button_on_the_detail_page(
    admin_client: Client, bridge: Any, handlers_registered: None
) -> None:
    row = inbox_row(bridge)
    url = f"{INBOX}{row.pk}/rerun_handler/"
    assert f'action="{url}"' in admin_client.get(f"{INBOX}{row.pk}/change/").content.decode()
    assert admin_client.get(url).status_code == 405
    response = admin_client.post(url)
    assert response.status_code == 302
    assert response["Location"] == f"{INBOX}{row.pk}/change/"
    row.refresh_from_db()
    assert row.status == "processed"
    assert admin_client.post(f"{INBOX}999999/rerun_handler/").status_code == 404


def test_admin__rerun_needs_the_rerun_permission(
    client: Client, bridge: Any, handlers_registered: None
) -> None:
    row = inbox_row(bridge)
    viewer = login(client, staff_user("viewer", perms=("retry_outboxevent",)))
    assert "rerun_handler" not in viewer.get(INBOX).content.decode()
    assert "rerun_handler" not in viewer.get(f"{INBOX}{row.pk}/change/").content.decode()
    viewer.post(INBOX, {"action": "rerun_handler", "_selected_action": [row.pk], "index": 0})
    assert viewer.post(f"{INBOX}{row.pk}/rerun_handler/").status_code == 403
    row.refresh_from_db()
    assert row.status == "failed"
    assert not Effect.objects.exists()


# -- status page ----------------------------------------------------------------------------


def test_admin__status_page_shows_stream_consumer_lag_dlq_depth_and_backlog(
    admin_client: Client, bridge: Any
) -> None:
    ensure_topology(durable=DURABLE)
    publish_incoming(bridge, 3)
    nats(lambda c: c.publish(bridge.subjects.dlq, b"{}", {"Jsb-Reason": "max_deliver"}))
    outbox_row(bridge, status="failed", number=1)
    outbox_row(bridge, status="sent", number=2)
    inbox_row(bridge, status="failed")
    response = admin_client.get(STATUS)
    assert response.status_code == 200
    report = response.context["report"]
    assert report.connected
    # The dead letter is in the DLQ's own stream, not among the events.
    assert (report.stream.name, report.stream.messages) == (bridge.stream_name, 3)
    assert bridge.subjects.subscribe in report.stream.subjects
    [consumer] = report.consumers
    assert (consumer.durable, consumer.num_pending, consumer.lag) == (DURABLE, 3, 3)
    assert (report.dlq.stream, report.dlq.messages) == (bridge.dlq_stream_name, 1)
    assert report.outbox.counts == {"failed": 1, "sent": 1}
    assert report.outbox.oldest_unsent_age > 0
    page = response.content.decode()
    assert f"<strong>{bridge.stream_name}</strong>" in page
    assert f'data-consumer="{DURABLE}"' in page
    assert (
        '<tr><td><a href="/admin/jetstream_bridge/inboxevent/?status__exact=failed">'
        '<span class="jsb-badge jsb-badge--failed">failed</span></a></td>'
        '<td class="num">1</td></tr>'
    ) in page
    assert "NATS is unreachable" not in page


def test_admin__status_page_says_when_the_stream_is_missing(
    admin_client: Client, bridge: Any
) -> None:
    page = admin_client.get(STATUS).content.decode()
    assert f"stream {bridge.stream_name} does not exist; run" in page
    assert '<span class="jsb-badge jsb-badge--failed">missing</span>' in page


def test_admin__status_page_reports_unreachable_nats_without_secrets(
    admin_client: Client, nats_down: str
) -> None:
    outbox_row(get_config(), status="failed")
    response = admin_client.get(STATUS)
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="jsb-nats-down"' in page
    assert "NATS is unreachable" in page
    assert "bob:***@127.0.0.1" in page
    assert nats_down not in page
    assert response.context["report"].outbox.counts == {"failed": 1}  # the database part still


def test_admin__status_page_shows_invalid_settings_instead_of_failing(
    admin_client: Client, settings: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "DESTINATION_APP": "bad.token"}
    response = admin_client.get(STATUS)
    assert response.status_code == 200
    assert 'id="jsb-config-error"' in response.content.decode()


def test_admin__status_page_needs_staff_and_the_view_permission(client: Client) -> None:
    assert client.get(STATUS).status_code == 302  # to the login page
    nobody = staff_user("nobody")
    nobody.user_permissions.clear()
    assert login(client, nobody).get(STATUS).status_code == 403


def test_admin__status_page_survives_a_failing_check(
    admin_client: Client, bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**kwargs: Any) -> Any:
        raise KeyError("a server answer the check did not expect")

    monkeypatch.setattr("jetstream_bridge.health.check", broken)
    response = admin_client.get(STATUS)
    assert response.status_code == 200
    assert "KeyError while checking the bridge; see the log." in response.content.decode()
