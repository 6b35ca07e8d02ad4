"""Scenario 7: every event is in the stream twice (as a peer's re-publish or a DLQ replay next
to a redelivery would put it) and each copy's first delivery fails, so three consumer
processes race to apply events that already have a failed inbox row."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from jetstream_bridge.broker import Connection
from jetstream_bridge.core.envelope import MSG_ID_HEADER, build_envelope, encode
from jetstream_bridge.topology import ensure_topology

from .harness import (
    Campaign,
    consumer_settled,
    effect_ids,
    nats_call,
    record,
    require_postgres,
    scaled,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

EVENTS = scaled(1500, 5000)
CONSUMERS = 3


@pytest.mark.timeout(scaled(240, 900))
def test_chaos__two_copies_of_a_failed_event_apply_it_once(campaign: Campaign) -> None:
    require_postgres()
    campaign.scenario = "duplicate-copies"
    campaign.server()
    config = campaign.configure(MAX_DELIVER=5, BACKOFF=["200ms", "200ms"])
    ensure_topology()
    items = []
    for n in range(EVENTS):
        envelope = build_envelope(
            producer="alpha",
            resource_type="chaos",
            event_type="created",
            payload={"n": n},
            event_id=f"twice-{n:06d}",
        )
        # Different Nats-Msg-Ids, so the server keeps both: only the inbox can dedupe them.
        for copy in ("a", "b"):
            items.append((config.subjects.publish, encode(envelope), {MSG_ID_HEADER: f"{copy}{n}"}))

    async def send(conn: Connection) -> None:
        results = await conn.publish_many(items)
        assert not [r for r in results if isinstance(r, Exception)]

    nats_call(send)
    campaign.fault()
    for index in range(CONSUMERS):
        campaign.consumer(index, handler="tests.chaos.handlers.fails_first_delivery")
    wait_until(
        lambda: consumer_settled(config.stream_name),
        timeout=scaled(180, 600),
        what="the consumers to settle both copies of every event",
        interval=0.5,
        tick=campaign.fleet.check,
    )
    drain_s = time.monotonic() - campaign.last_fault
    codes = campaign.fleet.stop_all()
    applied = Counter(effect_ids())
    duplicated = sum(n - 1 for n in applied.values() if n > 1)
    lost = EVENTS - len(applied)
    record(
        {
            "scenario": campaign.scenario,
            "events": EVENTS,
            "faults": len(items),  # every copy's first delivery fails
            "lost": lost,
            "duplicated": duplicated,
            "drain_s": round(drain_s, 1),
            "elapsed_s": round(time.monotonic() - campaign.started, 1),
            "copies": len(items),
        }
    )
    assert all(code == 0 for code in codes.values()), codes
    assert (lost, duplicated) == (0, 0), [k for k, v in applied.items() if v > 1][:10]
    assert len(applied) == sum(applied.values()) == EVENTS
