"""DLQ triage (list, show, replay, purge) against a real nats-server and database."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from jetstream_bridge import dlq
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core.envelope import MSG_ID_HEADER
from jetstream_bridge.models import InboxEvent
from tests.helpers import (
    fast_retry_bridge,
    manage,
    nats,
    publish_incoming,
    publish_raw,
    stream_messages,
)
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)
DURABLE = "alpha-events"


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    return fast_retry_bridge(settings, DURABLE)


def consume(handler: Any, **kwargs: Any) -> Any:
    consumer = Consumer(durable_name=DURABLE, handler=handler, stop_when_idle=True, **kwargs)
    return asyncio.run(consumer.run_async())


def dead_letter_one_rejected_and_one_malformed(config: Any) -> tuple[str, int, int]:
    """Return the rejected event's id and the DLQ sequences of (rejected, malformed)."""
    [event_id] = publish_incoming(config, 1, payload={"reject": True})
    publish_raw(config, b"\x00\xffnot json")
    assert consume(handlers.rejects).dead_lettered == 2
    _, found = dlq.list_dead_letters()
    by_reason = {m.reason: m.seq for m in found}
    return event_id, by_reason[letters.REJECTED], by_reason[letters.MALFORMED]


def effects_for(event_id: str) -> int:
    return Effect.objects.filter(event_id=event_id).exclude(consumer="attempt").count()


def manage_with_input(*args: str, env: dict[str, str], stdin: str) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=env,
        input=stdin,
        text=True,
        capture_output=True,
        timeout=60,
    )


