"""Consuming against a real nats-server and a real database."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction

from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import build_envelope, encode
from jetstream_bridge.handlers import HandlerRegistry
from jetstream_bridge.models import InboxEvent
from jetstream_bridge.topology import ensure_topology
from tests.helpers import fast_retry_bridge, nats, publish_incoming, publish_raw, stream_messages
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)
DURABLE = "alpha-events"


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    config = fast_retry_bridge(settings, DURABLE)
    handlers.deliveries_seen.clear()
    return config


def consume(handler: Any, *, durable: str = DURABLE, **kwargs: Any) -> Any:
    kwargs.setdefault("stop_when_idle", True)
    kwargs.setdefault("idle_timeout", 1.0)
    consumer = Consumer(durable_name=durable, handler=handler, **kwargs)
    return asyncio.run(consumer.run_async())


def dead_letters(config: Any) -> list[Any]:
    return [m for m in stream_messages(config.dlq_stream_name) if m.subject == config.subjects.dlq]


def effects() -> list[str]:
    return list(Effect.objects.exclude(consumer="attempt").values_list("event_id", flat=True))


@pytest.mark.slow
def test_consume__thousand_events_are_handled_once_each(bridge: Any) -> None:
    ids = publish_incoming(bridge, 1000)
    stats = consume(handlers.record_effect, batch_size=100)
    assert stats.processed == 1000
    assert sorted(effects()) == sorted(ids)
    assert InboxEvent.objects.filter(status="processed", consumer=DURABLE).count() == 1000
    assert consume(handlers.record_effect).handled == 0  # nothing left unacked


def test_consume__same_event_in_two_stream_messages_is_handled_once(bridge: Any) -> None:
    envelope = build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 1}
    )
    # Different Nats-Msg-Id, so the server stores both: only the inbox can dedupe them.
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "first"})
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "second"})
    stats = consume(handlers.record_effect, batch_size=1)
    assert (stats.processed, stats.duplicates) == (1, 1)
    assert effects() == [envelope["event_id"]]


def test_consume__duplicate_within_one_batch_is_handled_once(bridge: Any) -> None:
    envelope = build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 1}
    )
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "a"})
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "b"})
    consume(handlers.record_effect, batch_size=10)
    assert effects() == [envelope["event_id"]]


def test_consume__retries_follow_the_backoff_and_apply_the_effect_once(
    bridge: Any, settings: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "MAX_DELIVER": 4,
        "ACK_WAIT": "1s",
        "BACKOFF": ["1s", "2s", "2s"],
    }
    ensure_topology(durable=DURABLE)
    [event_id] = publish_incoming(bridge, 1, payload={"fail_times": 2})
    stats = consume(handlers.flaky, idle_timeout=3.5)
    times = handlers.deliveries_seen[event_id]
    assert len(times) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[0] == pytest.approx(1.0, abs=0.4)
    assert gaps[1] == pytest.approx(2.0, abs=0.4)
    assert effects() == [event_id]
    assert Effect.objects.filter(consumer="attempt").count() == 1  # failed tries rolled back
    assert (stats.processed, stats.retried) == (1, 2)
    row = InboxEvent.objects.get(event_id=event_id)
    assert (row.status, row.deliveries, row.last_error) == ("processed", 3, None)


def test_consume__poison_message_goes_to_the_dlq_after_max_deliver(bridge: Any) -> None:
    good = publish_incoming(bridge, 5)
    [poison] = publish_incoming(bridge, 1, payload={"poison": True}, start=100)
    more = publish_incoming(bridge, 5, start=200)
    stats = consume(handlers.always_fails, batch_size=4)
    assert sorted(effects()) == sorted(good + more)
    assert stats.dead_lettered == 1
    [letter] = dead_letters(bridge)
    headers = letter.headers
    assert headers[dead_letter.REASON] == dead_letter.MAX_DELIVER
    assert headers[dead_letter.ERROR_CLASS] == "ValueError"
    assert headers[dead_letter.ERROR_MESSAGE] == "cannot handle this one"
    assert headers[dead_letter.ORIGINAL_SUBJECT] == bridge.subjects.subscribe
    assert headers[dead_letter.DELIVERIES] == "3"
    assert headers[dead_letter.CONSUMER] == DURABLE
    assert headers[dead_letter.EVENT_ID] == poison
    assert headers[dead_letter.STREAM] == bridge.stream_name
    assert int(headers[dead_letter.STREAM_SEQ]) > 0
    assert headers[dead_letter.FAILED_AT].endswith("Z")
    assert headers["Nats-Msg-Id"] != poison
    assert json.loads(letter.data)["event_id"] == poison
    row = InboxEvent.objects.get(event_id=poison)
    assert (row.status, row.deliveries) == ("failed", 3)
    assert row.last_error == "ValueError: cannot handle this one"
    info = nats(lambda c: c.jsm.consumer_info(bridge.stream_name, DURABLE))
    assert info.num_ack_pending == 0  # terminated, not waiting for redelivery
    assert info.num_pending == 0


@pytest.mark.parametrize(
    ("body", "reason", "handler"),
    [
        (b"\x00\xffnot json", dead_letter.MALFORMED, handlers.record_effect),
        (
            json.dumps({"event_type": "created", "resource_type": "order", "payload": {}}).encode(),
            dead_letter.MALFORMED,
            handlers.record_effect,
        ),
        (None, dead_letter.REJECTED, handlers.rejects),
        (
            json.dumps(
                {
                    "event_id": "deep-1",
                    "event_type": "created",
                    "resource_type": "order",
                    "payload": json.loads('{"x":' * 100 + "1" + "}" * 100),
                }
            ).encode(),
            dead_letter.MALFORMED,
            handlers.record_effect,
        ),
    ],
    ids=["bytes", "no-event-id", "reject", "nested-100-deep"],
)
def test_consume__unrecoverable_messages_go_to_the_dlq_on_first_delivery(
    bridge: Any, body: bytes | None, reason: str, handler: Any
) -> None:
    if body is None:
        body = encode(
            build_envelope(
                producer="beta",
                resource_type="order",
                event_type="created",
                payload={"reject": True},
            )
        )
    publish_raw(bridge, body)
    stats = consume(handler)
    [letter] = dead_letters(bridge)
    assert letter.headers[dead_letter.REASON] == reason
    assert letter.headers[dead_letter.DELIVERIES] == "1"
    assert letter.data == body
    assert stats.dead_lettered == 1
    assert effects() == []
    assert InboxEvent.objects.get().status == "failed"


def test_consume__event_without_a_handler_is_dead_lettered_not_dropped(bridge: Any) -> None:
    publish_incoming(bridge, 1)
    consume(None, registry=HandlerRegistry())
    [letter] = dead_letters(bridge)
    assert letter.headers[dead_letter.REASON] == dead_letter.NO_HANDLER
    assert "order/created" in letter.headers[dead_letter.ERROR_MESSAGE]


def test_consume__a_message_naming_code_never_imports_it(bridge: Any) -> None:
    # Handlers come from the registry or --handler only; a type naming a module is just text.
    envelope = build_envelope(
        producer="beta", resource_type="os", event_type="system", payload={"cmd": "true"}
    )
    publish_raw(bridge, encode(envelope))
    consume(None, registry=HandlerRegistry())
    [letter] = dead_letters(bridge)
    assert letter.headers[dead_letter.REASON] == dead_letter.NO_HANDLER
    assert "os/system" in letter.headers[dead_letter.ERROR_MESSAGE]


def test_consume__registry_dispatches_by_resource_and_event_type(bridge: Any) -> None:
    registry = HandlerRegistry()
    seen: list[str] = []
    registry.register("order", "created", lambda e, s, d: seen.append("exact"))
    registry.register("order", "*", lambda e, s, d: seen.append("any-event"))
    publish_incoming(bridge, 1)
    consume(None, registry=registry)
    assert seen == ["exact"]


def test_consume__async_handler_writes_in_the_batch_transaction(bridge: Any) -> None:
    ids = publish_incoming(bridge, 3)
    consume(handlers.async_effect)
    assert sorted(effects()) == sorted(ids)


def test_consume__two_durables_each_process_every_event_once(bridge: Any) -> None:
    ensure_topology(durable="audit")
    ids = publish_incoming(bridge, 20)
    consume(handlers.record_effect)
    consume(handlers.record_effect, durable="audit")
    assert sorted(effects()) == sorted(ids + ids)
    for durable in (DURABLE, "audit"):
        assert InboxEvent.objects.filter(consumer=durable, status="processed").count() == 20


def test_consume__without_inbox_still_acks_after_commit(bridge: Any, settings: Any) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_INBOX": False}
    ids = publish_incoming(bridge, 10)
    consume(handlers.record_effect)
    assert sorted(effects()) == sorted(ids)
    assert InboxEvent.objects.count() == 0


class CountingHandler:
    """Counts runs per event (with their delivery numbers); fails on ``payload["poison"]``
    after writing its effect, so a test sees that write rolled back."""

    def __init__(self) -> None:
        self.runs: dict[str, list[int]] = {}

    def __call__(self, event: dict[str, Any], subject: str, deliveries: int) -> None:
        self.runs.setdefault(event["event_id"], []).append(deliveries)
        handlers.record_effect(event, subject, deliveries)
        if event["payload"].get("poison"):
            raise ValueError("cannot handle this one")


def _mid_batch_failure(bridge: Any) -> tuple[list[str], str, list[str]]:
    """Two good events, one that always fails, two more good ones: one batch of five."""
    before = publish_incoming(bridge, 2)
    [poison] = publish_incoming(bridge, 1, payload={"poison": True}, start=100)
    after = publish_incoming(bridge, 2, start=200)
    return before, poison, after


def _assert_failed_then_dead_lettered(bridge: Any, poison: str, good: list[str]) -> None:
    assert sorted(effects()) == sorted(good)  # once each; the failing run's write rolled back
    rows = {row.event_id: row for row in InboxEvent.objects.filter(consumer=DURABLE)}
    assert {rows[event_id].status for event_id in good} == {"processed"}
    assert {rows[event_id].deliveries for event_id in good} == {1}
    assert (rows[poison].status, rows[poison].deliveries) == ("failed", 3)
    assert rows[poison].last_error == "ValueError: cannot handle this one"
    [letter] = dead_letters(bridge)
    assert letter.headers[dead_letter.REASON] == dead_letter.MAX_DELIVER
    assert letter.headers[dead_letter.EVENT_ID] == poison


def test_consume__failing_handler_redoes_the_batch_with_savepoints_by_default(
    bridge: Any,
) -> None:
    assert bridge.handler_savepoints == "on_failure"
    before, poison, after = _mid_batch_failure(bridge)
    handler = CountingHandler()
    stats = consume(handler, batch_size=5)
    # The first pass ran the two handlers before the failing one, then rolled back; the redo
    # ran them again and the rest once, and recorded the failure without running it again.
    assert {event_id: handler.runs[event_id] for event_id in before} == {
        event_id: [1, 1] for event_id in before
    }
    assert {event_id: handler.runs[event_id] for event_id in after} == {
        event_id: [1] for event_id in after
    }
    assert handler.runs[poison] == [1, 2, 3]  # once per delivery: retried, then dead-lettered
    assert (stats.processed, stats.retried, stats.dead_lettered) == (4, 2, 1)
    assert stats.redone == 3  # the batch of five, then each lone redelivery
    _assert_failed_then_dead_lettered(bridge, poison, before + after)


def test_consume__always_savepoints_runs_every_handler_once_per_delivery(
    bridge: Any, settings: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "HANDLER_SAVEPOINTS": "always"}
    before, poison, after = _mid_batch_failure(bridge)
    handler = CountingHandler()
    stats = consume(handler, batch_size=5)
    assert {event_id: handler.runs[event_id] for event_id in before + after} == {
        event_id: [1] for event_id in before + after
    }
    assert handler.runs[poison] == [1, 2, 3]
    assert (stats.processed, stats.retried, stats.dead_lettered, stats.redone) == (4, 2, 1, 0)
    _assert_failed_then_dead_lettered(bridge, poison, before + after)


def test_consume__reject_and_malformed_in_a_batch_leave_the_others_applied_once(
    bridge: Any,
) -> None:
    good = publish_incoming(bridge, 2)
    publish_raw(bridge, b"not json at all")
    [rejected] = publish_incoming(bridge, 1, payload={"reject": True}, start=100)
    more = publish_incoming(bridge, 2, start=200)
    stats = consume(handlers.rejects, batch_size=10)
    assert sorted(effects()) == sorted(good + more)
    assert (stats.processed, stats.dead_lettered) == (4, 2)
    assert stats.redone == 1  # the rejection; the malformed message needs no handler
    reasons = sorted(letter.headers[dead_letter.REASON] for letter in dead_letters(bridge))
    assert reasons == sorted([dead_letter.MALFORMED, dead_letter.REJECTED])
    assert InboxEvent.objects.get(event_id=rejected).status == "failed"
    assert InboxEvent.objects.filter(status="processed").count() == 4


@pytest.mark.parametrize("how", ["orm", "sql"])
def test_consume__handler_catching_its_own_database_error_does_not_fail_the_others(
    bridge: Any, how: str
) -> None:
    # Without a savepoint of its own, a caught error leaves a PostgreSQL transaction aborted
    # (and the ORM marks Django's transaction for rollback): the next handler would fail for
    # it. Only that handler's message may fail; the others are applied once.
    taken = Effect.objects.create(event_id="taken", consumer="attempt")
    first = publish_incoming(bridge, 1)
    [swallows] = publish_incoming(bridge, 1, payload={"swallow": True}, start=100)
    last = publish_incoming(bridge, 1, start=200)
    runs: dict[str, list[int]] = {}

    def handler(event: dict[str, Any], subject: str, deliveries: int) -> None:
        runs.setdefault(event["event_id"], []).append(deliveries)
        if event["payload"].get("swallow"):
            handlers.record_effect(event, subject, deliveries)  # must not survive a failure
            try:
                if how == "orm":
                    Effect(pk=taken.pk, event_id="again").save(force_insert=True)
                else:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT * FROM jsb_no_such_table")
            except DatabaseError:
                return  # no further query in this (possibly aborted) state
        handlers.record_effect(event, subject, deliveries)

    stats = consume(handler, batch_size=3)
    assert runs[first[0]] == [1, 1]  # run again in the redo
    assert runs[last[0]] == [1]
    rows = {row.event_id: row for row in InboxEvent.objects.filter(consumer=DURABLE)}
    assert (rows[first[0]].status, rows[first[0]].deliveries) == ("processed", 1)
    assert (rows[last[0]].status, rows[last[0]].deliveries) == ("processed", 1)
    if how == "orm":
        # Django marked the transaction for rollback: its writes cannot commit, so the handler
        # failed (in either mode), is retried and dead-lettered. Not run again in a redo.
        assert runs[swallows] == [1, 2, 3]
        assert sorted(effects()) == sorted(first + last)
        assert (rows[swallows].status, rows[swallows].deliveries) == ("failed", 3)
        assert "marked for rollback" in (rows[swallows].last_error or "")
        assert (stats.processed, stats.dead_lettered, stats.redone) == (2, 1, 3)
    elif connection.vendor == "postgresql":
        # It returned normally, so it runs again in the redo, in its own savepoint, which
        # cannot be released in that state ("always" does the same): retried, dead-lettered.
        # On later deliveries its failed inbox row exists, and updating that row right after
        # the handler fails in the aborted transaction: a failure of its own, not run again.
        assert runs[swallows] == [1, 1, 2, 3]
        assert sorted(effects()) == sorted(first + last)
        assert (rows[swallows].status, rows[swallows].deliveries) == ("failed", 3)
        assert (stats.processed, stats.dead_lettered, stats.redone) == (2, 1, 3)
    else:
        # Only the statement failed; the transaction went on. Any failed query in a batch
        # without savepoints makes the consumer redo it with them, to be sure.
        assert runs[swallows] == [1, 1]
        assert sorted(effects()) == sorted([*first, swallows, *last])
        assert (rows[swallows].status, rows[swallows].deliveries) == ("processed", 1)
        assert (stats.processed, stats.redone) == (3, 1)


def test_consume__error_caught_inside_the_handlers_own_savepoint_is_harmless(
    bridge: Any,
) -> None:
    taken = Effect.objects.create(event_id="taken", consumer="attempt")
    ids = publish_incoming(bridge, 3)
    runs: dict[str, int] = {}

    def handler(event: dict[str, Any], subject: str, deliveries: int) -> None:
        runs[event["event_id"]] = runs.get(event["event_id"], 0) + 1
        try:
            with transaction.atomic():
                Effect(pk=taken.pk, event_id="again", consumer="attempt").save(force_insert=True)
        except IntegrityError:
            pass
        handlers.record_effect(event, subject, deliveries)

    stats = consume(handler, batch_size=3)
    assert sorted(effects()) == sorted(ids)
    assert stats.processed == 3
    assert InboxEvent.objects.filter(status="processed").count() == 3
    if connection.vendor == "postgresql":
        # PostgreSQL says exactly whether the transaction is still good: no redo.
        assert (stats.redone, set(runs.values())) == (0, {1})
    else:
        # Elsewhere any failed query counts (a MySQL deadlock ends the transaction).
        assert stats.redone == 1
        assert runs == {ids[0]: 2, ids[1]: 1, ids[2]: 1}


def test_consume__inbox_keeps_the_envelope_as_received(bridge: Any) -> None:
    envelope = build_envelope(
        producer="beta",
        resource_type="order",
        event_type="created",
        payload={"id": 7, "note": "café ✓", "lines": [{"sku": "a", "qty": 2}], "none": None},
    )
    publish_raw(bridge, json.dumps(envelope, indent=2).encode())
    consume(handlers.record_effect)
    row = InboxEvent.objects.get()
    assert row.payload == envelope
    assert row.headers == {}
    assert (row.event_type, row.resource_type, row.consumer) == ("created", "order", DURABLE)
    assert row.created_at is not None
    assert row.updated_at is not None
    assert row.received_at is not None
    assert row.processed_at is not None


def _start_consumer(env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "django",
            "jetstream_consume",
            "--durable",
            DURABLE,
            "--batch-size",
            "50",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_effects(minimum: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = Effect.objects.count()
        if count >= minimum:
            return count
        time.sleep(0.05)
    return Effect.objects.count()


@pytest.mark.slow
def test_consume__sigkill_mid_run_then_restart_applies_each_effect_once(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    ids = publish_incoming(bridge, 5000)
    env = subprocess_env
    worker = _start_consumer(env, "--handler", "tests.testapp.handlers.record_effect")
    seen = _wait_for_effects(1000, timeout=60)
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=30)
    assert 0 < seen < 5000, "the kill must land mid-run"
    restarted = _start_consumer(
        env,
        "--handler",
        "tests.testapp.handlers.record_effect",
        "--stop-when-idle",
        "--idle-timeout",
        "4",
    )
    _, err = restarted.communicate(timeout=180)
    assert restarted.returncode == 0, err
    applied = effects()
    assert len(applied) == 5000, f"{len(applied)} effects for 5000 events"
    assert sorted(applied) == sorted(ids)


@pytest.mark.slow
def test_consume__sigterm_finishes_the_batch_and_exits_zero(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    ids = publish_incoming(bridge, 600, payload={"sleep": 0.005})
    worker = _start_consumer(subprocess_env, "--handler", "tests.testapp.handlers.slow_effect")
    _wait_for_effects(100, timeout=60)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    stopped_at = Effect.objects.count()
    assert stopped_at < 600, "SIGTERM must stop it before the end"
    info = nats(lambda c: c.jsm.consumer_info(bridge.stream_name, DURABLE))
    assert info.num_ack_pending == 0  # everything in hand was settled
    consume(handlers.slow_effect, batch_size=100)
    assert sorted(effects()) == sorted(ids)


def test_consume__database_vendor_is_the_one_under_test() -> None:
    assert connection.vendor in ("sqlite", "postgresql", "mysql")
