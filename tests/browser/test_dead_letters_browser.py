"""The *Dead letters* admin in a real browser: triage from the index to a replayed event.

Set ``JSB_SCREENSHOT_DIR`` to keep the screenshots (``docs/screenshots/make_screenshots.py``
does).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from jetstream_bridge import dlq
from jetstream_bridge.broker import Connection
from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.topology import ensure_topology
from tests.admin_data import dead_letter, superuser
from tests.browser.conftest import CHROMIUM, NO_CHROMIUM, log_in
from tests.helpers import nats, publish_incoming, stream_messages

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DEAD_LETTERS = "/admin/jetstream_bridge/deadletter/"
STATUS = "/admin/jetstream_bridge/outboxevent/status/"


def letter_rows(page: Page) -> Any:
    return page.locator("tr.jsb-letter")


def test_browser__operator_finds_a_dead_letter_reads_it_and_replays_it(
    page: Page, jetstream_bridge: Any
) -> None:
    bridge = jetstream_bridge
    ensure_topology(durable="alpha-events")  # the durable a replay is for
    rejected, event_id = dead_letter(bridge, reason="rejected", consumer="alpha-events")
    other, _ = dead_letter(bridge, reason="max_deliver", consumer="alpha-events")
    superuser("admin")
    log_in(page, "admin")

    page.get_by_role("link", name="Dead letters").click()
    expect(page).to_have_url(re.compile(f"{DEAD_LETTERS}$"))
    expect(letter_rows(page)).to_have_count(2)
    page.fill('input[name="reason"]', "rejected")
    page.get_by_role("button", name="Filter").click()
    expect(letter_rows(page)).to_have_count(1)
    expect(letter_rows(page)).to_contain_text(event_id)

    page.get_by_role("link", name=str(rejected), exact=True).click()
    expect(page).to_have_url(re.compile(f"{DEAD_LETTERS}{rejected}/"))
    expect(page.locator("#jsb-dlq-headers")).to_contain_text(letters.ERROR_MESSAGE)
    expect(page.locator("#jsb-dlq-headers")).to_contain_text("customer 42 does not exist")
    expect(page.locator("#jsb-dlq-body pre")).to_contain_text('    "currency": "EUR"')

    page.get_by_role("button", name="Replay").click()
    expect(page).to_have_url(re.compile(rf"{DEAD_LETTERS}\?reason=rejected$"))
    expect(page.locator("ul.messagelist")).to_contain_text("Replayed 1 dead letter(s)")
    expect(page.locator("#jsb-dlq-empty")).to_have_text("No dead letters match here.")

    assert [m.seq for m in dlq.list_dead_letters()[1]] == [other]
    copy = stream_messages(bridge.stream_name)[-1]
    assert (copy.subject, copy.headers[letters.REPLAY_OF]) == (
        bridge.subjects.subscribe,
        str(rejected),
    )
    assert copy.headers[letters.REPLAY_FOR] == "alpha-events"


def test_browser__operator_purges_selected_letters_after_confirming(
    page: Page, jetstream_bridge: Any
) -> None:
    ensure_topology()
    seqs = [dead_letter(jetstream_bridge)[0] for _ in range(3)]
    superuser("admin")
    log_in(page, "admin")

    page.goto(STATUS)
    page.locator("#jsb-dead-letters-link").click()
    expect(letter_rows(page)).to_have_count(3)
    for seq in seqs[:2]:
        page.check(f'input[name="seq"][value="{seq}"]')
    page.get_by_role("button", name="Purge selected…").click()
    expect(page.locator("#jsb-purge-question")).to_contain_text("Delete 2 dead letters for good?")
    assert len(dlq.list_dead_letters()[1]) == 3  # asked, not done
    page.get_by_role("button", name="Yes, purge").click()
    expect(page.locator("ul.messagelist")).to_contain_text("Purged 2 dead letter(s).")
    expect(letter_rows(page)).to_have_count(1)
    assert [m.seq for m in dlq.list_dead_letters()[1]] == seqs[2:]


def test_browser__screenshots_of_the_dead_letters_pages(
    page: Page, jetstream_bridge: Any, settings: Any, tmp_path: Path
) -> None:
    """Render a DLQ with a few kinds of letters (kept when JSB_SCREENSHOT_DIR is set)."""
    key = "0123456789abcdef0123456789abcdef-screenshot-key"
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "ENV": "production",
        "APP_NAME": "orders",
        "DESTINATION_APP": "billing",
        "DLQ_SIGNING_KEY": key,
    }
    from jetstream_bridge.conf import get_config

    config = get_config()
    nats(lambda c: _drop_stream(c, config.stream_name))  # left over by an external server
    ensure_topology(durable="orders-from-billing")
    try:
        first = _lived_in_dlq(config, key.encode())
        superuser("admin")
        log_in(page, "admin")
        out = Path(os.environ.get("JSB_SCREENSHOT_DIR") or tmp_path)
        out.mkdir(parents=True, exist_ok=True)

        page.set_viewport_size({"width": 1600, "height": 900})
        page.goto(DEAD_LETTERS)
        page.click("#toggle-nav-sidebar")  # more room for the columns
        expect(letter_rows(page)).to_have_count(6)
        expect(page.locator("body")).not_to_contain_text("NATS is unreachable")
        page.screenshot(path=str(out / "admin-dead-letters.png"), full_page=True)

        page.goto(f"{DEAD_LETTERS}{first}/")
        expect(page.locator("#jsb-dlq-verification")).to_contain_text("signed")
        page.screenshot(path=str(out / "admin-dead-letter.png"), full_page=True)
        for name in ("admin-dead-letters.png", "admin-dead-letter.png"):
            assert (out / name).stat().st_size > 10_000
    finally:
        nats(lambda c: _drop_stream(c, config.stream_name))


async def _drop_stream(conn: Connection, name: str) -> None:
    if await conn.jsm.stream_info(name) is not None:
        await conn.jsm.delete_stream(name)


def _lived_in_dlq(config: Any, key: bytes) -> int:
    """Letters as a bad afternoon leaves them; return the first one's sequence."""
    durable = "orders-from-billing"
    first, _ = dead_letter(
        config,
        consumer=durable,
        error=("RejectMessage", "invoice 8812 refers to unknown customer 4411"),
        payload={"id": 8812, "customer": 4411, "total": "249.00", "currency": "EUR"},
        key=key,
    )
    dead_letter(
        config,
        reason=letters.MAX_DELIVER,
        consumer=durable,
        error=("OperationalError", "could not obtain lock on row in relation invoices"),
        key=key,
    )
    dead_letter(
        config,
        reason=letters.NO_HANDLER,
        consumer=durable,
        error=("NoHandler", "no handler for invoice/voided"),
        key=key,
    )
    dead_letter(
        config,
        reason=letters.MALFORMED,
        consumer=durable,
        error=("MalformedEnvelope", "body is not JSON"),
        body=b"\x00\x01 not an envelope",
        key=key,
    )
    dead_letter(
        config,
        reason=letters.REJECTED,
        consumer="shipping-from-billing",
        subject=f"{config.env}.data.sync.billing.shipping",
        error=("RejectMessage", "parcel weight missing"),
        key=key,
    )
    dead_letter(config, reason=letters.REJECTED, consumer="unknown")  # unsigned: forged?
    publish_incoming(config, 2)  # live events between the letters are not listed
    return first
