"""The admin in a real browser: Debian's chromium, driven by Playwright, against a live server.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``); Playwright never downloads a
browser here (``conftest.py`` starts it). Set ``JSB_SCREENSHOT_DIR`` to keep the screenshots the
last test takes (``docs/screenshots/make_screenshots.py`` does).
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jetstream_bridge.broker import Connection
from jetstream_bridge.models import InboxEvent, OutboxEvent
from jetstream_bridge.topology import ensure_topology
from tests.admin_data import (
    inbox_row,
    invoice_handlers,
    outbox_row,
    staff_user,
    superuser,
)
from tests.browser.conftest import CHROMIUM, NO_CHROMIUM, log_in
from tests.helpers import nats, publish_incoming, stream_msg_ids
from tests.testapp.models import Effect

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

OUTBOX = "/admin/jetstream_bridge/outboxevent/"
INBOX = "/admin/jetstream_bridge/inboxevent/"
STATUS = "/admin/jetstream_bridge/outboxevent/status/"
DURABLE = "alpha-events"


@pytest.fixture
def bridge(jetstream_bridge: Any) -> Any:
    return jetstream_bridge


def result_rows(page: Page) -> Any:
    return page.locator("#result_list tbody tr")


def test_browser__operator_filters_searches_and_retries_a_failed_outbox_row(
    page: Page, bridge: Any
) -> None:
    ensure_topology()
    superuser("admin")
    sent = [outbox_row(bridge, status="sent", number=n) for n in (1, 2)]
    failed = outbox_row(bridge, status="failed", number=3)
    log_in(page, "admin")

    page.goto(OUTBOX)
    expect(result_rows(page)).to_have_count(3)
    page.locator("#changelist-filter").get_by_role("link", name="Failed").click()
    expect(result_rows(page)).to_have_count(1)
    expect(result_rows(page)).to_contain_text(failed.event_id)
    expect(result_rows(page).locator(".jsb-badge--failed")).to_have_text("Failed")

    page.goto(OUTBOX)
    page.fill("#searchbar", sent[1].event_id)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(rf"\?q={sent[1].event_id}$"))
    expect(result_rows(page)).to_have_count(1)
    expect(result_rows(page)).to_contain_text(sent[1].event_id)

    page.goto(f"{OUTBOX}?status__exact=failed")
    page.check(f'input[name="_selected_action"][value="{failed.pk}"]')
    page.select_option('select[name="action"]', "retry_publishing")
    page.click('button[name="index"]')
    expect(page.locator("ul.messagelist")).to_contain_text("1 event(s) published.")

    failed.refresh_from_db()
    assert (failed.status, failed.last_error) == ("sent", None)
    assert stream_msg_ids(bridge.stream_name) == [failed.event_id]


def test_browser__operator_reruns_a_failed_handler_from_the_detail_page(
    page: Page, bridge: Any
) -> None:
    superuser("admin")
    row = inbox_row(bridge, status="failed")
    log_in(page, "admin")
    with invoice_handlers():
        page.goto(f"{INBOX}{row.pk}/change/")
        expect(page.locator(".field-last_error")).to_contain_text("customer 42 does not exist")
        expect(page.locator("pre.jsb-json").first).to_contain_text('"resource_type": "invoice"')
        page.get_by_role("button", name="Re-run handler").click()
        expect(page.locator("ul.messagelist")).to_contain_text("1 event(s) processed.")
    expect(page.locator(".field-status")).to_contain_text("Processed")
    row.refresh_from_db()
    assert (row.status, row.last_error) == ("processed", None)
    assert list(Effect.objects.values_list("event_id", flat=True)) == [row.event_id]


def test_browser__status_page_shows_the_stream_and_consumer_lag(page: Page, bridge: Any) -> None:
    ensure_topology(durable=DURABLE)
    publish_incoming(bridge, 3)
    superuser("admin")
    outbox_row(bridge, status="failed")
    log_in(page, "admin")

    page.goto(OUTBOX)
    page.get_by_role("link", name="JetStream status").click()
    expect(page).to_have_url(re.compile(f"{STATUS}$"))
    expect(page.locator("#jsb-stream")).to_contain_text(bridge.stream_name)
    expect(page.locator("#jsb-stream")).to_contain_text(bridge.subjects.subscribe)
    consumer = page.locator(f'tr[data-consumer="{DURABLE}"]')
    expect(consumer.locator("td.jsb-lag")).to_have_text("3")
    expect(page.locator("#jsb-outbox")).to_contain_text("failed")
    expect(page.locator("#jsb-nats-down")).to_have_count(0)


def test_browser__viewer_without_the_permissions_sees_no_actions(page: Page, bridge: Any) -> None:
    outbox = outbox_row(bridge, status="failed")
    inbox = inbox_row(bridge, status="failed")
    staff_user("viewer")
    log_in(page, "viewer")

    page.goto(OUTBOX)
    expect(result_rows(page)).to_contain_text(outbox.event_id)
    expect(page.locator('select[name="action"]')).to_have_count(0)
    page.goto(f"{OUTBOX}{outbox.pk}/change/")
    expect(page.locator("form.jsb-row-action")).to_have_count(0)

    page.goto(INBOX)
    expect(result_rows(page)).to_contain_text(inbox.event_id)
    expect(page.locator('select[name="action"]')).to_have_count(0)
    page.goto(f"{INBOX}{inbox.pk}/change/")
    expect(page.get_by_role("button", name="Re-run handler")).to_have_count(0)

    page.goto(STATUS)  # viewing is enough for the status page
    expect(page.locator("h1")).to_have_text("JetStream bridge status")
    assert OutboxEvent.objects.get().status == "failed"
    assert InboxEvent.objects.get().status == "failed"


def test_browser__screenshots_of_the_status_page_and_outbox_list(
    page: Page, jetstream_bridge: Any, settings: Any, tmp_path: Path
) -> None:
    """Render a lived-in bridge and capture both pages (kept when JSB_SCREENSHOT_DIR is set)."""
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "ENV": "production",
        "APP_NAME": "orders",
        "DESTINATION_APP": "billing",
    }
    from jetstream_bridge.conf import get_config

    config = get_config()
    for name in (config.stream_name, config.dlq_stream_name):  # left by an external server
        nats(lambda c, name=name: _drop_stream(c, name))
    ensure_topology(durable="orders-from-billing")
    try:
        _lived_in(config)
        superuser("admin")
        log_in(page, "admin")
        out = Path(os.environ.get("JSB_SCREENSHOT_DIR") or tmp_path)
        out.mkdir(parents=True, exist_ok=True)

        page.goto(STATUS)
        expect(page.locator('tr[data-consumer="orders-from-billing"] td.jsb-lag')).to_have_text("4")
        text = page.locator("body").inner_text()
        assert "NATS is unreachable" not in text
        page.screenshot(path=str(out / "admin-status.png"), full_page=True)

        page.set_viewport_size({"width": 1600, "height": 900})
        page.goto(OUTBOX)
        page.click("#toggle-nav-sidebar")  # more room for the columns
        expect(result_rows(page)).to_have_count(9)
        page.screenshot(path=str(out / "admin-outbox.png"), full_page=True)
        for name in ("admin-status.png", "admin-outbox.png"):
            assert (out / name).stat().st_size > 10_000
    finally:
        for name in (config.stream_name, config.dlq_stream_name):
            nats(lambda c, name=name: _drop_stream(c, name))


async def _drop_stream(conn: Connection, name: str) -> None:
    if await conn.jsm.stream_info(name) is not None:
        await conn.jsm.delete_stream(name)


def _lived_in(config: Any) -> None:
    """Rows and messages that look like a few minutes of a real bridge's life."""
    kinds = [
        ("order", "created"),
        ("order", "updated"),
        ("customer", "created"),
        ("order", "paid"),
        ("order", "shipped"),
        ("customer", "updated"),
    ]
    for number, (resource, event) in enumerate(kinds, start=1001):
        outbox_row(
            config,
            status="sent",
            resource_type=resource,
            event_type=event,
            number=number,
            age=timedelta(minutes=30 - number % 1000),
        )
    outbox_row(config, status="pending", number=1007, age=timedelta(seconds=4))
    outbox_row(
        config,
        status="failed",
        resource_type="order",
        event_type="cancelled",
        number=1008,
        attempts=4,
        last_error="PublishFailed: publish to production.data.sync.orders.billing timed out",
        age=timedelta(minutes=12),
    )
    outbox_row(config, status="failed", number=1009, attempts=2, age=timedelta(minutes=3))
    for seq in range(1, 4):
        inbox_row(config, consumer="orders-from-billing", status="processed", seq=seq)
    inbox_row(config, consumer="orders-from-billing", status="failed", seq=4)
    publish_incoming(config, 4)
    nats(lambda c: c.publish(config.subjects.dlq, b"{}", {"Jsb-Reason": "max_deliver"}))
