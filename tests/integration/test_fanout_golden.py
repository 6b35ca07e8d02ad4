"""A single-destination service's messages, byte for byte as before several peers existed.

``golden/single_destination.json`` was captured from the publisher as it was before
``destination=`` (commit 7d4decb): the exact subject (``{env}`` stands for the test's ENV),
the exact header set and the exact body bytes, for each way an event leaves the process
(on SQLite and PostgreSQL). The
Ruby gem services read these messages, so none of it may change. Regenerate only on purpose:
``JSB_WRITE_GOLDEN=1 make test PYTEST_ARGS=tests/integration/test_fanout_golden.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction

from jetstream_bridge import Publisher
from jetstream_bridge.conf import get_config
from jetstream_bridge.fast_path import fast_path
from jetstream_bridge.relay import Relay
from jetstream_bridge.topology import ensure_topology
from tests.helpers import stream_messages

pytestmark = pytest.mark.django_db(transaction=True)

GOLDEN = Path(__file__).parent / "golden" / "single_destination.json"

EVENT = {
    "resource_type": "order",
    "event_type": "created",
    "payload": {"id": "o-1", "total": 12.5, "note": "crème brûlée ☕", "lines": [1, 2]},
    "event_id": "9b2f6a52-3c1e-4d0a-8f7e-1a2b3c4d5e6f",
    "trace_id": "trace-golden-1",
    "occurred_at": "2026-11-30T12:00:00.000Z",
    "headers": {"X-Tenant": "acme", "traceparent": "00-abc-def-01"},
}

WAYS = ["outbox_fast_path", "outbox_relay", "direct", "direct_on_commit", "async_outbox"]


def _publish(way: str, settings: Any, event: dict[str, Any]) -> None:
    if way == "outbox_fast_path":
        with transaction.atomic():
            Publisher().publish(**event)
        assert fast_path().wait_idle()
    elif way == "outbox_relay":
        settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "OUTBOX_FAST_PATH": False}
        Publisher().publish(**event)
        assert Relay().run(once=True).sent == 1
    elif way == "direct":
        settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_OUTBOX": False}
        Publisher().publish(**event)
    elif way == "direct_on_commit":
        settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_OUTBOX": False}
        with transaction.atomic():
            Publisher().publish(**event)
    else:
        asyncio.run(Publisher().publish_async(**event))
        assert fast_path().wait_idle()


def _wire(config: Any) -> list[dict[str, Any]]:
    """Every message in the stream as it is stored: subject, headers, body bytes."""
    return [
        {
            "subject": m.subject.replace(config.env, "{env}", 1),
            "headers": dict(m.headers or {}),
            "body": m.data.decode("utf-8"),
        }
        for m in stream_messages(config.stream_name)
    ]


@pytest.mark.parametrize("named", [False, True], ids=["destination_left_out", "destination_named"])
@pytest.mark.parametrize("way", WAYS)
def test_single_destination__message_is_byte_identical_to_the_golden_capture(
    jetstream_bridge: Any, settings: Any, way: str, named: bool
) -> None:
    ensure_topology()
    # Naming the one peer (destination="beta") publishes exactly what leaving it out does.
    _publish(way, settings, {**EVENT, "destination": "beta"} if named else EVENT)
    config = get_config()
    deadline = 50
    while not (wire := _wire(config)) and deadline:  # a deferred send lands shortly after commit
        deadline -= 1
        asyncio.run(asyncio.sleep(0.1))
    # Per database: the relay publishes the payload column as the database returns it, and
    # PostgreSQL's jsonb gives its own key order and spacing (it always has).
    key = f"{way}@{connection.vendor}"
    if os.environ.get("JSB_WRITE_GOLDEN") and not named:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[key] = wire
        GOLDEN.write_text(json.dumps(golden, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(wire) == 1
    [message] = wire
    [expected] = golden[key]
    assert message["subject"] == expected["subject"] == "{env}.data.sync.alpha.beta"
    assert message["headers"] == expected["headers"]
    assert message["body"].encode("utf-8") == expected["body"].encode("utf-8")
