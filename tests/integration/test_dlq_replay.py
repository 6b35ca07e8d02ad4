"""Replay for the durable that dead-lettered a message, against a real nats-server: the other
durables on the subject ack it without running their handlers, unless told to broadcast."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from jetstream_bridge import dlq
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core.errors import RejectMessage
from jetstream_bridge.models import InboxEvent
from jetstream_bridge.topology import ensure_topology
from tests.helpers import fast_retry_bridge, manage, nats, publish_incoming, stream_messages
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)
MAIN, AUDIT = "alpha-events", "alpha-audit"


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    config = fast_retry_bridge(settings, MAIN)
    ensure_topology(durable=AUDIT)  # a second durable on the same subject
    return config


def handler_for(durable: str, *, reject: bool) -> Callable[..., None]:
    def handle(event: dict[str, Any], subject: str, deliveries: int) -> None:
        if reject:
            raise RejectMessage(f"{durable} cannot take it yet")
        Effect.objects.create(event_id=event["event_id"], consumer=durable)

    return handle


def consume(durable: str, *, reject: bool = False) -> Any:
    consumer = Consumer(
        durable_name=durable,
        handler=handler_for(durable, reject=reject),
        stop_when_idle=True,
        idle_timeout=1.0,
    )
    return asyncio.run(consumer.run_async())


def ran(durable: str) -> int:
    return Effect.objects.filter(consumer=durable).count()


def inbox_status(durable: str, event_id: str) -> str:
    return InboxEvent.objects.get(consumer=durable, event_id=event_id).status


def rejected_by_both(config: Any) -> tuple[str, dict[str, int]]:
    """Publish one event both durables reject; return its id and each durable's letter."""
    [event_id] = publish_incoming(config, 1)
    assert consume(MAIN, reject=True).dead_lettered == 1
    assert consume(AUDIT, reject=True).dead_lettered == 1
    _, found = dlq.list_dead_letters()
    return event_id, {m.consumer: m.seq for m in found}


def test_replay__reaches_only_the_durable_that_dead_lettered_it(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    event_id, letter_of = rejected_by_both(bridge)
    assert set(letter_of) == {MAIN, AUDIT}

    replayed = manage("jetstream_dlq", "replay", "--consumer", MAIN, env=subprocess_env)
    assert replayed.returncode == 0, replayed.stderr
    [copy] = [m for m in stream_messages(bridge.stream_name) if letters.REPLAY_OF in m.headers]
    assert copy.headers[letters.REPLAY_FOR] == MAIN
    assert json.loads(copy.data)["event_id"] == event_id

    main = consume(MAIN)
    assert (main.processed, main.skipped) == (1, 0)
    assert ran(MAIN) == 1
    assert inbox_status(MAIN, event_id) == "processed"

    audit = consume(AUDIT, reject=True)  # would reject it again if it ran its handler
    assert (audit.skipped, audit.processed, audit.dead_lettered) == (1, 0, 0)
    assert ran(AUDIT) == 0
    assert inbox_status(AUDIT, event_id) == "failed"  # untouched: no row written for the skip
    _, left = dlq.list_dead_letters()
    assert [m.seq for m in left] == [letter_of[AUDIT]]  # no second letter from the audit


def test_replay__broadcast_reaches_every_durable_on_the_subject(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    event_id, letter_of = rejected_by_both(bridge)
    assert set(letter_of) == {MAIN, AUDIT}
    replayed = manage(
        "jetstream_dlq", "replay", "--consumer", AUDIT, "--broadcast", env=subprocess_env
    )
    assert replayed.returncode == 0, replayed.stderr
    [copy] = [m for m in stream_messages(bridge.stream_name) if letters.REPLAY_OF in m.headers]
    assert letters.REPLAY_FOR not in copy.headers

    assert consume(AUDIT).processed == 1
    assert consume(MAIN).processed == 1  # its own letter is still in the DLQ; it ran anyway
    assert (ran(MAIN), ran(AUDIT)) == (1, 1)
    assert inbox_status(MAIN, event_id) == inbox_status(AUDIT, event_id) == "processed"


def test_replay__a_letter_naming_no_durable_of_the_subject_is_kept(bridge: Any) -> None:
    _, letter_of = rejected_by_both(bridge)
    nats(lambda c: c.jsm.delete_consumer(bridge.stream_name, AUDIT))
    result = dlq.replay(dlq.Selection(consumer=AUDIT))
    assert result.replayed == []
    assert result.failed == [(letter_of[AUDIT], f"no durable {AUDIT!r}; use --broadcast")]
    assert dlq.depth().messages == 2
