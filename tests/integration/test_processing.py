"""The batch processor on the real test database, without a NATS server.

Batches are built from ``ReceivedMessage`` values directly; the tests assert the outcomes
(verdicts, delays, dead letters) and what the database holds afterwards.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from django.db import DatabaseError, OperationalError, connection

from jetstream_bridge.conf import get_config
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import MSG_ID_HEADER as MSG_ID
from jetstream_bridge.core.envelope import build_envelope, encode
from jetstream_bridge.core.errors import RejectMessage
from jetstream_bridge.handlers import HandlerRegistry
from jetstream_bridge.models import InboxEvent
from jetstream_bridge.processing import BatchProcessor, Outcome, ReceivedMessage, Verdict
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

DURABLE = "alpha-events"
STREAM = "processing-test"
_seqs = itertools.count(1)


@pytest.fixture
def bridge(settings: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "NATS_URLS": ["nats://127.0.0.1:9"],  # a closed port: nothing here may reach a broker
        "ENV": "unit",
        "MAX_DELIVER": 3,
        "BACKOFF": ["1s", "2s"],
    }
    return get_config()


def event(**payload: Any) -> dict[str, Any]:
    return build_envelope(
        producer="beta", resource_type="order", event_type="created", payload=payload
    )


def received(
    body: dict[str, Any] | bytes, *, deliveries: int = 1, seq: int | None = None
) -> ReceivedMessage:
    return ReceivedMessage(
        subject="test.data.sync.alpha.beta",
        data=body if isinstance(body, bytes) else encode(body),
        stream=STREAM,
        stream_seq=next(_seqs) if seq is None else seq,
        deliveries=deliveries,
        consumer=DURABLE,
    )


def processor(handler: Any = None, **kwargs: Any) -> BatchProcessor:
    return BatchProcessor(durable=DURABLE, handler=handler, config=get_config(), **kwargs)


def verdicts(outcomes: list[Outcome]) -> list[tuple[str, float]]:
    return [(outcome.verdict.value, outcome.delay) for outcome in outcomes]


def effects() -> list[str]:
    return sorted(Effect.objects.exclude(consumer="attempt").values_list("event_id", flat=True))


def rows() -> dict[str, InboxEvent]:
    return {row.event_id: row for row in InboxEvent.objects.filter(consumer=DURABLE)}


class Counting:
    """Count runs per event id (with the delivery numbers); after writing its effect, fail on
    ``payload["poison"]`` (so a test sees that write rolled back) or run ``extra``."""

    def __init__(self, extra: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.runs: dict[str, list[int]] = {}
        self.extra = extra

    def __call__(self, event: dict[str, Any], subject: str, deliveries: int) -> None:
        self.runs.setdefault(event["event_id"], []).append(deliveries)
        handlers.record_effect(event, subject, deliveries)
        if event["payload"].get("poison"):
            raise ValueError("cannot handle this one")
        if self.extra is not None:
            self.extra(event)


# -- the plain paths ------------------------------------------------------------------------


@pytest.mark.parametrize("handler", [handlers.record_effect, handlers.async_effect])
def test_processing__a_batch_is_handled_and_recorded_once(bridge: Any, handler: Any) -> None:
    events = [event(n=n) for n in range(3)]
    messages = [received(e) for e in events]
    outcomes = processor(handler).process(messages)
    assert [(o.message, o.verdict, o.duplicate) for o in outcomes] == [
        (m, Verdict.ACK, False) for m in messages
    ]
    assert effects() == sorted(e["event_id"] for e in events)
    recorded = rows()
    for e, message in zip(events, messages, strict=True):
        row = recorded[e["event_id"]]
        assert (row.status, row.deliveries, row.stream, row.stream_seq) == (
            "processed",
            1,
            STREAM,
            message.stream_seq,
        )
        assert row.payload == e
        assert row.last_error is None


def test_processing__the_same_event_twice_in_a_batch_is_a_duplicate(bridge: Any) -> None:
    e = event()
    outcomes = processor(handlers.record_effect).process([received(e), received(e)])
    assert [(o.verdict, o.duplicate) for o in outcomes] == [
        (Verdict.ACK, False),
        (Verdict.ACK, True),
    ]
    assert effects() == [e["event_id"]]
    assert InboxEvent.objects.count() == 1


def test_processing__an_event_seen_in_an_earlier_batch_is_a_duplicate(bridge: Any) -> None:
    e = event()
    first = received(e)
    processing = processor(handlers.record_effect)
    [outcome] = processing.process([first])
    assert (outcome.verdict, outcome.duplicate) == (Verdict.ACK, False)
    # A second stream copy of the event (found by event id), then a redelivery of the first
    # (found by its stream sequence, whatever its body says).
    again = processing.process(
        [received(e), received(b"any body", seq=first.stream_seq, deliveries=2)]
    )
    assert [(o.verdict, o.duplicate) for o in again] == [(Verdict.ACK, True), (Verdict.ACK, True)]
    assert effects() == [e["event_id"]]
    assert InboxEvent.objects.count() == 1


def test_processing__without_the_inbox_still_handles_and_records_nothing(
    bridge: Any, settings: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_INBOX": False}
    e = event()
    outcomes = processor(handlers.record_effect).process([received(e)])
    assert verdicts(outcomes) == [("ack", 0.0)]
    assert effects() == [e["event_id"]]
    assert not InboxEvent.objects.exists()


# -- failures that retries cannot fix -------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"\x00\xffnot json", json.dumps({"event_type": "created", "payload": {}}).encode()],
    ids=["bytes", "no-event-id"],
)
def test_processing__a_malformed_body_is_dead_lettered_and_the_rest_applied(
    bridge: Any, body: bytes
) -> None:
    good = event()
    processing = processor(handlers.record_effect)
    bad, fine = received(body), received(good)
    outcomes = processing.process([bad, fine])
    assert [o.verdict for o in outcomes] == [Verdict.DEAD, Verdict.ACK]
    dead = outcomes[0].dead
    assert dead is not None
    assert (dead.reason, dead.error_class, dead.event_id) == (
        dead_letter.MALFORMED,
        "MalformedEnvelope",
        None,
    )
    assert (dead.stream, dead.stream_seq, dead.deliveries, dead.consumer) == (
        STREAM,
        bad.stream_seq,
        1,
        DURABLE,
    )
    assert effects() == [good["event_id"]]
    failed = InboxEvent.objects.get(stream_seq=bad.stream_seq)
    assert failed.status == "failed"
    assert (failed.last_error or "").startswith("MalformedEnvelope: ")
    assert processing.redone == 0  # it needed no handler


def test_processing__an_event_without_a_handler_is_dead_lettered(bridge: Any) -> None:
    e = event()
    [outcome] = processor(registry=HandlerRegistry()).process([received(e)])
    assert outcome.verdict is Verdict.DEAD
    assert outcome.dead is not None
    assert (outcome.dead.reason, outcome.dead.error_class, outcome.dead.event_id) == (
        dead_letter.NO_HANDLER,
        "LookupError",
        e["event_id"],
    )
    assert "order/created" in outcome.dead.error_message
    assert rows()[e["event_id"]].status == "failed"


def test_processing__the_registry_picks_the_handler_by_type(bridge: Any) -> None:
    registry = HandlerRegistry()
    registry.register("order", "created", handlers.record_effect)
    e = event()
    assert verdicts(processor(registry=registry).process([received(e)])) == [("ack", 0.0)]
    assert effects() == [e["event_id"]]


def test_processing__reject_message_dead_letters_on_the_first_delivery(bridge: Any) -> None:
    good, rejected = event(), event(reject=True)
    processing = processor(handlers.rejects)
    outcomes = processing.process([received(good), received(rejected)])
    assert [o.verdict for o in outcomes] == [Verdict.ACK, Verdict.DEAD]
    assert outcomes[1].dead is not None
    assert (outcomes[1].dead.reason, outcomes[1].dead.error_message) == (
        dead_letter.REJECTED,
        "customer does not exist",
    )
    assert effects() == [good["event_id"]]
    row = rows()[rejected["event_id"]]
    assert (row.status, row.last_error) == ("failed", "RejectMessage: customer does not exist")
    assert processing.redone == 1  # the rejection rolled the batch back once


# -- a handler failing mid-batch --------------------------------------------------------------


def _mid_batch() -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    return [event(n=1), event(n=2)], event(poison=True), [event(n=3), event(n=4)]


def test_processing__a_failing_handler_redoes_the_batch_with_savepoints(bridge: Any) -> None:
    assert bridge.handler_savepoints == "on_failure"
    before, poison, after = _mid_batch()
    handler = Counting()
    processing = processor(handler)
    outcomes = processing.process([received(e) for e in [*before, poison, *after]])
    # The failure is retried after BACKOFF[0]; everything else is acked.
    assert verdicts(outcomes) == [("ack", 0.0)] * 2 + [("retry", 1.0)] + [("ack", 0.0)] * 2
    assert processing.redone == 1
    # The first pass ran the handlers before the failing one, then rolled back; the redo ran
    # them again and the rest once, and did not run the failing one again.
    assert {e["event_id"]: handler.runs[e["event_id"]] for e in before} == {
        e["event_id"]: [1, 1] for e in before
    }
    assert {e["event_id"]: handler.runs[e["event_id"]] for e in after} == {
        e["event_id"]: [1] for e in after
    }
    assert handler.runs[poison["event_id"]] == [1]
    # Each good event's write is applied once; the failing run's write rolled back.
    assert effects() == sorted(e["event_id"] for e in before + after)
    recorded = rows()
    assert {recorded[e["event_id"]].status for e in before + after} == {"processed"}
    failed = recorded[poison["event_id"]]
    assert (failed.status, failed.deliveries) == ("failed", 1)
    assert failed.last_error == "ValueError: cannot handle this one"


def test_processing__retries_follow_the_backoff_then_the_last_delivery_dead_letters(
    bridge: Any,
) -> None:
    poison = event(poison=True)
    handler = Counting()
    processing = processor(handler)
    seq = next(_seqs)
    outcomes = [processing.process([received(poison, seq=seq, deliveries=n)])[0] for n in (1, 2, 3)]
    assert verdicts(outcomes[:2]) == [("retry", 1.0), ("retry", 2.0)]
    last = outcomes[2]
    assert last.verdict is Verdict.DEAD
    assert last.dead == dead_letter.DeadLetter(
        reason=dead_letter.MAX_DELIVER,
        error_class="ValueError",
        error_message="cannot handle this one",
        original_subject="test.data.sync.alpha.beta",
        stream=STREAM,
        stream_seq=seq,
        deliveries=3,
        consumer=DURABLE,
        event_id=poison["event_id"],
    )
    assert handler.runs[poison["event_id"]] == [1, 2, 3]
    row = rows()[poison["event_id"]]
    assert (row.status, row.deliveries) == ("failed", 3)
    assert effects() == []


def test_processing__always_savepoints_runs_each_handler_once(bridge: Any, settings: Any) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "HANDLER_SAVEPOINTS": "always"}
    before, poison, after = _mid_batch()
    handler = Counting()
    processing = processor(handler)
    outcomes = processing.process([received(e) for e in [*before, poison, *after]])
    assert verdicts(outcomes) == [("ack", 0.0)] * 2 + [("retry", 1.0)] + [("ack", 0.0)] * 2
    assert processing.redone == 0
    assert set(map(tuple, handler.runs.values())) == {(1,)}
    assert effects() == sorted(e["event_id"] for e in before + after)
    assert rows()[poison["event_id"]].status == "failed"


@pytest.mark.parametrize("how", ["orm", "sql"])
def test_processing__a_handler_swallowing_a_database_error_fails_only_itself(
    bridge: Any, how: str
) -> None:
    taken = Effect.objects.create(event_id="taken", consumer="attempt")
    first, swallows, last = event(n=1), event(swallow=True), event(n=2)

    def swallow(e: dict[str, Any]) -> None:
        if not e["payload"].get("swallow"):
            return
        try:
            if how == "orm":
                Effect(pk=taken.pk, event_id="again").save(force_insert=True)
            else:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT * FROM jsb_no_such_table")
        except DatabaseError:
            pass  # and no further query in this (possibly aborted) state

    handler = Counting(swallow)
    processing = processor(handler)
    outcomes = processing.process([received(e) for e in (first, swallows, last)])
    assert processing.redone == 1
    assert handler.runs[first["event_id"]] == [1, 1]  # run again in the redo
    assert handler.runs[last["event_id"]] == [1]
    recorded = rows()
    assert recorded[first["event_id"]].status == "processed"
    assert recorded[last["event_id"]].status == "processed"
    if how == "orm":
        # Django marked the transaction for rollback: the handler failed and is not run again.
        assert verdicts(outcomes) == [("ack", 0.0), ("retry", 1.0), ("ack", 0.0)]
        assert handler.runs[swallows["event_id"]] == [1]
        assert "marked for rollback" in (recorded[swallows["event_id"]].last_error or "")
        assert effects() == sorted([first["event_id"], last["event_id"]])
    elif connection.vendor == "postgresql":
        # It returned, so it runs again in its own savepoint, which cannot be released in
        # the aborted state: a failure.
        assert verdicts(outcomes) == [("ack", 0.0), ("retry", 1.0), ("ack", 0.0)]
        assert handler.runs[swallows["event_id"]] == [1, 1]
        assert recorded[swallows["event_id"]].status == "failed"
        assert effects() == sorted([first["event_id"], last["event_id"]])
    else:
        # Only the statement failed and the transaction went on; the redo was a precaution.
        assert verdicts(outcomes) == [("ack", 0.0)] * 3
        assert handler.runs[swallows["event_id"]] == [1, 1]
        assert effects() == sorted(e["event_id"] for e in (first, swallows, last))


# -- the inbox and the database -------------------------------------------------------------


def test_processing__an_inbox_conflict_redoes_the_batch_message_by_message(bridge: Any) -> None:
    mine, theirs = event(n=1), event(n=2)

    def another_worker_records_theirs(e: dict[str, Any]) -> None:
        # A row for the other event appears after the batch looked it up, as when another
        # worker commits it meanwhile: the batch's one inbox INSERT then conflicts.
        if e["event_id"] == mine["event_id"]:
            InboxEvent.objects.create(
                consumer=DURABLE, event_id=theirs["event_id"], subject="s", status="processed"
            )

    handler = Counting(another_worker_records_theirs)
    processing = processor(handler)
    late = received(theirs)
    outcomes = processing.process([received(mine), late])
    # Redone with an INSERT per message: only the event handled elsewhere fails, to come
    # back as a duplicate; the rest commits. Not a handler failure, so no savepoint redo.
    assert verdicts(outcomes) == [("ack", 0.0), ("retry", 1.0)]
    assert processing.redone == 0
    assert handler.runs == {mine["event_id"]: [1, 1], theirs["event_id"]: [1, 1]}
    assert effects() == [mine["event_id"]]
    recorded = rows()
    assert recorded[mine["event_id"]].status == "processed"
    assert recorded[theirs["event_id"]].subject == "s"  # the other worker's row is kept
    [again] = processing.process([received(theirs, seq=late.stream_seq, deliveries=2)])
    assert (again.verdict, again.duplicate) == (Verdict.ACK, True)


def test_processing__after_a_database_error_retries_then_keeps_the_last_delivery(
    bridge: Any,
) -> None:
    e = event()
    error = OperationalError("the database went away")
    early, last, malformed = received(e), received(e, deliveries=3), received(b"x", deliveries=3)
    outcomes = processor(handlers.record_effect).after_database_error(
        [early, last, malformed], error
    )
    assert verdicts(outcomes[:1]) == [("retry", 1.0)]
    assert [o.verdict for o in outcomes[1:]] == [Verdict.DEAD, Verdict.DEAD]
    assert outcomes[1].dead is not None
    assert outcomes[2].dead is not None
    assert (outcomes[1].dead.reason, outcomes[1].dead.error_class) == (
        dead_letter.MAX_DELIVER,
        "OperationalError",
    )
    assert (outcomes[1].dead.event_id, outcomes[2].dead.event_id) == (e["event_id"], None)
    assert not InboxEvent.objects.exists()


def test_processing__process_stored_reruns_a_failed_row_once(bridge: Any) -> None:
    e = event(poison=True)
    failing = processor(handlers.always_fails)
    [outcome] = failing.process([received(e)])
    assert outcome.verdict is Verdict.RETRY
    row = rows()[e["event_id"]]

    def fixed(event: dict[str, Any], subject: str, deliveries: int) -> None:
        handlers.record_effect(event, subject, deliveries)

    rerun = processor(fixed).process_stored(row.pk)
    assert (rerun.verdict, rerun.duplicate) == (Verdict.ACK, False)
    row.refresh_from_db()
    assert (row.status, row.last_error, row.deliveries) == ("processed", None, 1)
    assert effects() == [e["event_id"]]
    again = processor(fixed).process_stored(row.pk)
    assert (again.verdict, again.duplicate) == (Verdict.ACK, True)
    assert effects() == [e["event_id"]]


def test_processing__process_message_is_a_batch_of_one(bridge: Any) -> None:
    e = event()

    def rejects(event: dict[str, Any], subject: str, deliveries: int) -> None:
        raise RejectMessage("no")

    outcome = processor(rejects).process_message(received(e))
    assert outcome.verdict is Verdict.DEAD
    assert outcome.dead is not None
    assert outcome.dead.reason == dead_letter.REJECTED
    assert rows()[e["event_id"]].status == "failed"


# -- replays meant for one durable ----------------------------------------------------------


def replayed(
    body: dict[str, Any], target: str, *, key: bytes | None = None, **overrides: str
) -> ReceivedMessage:
    data = encode(body)
    headers = {**dead_letter.replay_headers(7, data, target=target, key=key), **overrides}
    return replace_headers(received(data), headers)


def replace_headers(message: ReceivedMessage, headers: dict[str, str]) -> ReceivedMessage:
    return dataclasses.replace(message, headers=headers)


def test_replay_for__another_durable_is_acked_without_handler_or_inbox_row(bridge: Any) -> None:
    handler = Counting()
    mine, other = event(n=1), event(n=2)
    outcomes = processor(handler).process([replayed(mine, DURABLE), replayed(other, "alpha-audit")])
    assert [(o.verdict, o.skipped) for o in outcomes] == [
        (Verdict.ACK, False),
        (Verdict.ACK, True),
    ]
    assert handler.runs == {mine["event_id"]: [1]}
    assert set(rows()) == {mine["event_id"]}


def test_replay_for__a_skipped_replay_does_not_mark_its_event_handled_in_the_batch(
    bridge: Any,
) -> None:
    # The replay for another durable and the event itself (say, a redelivery) in one batch:
    # skipping the first must not make the second look like a duplicate.
    handler = Counting()
    body = event(n=1)
    outcomes = processor(handler).process([replayed(body, "alpha-audit"), received(body)])
    assert [(o.skipped, o.duplicate) for o in outcomes] == [(True, False), (False, False)]
    assert handler.runs == {body["event_id"]: [1]}
    assert rows()[body["event_id"]].status == "processed"


@pytest.mark.parametrize(
    "forgery",
    [
        # The event published under its own id with the header added: never a replay.
        lambda body: {MSG_ID: body["event_id"]},
        lambda body: {MSG_ID: "replay:7:not-random"},
        lambda body: {MSG_ID: "replay:7:" + "A" * 32},
    ],
)
def test_replay_for__is_ignored_on_a_message_whose_id_is_not_a_replays(
    bridge: Any, forgery: Any
) -> None:
    handler = Counting()
    body = event(n=1)
    [outcome] = processor(handler).process([replayed(body, "alpha-audit", **forgery(body))])
    assert (outcome.verdict, outcome.skipped) == (Verdict.ACK, False)
    assert handler.runs == {body["event_id"]: [1]}


def test_replay_for__with_a_signing_key_needs_a_valid_signature(bridge: Any, settings: Any) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "DLQ_SIGNING_KEY": "k" * 40}
    key = b"k" * 40
    handler = Counting()
    signed, unsigned, wrong_key, other_body = (event(n=n) for n in range(4))
    tampered = replayed(other_body, "alpha-audit", key=key)
    tampered = replace_headers(
        tampered, {**tampered.headers, dead_letter.REPLAY_FOR: "alpha-other"}
    )
    outcomes = processor(handler).process(
        [
            replayed(signed, "alpha-audit", key=key),
            replayed(unsigned, "alpha-audit"),
            replayed(wrong_key, "alpha-audit", key=b"x" * 40),
            tampered,  # the target changed after signing
        ]
    )
    assert [o.skipped for o in outcomes] == [True, False, False, False]
    assert sorted(handler.runs) == sorted(e["event_id"] for e in (unsigned, wrong_key, other_body))