def test_dlq__list_shows_reason_and_age(bridge: Any, subprocess_env: dict[str, str]) -> None:
    event_id, rejected, malformed = dead_letter_one_rejected_and_one_malformed(bridge)
    depth, found = dlq.list_dead_letters()
    assert (depth.messages, depth.stream, depth.subject) == (
        2,
        bridge.dlq_stream_name,
        bridge.subjects.dlq,
    )
    assert [m.seq for m in found] == sorted([rejected, malformed])
    for message in found:
        age = message.age()
        assert age is not None
        assert 0 <= age < 60
        assert message.consumer == DURABLE
        assert message.original_subject == bridge.subjects.subscribe

    table = manage("jetstream_dlq", "list", env=subprocess_env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["SEQ", "AGE", "REASON", "CONSUMER"]
    assert any(line.split()[:1] == [str(rejected)] and "rejected" in line for line in lines)
    assert any(line.split()[:1] == [str(malformed)] and "malformed" in line for line in lines)
    assert "RejectMessage: customer does not exist" in table.stdout
    assert "2 shown; 2 dead letter(s)" in table.stdout

    only = manage("jetstream_dlq", "list", "--json", "--reason", "rejected", env=subprocess_env)
    assert only.returncode == 0, only.stderr
    data = json.loads(only.stdout)
    assert data["depth"] == 2
    [row] = data["messages"]
    assert (row["seq"], row["reason"], row["event_id"]) == (rejected, "rejected", event_id)
    assert row["age_seconds"] >= 0


def test_dlq__show_prints_every_header_and_the_pretty_json_body(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    event_id, rejected, malformed = dead_letter_one_rejected_and_one_malformed(bridge)
    shown = manage("jetstream_dlq", "show", str(rejected), env=subprocess_env)
    assert shown.returncode == 0, shown.stderr
    for header in (letters.REASON, letters.ERROR_CLASS, letters.ORIGINAL_SUBJECT, MSG_ID_HEADER):
        assert header in shown.stdout
    assert f'"event_id": "{event_id}"' in shown.stdout
    assert '    "reject": true' in shown.stdout  # indented: pretty-printed

    as_json = manage("jetstream_dlq", "show", str(rejected), "--json", env=subprocess_env)
    data = json.loads(as_json.stdout)
    assert data["body"]["payload"] == {"id": 0, "reject": True}
    assert data["headers"][letters.REASON] == "rejected"

    binary = manage("jetstream_dlq", "show", str(malformed), env=subprocess_env)
    assert binary.returncode == 0, binary.stderr
    assert "not json" in binary.stdout

    missing = manage("jetstream_dlq", "show", "99999", env=subprocess_env)
    assert missing.returncode == 1
    assert "no dead letter at sequence 99999" in missing.stderr


def test_dlq__replay_after_fixing_the_handler_processes_the_event_exactly_once(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    [event_id] = publish_incoming(bridge, 1, payload={"reject": True})
    assert consume(handlers.rejects).dead_lettered == 1
    assert effects_for(event_id) == 0
    [letter] = dlq.list_dead_letters()[1]

    replayed = manage("jetstream_dlq", "replay", env=subprocess_env)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 dead letter(s), 1 removed from the DLQ" in replayed.stdout
    assert dlq.depth().messages == 0
    copy = stream_messages(bridge.stream_name)[-1]
    assert copy.subject == bridge.subjects.subscribe
    assert copy.headers[MSG_ID_HEADER].startswith(f"replay:{letter.seq}:")
    assert copy.headers[letters.REPLAY_OF] == str(letter.seq)

    stats = consume(handlers.record_effect)  # the fixed handler
    assert (stats.processed, stats.dead_lettered) == (1, 0)
    assert effects_for(event_id) == 1
    assert consume(handlers.record_effect).handled == 0
    assert effects_for(event_id) == 1
    assert InboxEvent.objects.get(event_id=event_id).status == "processed"
    assert dlq.depth().messages == 0


def test_dlq__replaying_twice_with_keep_still_applies_the_effect_once(bridge: Any) -> None:
    [event_id] = publish_incoming(bridge, 1, payload={"reject": True})
    consume(handlers.rejects)
    first = dlq.replay(keep=True)
    second = dlq.replay(keep=True)
    assert len(first.replayed) == len(second.replayed) == 1
    assert first.replayed[0][1] != second.replayed[0][1]  # a new id each run: not deduped
    assert (first.deleted, second.deleted) == (0, 0)
    stats = consume(handlers.record_effect, batch_size=1)
    assert (stats.processed, stats.duplicates) == (1, 1)  # the inbox catches the second copy
    assert effects_for(event_id) == 1
    assert dlq.depth().messages == 1  # kept


def test_dlq__two_replays_in_one_batch_apply_the_effect_once(bridge: Any) -> None:
    [event_id] = publish_incoming(bridge, 1, payload={"reject": True})
    consume(handlers.rejects)
    dlq.replay(keep=True)
    dlq.replay(keep=True)
    consume(handlers.record_effect, batch_size=10)
    assert effects_for(event_id) == 1


def test_dlq__replay_filters_select_by_reason_age_and_sequence(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    event_id, rejected, malformed = dead_letter_one_rejected_and_one_malformed(bridge)

    none = manage("jetstream_dlq", "replay", "--older-than", "1h", env=subprocess_env)
    assert none.returncode == 0, none.stderr
    assert "replayed 0 dead letter(s)" in none.stdout
    assert dlq.depth().messages == 2

    by_reason = manage("jetstream_dlq", "replay", "--reason", "rejected", env=subprocess_env)
    assert by_reason.returncode == 0, by_reason.stderr
    assert f"replayed {rejected} -> stream sequence" in by_reason.stdout
    assert [m.seq for m in dlq.list_dead_letters()[1]] == [malformed]

    by_seq = dlq.replay(dlq.Selection(seqs=frozenset({malformed}), since=3600), keep=True)
    assert [seq for seq, _ in by_seq.replayed] == [malformed]

    consume(handlers.record_effect)
    assert effects_for(event_id) == 1
    # The malformed body failed again: it is back in the DLQ under a new sequence.
    [again] = dlq.list_dead_letters(dlq.Selection(reason=letters.MALFORMED))[1][1:]
    assert again.seq > malformed


def test_dlq__replay_refuses_subjects_outside_the_bridge(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    hostile = {
        letters.REASON: "rejected",
        letters.ORIGINAL_SUBJECT: f"$JS.API.STREAM.DELETE.{bridge.stream_name}",
    }
    elsewhere = {letters.REASON: "rejected", letters.ORIGINAL_SUBJECT: "billing.internal"}
    nats(lambda c: c.publish(bridge.subjects.dlq, b"{}", hostile))
    nats(lambda c: c.publish(bridge.subjects.dlq, b"{}", elsewhere))

    result = manage("jetstream_dlq", "replay", env=subprocess_env)
    assert result.returncode == 1
    assert "refusing to publish to system subject" in result.stderr
    assert "outside this bridge's" in result.stderr
    assert nats(lambda c: c.jsm.stream_info(bridge.stream_name)) is not None
    assert dlq.depth().messages == 2  # nothing replayed, nothing removed


def test_dlq__purge_asks_first_and_honours_filters(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    _, rejected, _malformed = dead_letter_one_rejected_and_one_malformed(bridge)

    declined = manage_with_input("jetstream_dlq", "purge", env=subprocess_env, stdin="n\n")
    assert declined.returncode == 1
    assert "Delete 2 dead letter(s) for good? [y/N]" in declined.stdout
    assert dlq.depth().messages == 2

    no_terminal = manage("jetstream_dlq", "purge", env=subprocess_env)  # stdin is empty
    assert no_terminal.returncode == 1
    assert dlq.depth().messages == 2

    filtered = manage(
        "jetstream_dlq", "purge", "--reason", "malformed", "--yes", env=subprocess_env
    )
    assert filtered.returncode == 0, filtered.stderr
    assert "purged 1 dead letter(s)" in filtered.stdout
    assert [m.seq for m in dlq.list_dead_letters()[1]] == [rejected]

    confirmed = manage_with_input("jetstream_dlq", "purge", env=subprocess_env, stdin="y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "purged 1 dead letter(s)" in confirmed.stdout
    assert dlq.depth().messages == 0
    # Only DLQ messages went: the original events are still in the stream.
    subjects = {m.subject for m in stream_messages(bridge.stream_name)}
    assert subjects == {bridge.subjects.subscribe}

    nothing = manage("jetstream_dlq", "purge", "--yes", env=subprocess_env)
    assert "nothing purged" in nothing.stdout


def test_dlq__purge_everything_keeps_letters_that_arrive_after_the_count(bridge: Any) -> None:
    for _ in range(3):
        nats(lambda c: c.publish(bridge.subjects.dlq, b"{}", {letters.REASON: "rejected"}))
    matching, last_seq = dlq.count()
    nats(lambda c: c.publish(bridge.subjects.dlq, b"{}", {letters.REASON: "late"}))
    assert dlq.purge(upto_seq=last_seq) == matching == 3
    [left] = dlq.list_dead_letters()[1]
    assert left.reason == "late"
