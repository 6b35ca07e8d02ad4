"""Messages another client could publish that no database stores, against a real server.

A message whose fields cannot be stored is malformed: dead-lettered on its first delivery
with the reason ``malformed`` and the error, while the rest of its batch is applied once.
Nothing a message holds ends the consumer process (issue 13, defects 1, 2 and 6).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
from django.db import connection

from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import build_envelope, encode
from jetstream_bridge.handlers import HandlerRegistry
from jetstream_bridge.models import InboxEvent
from tests.helpers import (
    fast_retry_bridge,
    nats,
    publish_incoming,
    publish_raw,
    spawn,
    stream_messages,
)
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)
DURABLE = "hostile"


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    return fast_retry_bridge(settings, DURABLE)


def consume(handler: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("stop_when_idle", True)
    kwargs.setdefault("idle_timeout", 1.0)
    consumer = Consumer(durable_name=DURABLE, handler=handler, **kwargs)
    return asyncio.run(consumer.run_async())


def letters_by_seq(config: Any) -> dict[int, dict[str, str]]:
    return {
        int(m.headers[dead_letter.STREAM_SEQ]): m.headers
        for m in stream_messages(config.dlq_stream_name)
        if m.subject == config.subjects.dlq
    }


def effects() -> list[str]:
    return sorted(Effect.objects.values_list("event_id", flat=True))


def body(**fields: Any) -> bytes:
    """A JSON envelope with ``fields`` replaced, encoded as another language's client might
    (``json.dumps`` writes a lone surrogate as the escape ``\\ud800``, as JavaScript does)."""
    envelope: dict[str, Any] = {
        "event_id": f"hostile-{time.monotonic_ns()}",
        "event_type": "created",
        "resource_type": "order",
        "producer": "beta",
        "payload": {"id": 1},
    }
    envelope.update(fields)
    return json.dumps(envelope).encode()


# Each of these must be dead-lettered as malformed on its first delivery.
UNSTORABLE: dict[str, bytes] = {
    "surrogate-event-id": body(event_id="bad-\ud800"),
    "surrogate-resource-type": body(resource_type="order\udfff"),
    "surrogate-event-type": body(event_type="\ud800"),
    "surrogate-payload-value": body(payload={"note": "x\ud83d"}),
    "surrogate-payload-key": body(payload={"\udc00": 1}),
    "surrogate-raw-utf8": body().replace(b'"id": 1', b'"id": "\xed\xa0\x80"'),
    "nul-event-type": body(event_type="created\u0000"),
    "nul-resource-type": body(resource_type="\u0000order"),
    "nul-payload": body(payload={"text": "PostgreSQL refuses \u0000 in JSON"}),
    "nul-producer": body(producer="be\u0000ta"),
    "nan": body().replace(b'"id": 1', b'"id": NaN'),
    "infinity": body().replace(b'"id": 1', b'"id": -Infinity'),
    "long-resource-type": body(resource_type="r" * 101),
    "long-event-type": body(event_type="e" * 101),
    "long-event-id": body(event_id="i" * 256),
    # Event ids NATS or the header line would alter (defect 6, the receiving side).
    "id-trailing-space": body(event_id="evt-1 "),
    "id-leading-space": body(event_id=" evt-2"),
    "id-tab": body(event_id="evt-3\t"),
    "id-cr": body(event_id="evt\r4"),
    "id-lf": body(event_id="evt\n5"),
    "id-control": body(event_id="evt\x016"),
    "id-c1-control": body(event_id="evt\x857"),
}


def test_hostile__each_unstorable_field_is_malformed_and_its_batch_mates_applied(
    bridge: Any,
) -> None:
    good = publish_incoming(bridge, 3)
    seqs = {publish_raw(bridge, data): name for name, data in UNSTORABLE.items()}
    good += publish_incoming(bridge, 3, start=100)
    stats = consume(handlers.record_effect, batch_size=50)
    letters = letters_by_seq(bridge)
    wrong = {
        name: letters.get(seq, {}).get(dead_letter.REASON)
        for seq, name in seqs.items()
        if letters.get(seq, {}).get(dead_letter.REASON) != dead_letter.MALFORMED
    }
    assert wrong == {}, "not dead-lettered as malformed"
    for seq in seqs:
        assert letters[seq][dead_letter.DELIVERIES] == "1"
        assert letters[seq][dead_letter.ERROR_CLASS] == "MalformedEnvelope"
        assert letters[seq][dead_letter.ERROR_MESSAGE]
    assert effects() == sorted(good)
    assert (stats.processed, stats.dead_lettered, stats.retried) == (6, len(UNSTORABLE), 0)
    assert InboxEvent.objects.filter(consumer=DURABLE, status="processed").count() == 6
    assert InboxEvent.objects.filter(consumer=DURABLE, status="failed").count() == len(UNSTORABLE)


def test_hostile__over_long_resource_type_fails_only_itself_in_a_batch_of_25(bridge: Any) -> None:
    good = publish_incoming(bridge, 12)
    culprit = publish_raw(bridge, body(event_id="too-long", resource_type="order" * 30))
    good += publish_incoming(bridge, 12, start=100)
    stats = consume(handlers.record_effect, batch_size=25)
    assert effects() == sorted(good)
    letters = letters_by_seq(bridge)
    assert list(letters) == [culprit]
    assert letters[culprit][dead_letter.REASON] == dead_letter.MALFORMED
    assert "resource_type" in letters[culprit][dead_letter.ERROR_MESSAGE]
    assert (stats.processed, stats.dead_lettered, stats.retried) == (24, 1, 0)


def test_hostile__row_the_database_refuses_fails_only_its_message(bridge: Any) -> None:
    # Only the database can refuse this one: the envelope is fine, but PostgreSQL's JSON
    # cannot hold the NUL of a header value, so the batch's inbox INSERT fails with a
    # DataError. It used to count as an outage: every message of the batch retried until
    # MAX_DELIVER dead-lettered them all. SQLite and MariaDB store it.
    good = publish_incoming(bridge, 4)
    envelope = build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 7}
    )
    culprit = publish_raw(bridge, encode(envelope), {"X-Note": "a\x00b"})
    good += publish_incoming(bridge, 4, start=100)
    stats = consume(handlers.record_effect, batch_size=25)
    letters = letters_by_seq(bridge)
    if connection.vendor == "postgresql":
        assert effects() == sorted(good)
        assert list(letters) == [culprit]
        assert letters[culprit][dead_letter.REASON] == dead_letter.MALFORMED
        assert letters[culprit][dead_letter.ERROR_CLASS] == "DataError"
        assert letters[culprit][dead_letter.DELIVERIES] == "1"
        assert (stats.processed, stats.dead_lettered, stats.retried) == (8, 1, 0)
        row = InboxEvent.objects.get(consumer=DURABLE, status="failed")
        assert (row.stream_seq, row.event_id) == (culprit, None)
        assert (row.last_error or "").startswith("DataError")
    else:
        assert effects() == sorted([*good, envelope["event_id"]])
        assert (letters, stats.processed) == ({}, 9)


class ExplodingRegistry(HandlerRegistry):
    """Fails outside any handler for resource type ``bomb``: an error nothing expects."""

    def resolve(self, resource_type: str, event_type: str, producer: str | None = None) -> Any:
        if resource_type == "bomb":
            raise RuntimeError("resolve exploded")
        return handlers.record_effect


def test_hostile__unexpected_error_fails_only_its_message_and_the_consumer_goes_on(
    bridge: Any,
) -> None:
    good = publish_incoming(bridge, 3)
    bomb = build_envelope(producer="beta", resource_type="bomb", event_type="x", payload={})
    culprit = publish_raw(bridge, encode(bomb))
    good += publish_incoming(bridge, 3, start=100)
    stats = consume(None, registry=ExplodingRegistry(), batch_size=25, idle_timeout=1.5)
    assert effects() == sorted(good)  # once each, though their batch failed
    letters = letters_by_seq(bridge)
    assert list(letters) == [culprit]
    assert letters[culprit][dead_letter.REASON] == dead_letter.MAX_DELIVER
    assert letters[culprit][dead_letter.ERROR_CLASS] == "RuntimeError"
    assert letters[culprit][dead_letter.DELIVERIES] == "3"
    assert (stats.processed, stats.retried, stats.dead_lettered) == (6, 2, 1)


def consumer_settled(config: Any) -> bool:
    info = nats(lambda c: c.jsm.consumer_info(config.stream_name, DURABLE))
    return bool(info) and info.num_pending == 0 and info.num_ack_pending == 0


@pytest.mark.slow
def test_hostile__lone_surrogates_do_not_end_the_jetstream_consume_process(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    good = publish_incoming(bridge, 3)
    bad = {
        publish_raw(bridge, UNSTORABLE[name]): name
        for name in (
            "surrogate-event-id",
            "surrogate-resource-type",
            "surrogate-event-type",
            "surrogate-payload-value",
        )
    }
    good += publish_incoming(bridge, 3, start=100)
    worker = spawn(
        "jetstream_consume",
        "--durable",
        DURABLE,
        "--batch-size",
        "50",
        "--handler",
        "tests.testapp.handlers.record_effect",
        env=subprocess_env,
    )
    try:
        deadline = time.monotonic() + 60
        while not (consumer_settled(bridge) and len(letters_by_seq(bridge)) >= len(bad)):
            if worker.poll() is not None:
                _, err = worker.communicate()
                pytest.fail(f"jetstream_consume exited {worker.returncode}:\n{err[-3000:]}")
            assert time.monotonic() < deadline, "the consumer did not settle the batch"
            time.sleep(0.2)
        time.sleep(1.0)  # a crash after settling would show now
        assert worker.poll() is None, "jetstream_consume exited"
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err[-3000:]
    letters = letters_by_seq(bridge)
    assert {seq: letters[seq][dead_letter.REASON] for seq in bad} == dict.fromkeys(
        bad, dead_letter.MALFORMED
    )
    assert effects() == sorted(good)
