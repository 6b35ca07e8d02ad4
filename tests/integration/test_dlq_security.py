"""The DLQ against someone who may publish on its subject: forged letters, silencing, bad headers.

Forged letters are published with the broker ``Connection`` straight onto the DLQ subject,
as any client with publish rights there could; the commands run as subprocesses against the
same real nats-server and database.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from jetstream_bridge import dlq
from jetstream_bridge.broker import Connection
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core.envelope import MSG_ID_HEADER, build_envelope, encode
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
SIGNING_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
# What a terminal acts on: ESC (and so CSI/OSC sequences), BEL, backspace, CR, the C1 CSI,
# and bidi overrides/isolates.
RAW_CONTROLS = ("\x1b", "\x07", "\x08", "\r", "\x9b", "\u202e", "\u2066")


def _configure(settings: Any, **extra: Any) -> Any:
    return fast_retry_bridge(settings, DURABLE, **extra)


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    return _configure(settings)


@pytest.fixture
def signed_bridge(jetstream_bridge: Any, settings: Any) -> Any:
    return _configure(settings, DLQ_SIGNING_KEY=SIGNING_KEY)


def consume(handler: Any, **kwargs: Any) -> Any:
    consumer = Consumer(durable_name=DURABLE, handler=handler, stop_when_idle=True, **kwargs)
    return asyncio.run(consumer.run_async())


def envelope_body(config: Any, **payload: Any) -> tuple[str, bytes]:
    envelope = build_envelope(
        producer=config.destination_app,
        resource_type="order",
        event_type="created",
        payload=payload or {"id": 1},
    )
    return envelope["event_id"], encode(envelope)


def forge(
    config: Any, original_subject: str, body: bytes = b"{}", overrides: dict[str, str] | None = None
) -> int:
    """Publish a letter that looks like the bridge's onto the DLQ subject; return its seq."""
    headers = {
        MSG_ID_HEADER: f"forged-{uuid.uuid4().hex}",
        letters.REASON: letters.REJECTED,
        letters.ERROR_CLASS: "RejectMessage",
        letters.ERROR_MESSAGE: "forged",
        letters.ORIGINAL_SUBJECT: original_subject,
        letters.STREAM: config.stream_name,
        letters.STREAM_SEQ: "1",
        letters.DELIVERIES: "1",
        letters.CONSUMER: DURABLE,
        letters.FAILED_AT: "2026-01-01T00:00:00.000Z",
    }
    headers.update(overrides or {})
    return nats(lambda c: c.publish(config.subjects.dlq, body, headers)).seq


def replay_copies(stream: str) -> dict[int, Any]:
    """The messages a replay published in ``stream``, by the DLQ sequence they came from."""
    return {
        int(m.headers[letters.REPLAY_OF]): m
        for m in stream_messages(stream)
        if letters.REPLAY_OF in m.headers
    }


def manage_bytes(*args: str, env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run a command and keep its output as bytes: text mode would turn CR into LF."""
    done = subprocess.run(
        [sys.executable, "-m", "django", *args], env=env, capture_output=True, timeout=120
    )
    return done.returncode, done.stdout, done.stderr


# -- 4. replay is no confused deputy -----------------------------------------------------------


def test_replay__forged_letters_for_other_subjects_go_only_where_the_operator_names(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    other = f"{bridge.env}.data.sync.ledger.reports"
    nats(
        lambda c: c.jsm.create_stream(
            {"name": f"{bridge.env}-ledger", "subjects": [other], "storage": "memory"}
        )
    )
    outbound_id, outbound_body = envelope_body(bridge, id=1)
    _, other_body = envelope_body(bridge, id=2)
    to_outbound = forge(bridge, bridge.subjects.publish, outbound_body)
    to_other = forge(bridge, other, other_body)

    refused = manage("jetstream_dlq", "replay", env=subprocess_env)
    assert refused.returncode == 1
    assert f"not replayed {to_outbound}: refusing to publish to '{bridge.subjects.publish}'" in (
        refused.stderr
    )
    assert f"not replayed {to_other}: refusing to publish to '{other}'" in refused.stderr
    assert refused.stderr.count("not this app's inbound subject") == 2
    assert "--to-subject" in refused.stderr
    assert replay_copies(bridge.stream_name) == {}
    assert nats(lambda c: c.jsm.stream_info(f"{bridge.env}-ledger")).state.messages == 0
    assert dlq.depth().messages == 2

    # The letters name this app's durable, which reads neither subject: a replay for it alone
    # would reach nobody, so it is refused until the operator asks for every durable there.
    for_nobody = manage(
        "jetstream_dlq", "replay", "--to-subject", bridge.subjects.publish, env=subprocess_env
    )
    assert f"not replayed {to_outbound}: no durable '{DURABLE}'; use --broadcast" in (
        for_nobody.stderr
    )
    assert replay_copies(bridge.stream_name) == {}
    only_one = manage(
        "jetstream_dlq",
        "replay",
        "--broadcast",
        "--to-subject",
        bridge.subjects.publish,
        env=subprocess_env,
    )
    assert only_one.returncode == 1  # the other one is still refused
    assert f"replayed {to_outbound} -> stream sequence" in only_one.stdout
    copy = replay_copies(bridge.stream_name)[to_outbound]
    assert (copy.subject, copy.data) == (bridge.subjects.publish, outbound_body)
    assert json.loads(copy.data)["event_id"] == outbound_id

    named = manage(
        "jetstream_dlq", "replay", "--broadcast", "--to-subject", other, env=subprocess_env
    )
    assert named.returncode == 0, named.stderr
    [stored] = stream_messages(f"{bridge.env}-ledger")
    assert (stored.subject, stored.data) == (other, other_body)
    assert dlq.depth().messages == 0


def test_replay__to_subject_still_refuses_system_subjects_and_the_dlq(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    forge(bridge, bridge.subjects.subscribe)
    for target, why in (
        (f"$JS.API.STREAM.DELETE.{bridge.stream_name}", "refusing to publish to system subject"),
        (bridge.subjects.dlq, "the original subject is the DLQ itself"),
        (f"{bridge.env}.data.sync.>", "must not contain wildcards"),
        ("billing.internal", "outside this bridge's"),
    ):
        result = manage("jetstream_dlq", "replay", "--to-subject", target, env=subprocess_env)
        assert result.returncode == 1
        assert why in result.stderr
        assert "replayed" not in result.stdout
    assert dlq.depth().messages == 1


def test_replay__without_a_key_letters_show_unverifiable_and_go_only_to_the_inbound_subject(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    [event_id] = publish_incoming(bridge, 1, payload={"reject": True})
    consume(handlers.rejects)
    [real] = dlq.list_dead_letters()[1]
    assert letters.SIGNATURE not in real.headers
    assert real.verification == letters.UNVERIFIABLE

    listing = manage("jetstream_dlq", "list", env=subprocess_env)
    assert listing.returncode == 0, listing.stderr
    assert "SIGNATURE" in listing.stdout.splitlines()[0]
    assert "DLQ_SIGNING_KEY is not set: these letters cannot be verified" in listing.stdout
    shown = manage("jetstream_dlq", "show", str(real.seq), env=subprocess_env)
    assert "cannot be verified: DLQ_SIGNING_KEY is not set" in shown.stdout
    as_json = json.loads(manage("jetstream_dlq", "list", "--json", env=subprocess_env).stdout)
    assert as_json["messages"][0]["verification"] == "unverifiable"

    replayed = manage("jetstream_dlq", "replay", env=subprocess_env)
    assert replayed.returncode == 0, replayed.stderr
    assert replay_copies(bridge.stream_name)[real.seq].subject == bridge.subjects.subscribe
    consume(handlers.record_effect)
    assert Effect.objects.filter(event_id=event_id).count() == 1


def test_replay__with_a_key_only_letters_the_bridge_signed_replay_by_default(
    signed_bridge: Any, subprocess_env: dict[str, str]
) -> None:
    config = signed_bridge
    [real_id] = publish_incoming(config, 1, payload={"reject": True})
    assert consume(handlers.rejects).dead_lettered == 1
    [real] = dlq.list_dead_letters()[1]
    assert real.headers[letters.SIGNATURE].startswith("v1=")
    assert real.verification == letters.VERIFIED

    forged_id, forged_body = envelope_body(config, id=7)
    unsigned = forge(config, config.subjects.subscribe, forged_body, {letters.EVENT_ID: forged_id})
    # The real letter's headers and signature on another body do not verify either.
    real_headers = {k: v for k, v in real.headers.items() if k.startswith(letters.PREFIX)}
    copied = forge(config, config.subjects.subscribe, forged_body, real_headers)
    by_seq = {m.seq: m for m in dlq.list_dead_letters()[1]}
    assert by_seq[unsigned].verification == by_seq[copied].verification == letters.UNVERIFIED

    listing = manage("jetstream_dlq", "list", env=subprocess_env)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:4]}
    assert " verified " in rows[str(real.seq)]
    assert " UNVERIFIED " in rows[str(unsigned)]
    assert " UNVERIFIED " in rows[str(copied)]
    assert "replay skips them unless given --include-unverified" in listing.stdout
    shown = manage("jetstream_dlq", "show", str(unsigned), env=subprocess_env)
    assert "signature    UNVERIFIED" in shown.stdout
    shown = manage("jetstream_dlq", "show", str(real.seq), "--json", env=subprocess_env)
    assert json.loads(shown.stdout)["verification"] == "verified"

    default = manage("jetstream_dlq", "replay", env=subprocess_env)
    assert default.returncode == 1
    assert f"not replayed {unsigned}: unverified" in default.stderr
    assert f"not replayed {copied}: unverified" in default.stderr
    assert set(replay_copies(config.stream_name)) == {real.seq}
    assert sorted(m.seq for m in dlq.list_dead_letters()[1]) == [unsigned, copied]

    forced = manage("jetstream_dlq", "replay", "--include-unverified", env=subprocess_env)
    assert forced.returncode == 0, forced.stderr
    assert set(replay_copies(config.stream_name)) == {real.seq, unsigned, copied}
    consume(handlers.record_effect)
    assert Effect.objects.filter(event_id=real_id).count() == 1
    assert Effect.objects.filter(event_id=forged_id).count() == 1  # the inbox dedupes the copy


# -- 5. dead letters cannot be silenced -------------------------------------------------------


def test_dead_letters__predictable_ids_published_first_do_not_silence_them(bridge: Any) -> None:
    stream = bridge.stream_name
    last = nats(lambda c: c.jsm.stream_info(stream)).state.last_seq
    count = 10
    # The attacker's letters go to the DLQ's own stream: the real events take the events'
    # stream's next sequences, which the forged ids name.
    coming = range(last + 1, last + count + 1)
    for seq in coming:
        forge(
            bridge,
            bridge.subjects.subscribe,
            overrides={MSG_ID_HEADER: f"dlq:{DURABLE}:{stream}:{seq}"},
        )
    seqs = [publish_raw(bridge, f"not json {i}".encode()) for i in range(count)]
    assert seqs == list(coming)

    assert consume(handlers.record_effect).dead_lettered == count
    real = [m for m in dlq.list_dead_letters()[1] if m.headers[letters.ERROR_MESSAGE] != "forged"]
    assert sorted(m.letter.stream_seq for m in real) == seqs
    assert {m.reason for m in real} == {letters.MALFORMED}
    for message in real:
        pattern = rf"dlq:{DURABLE}:{stream}:{message.letter.stream_seq}:[0-9a-f]{{32}}"
        assert re.fullmatch(pattern, message.headers[MSG_ID_HEADER])


def test_dead_letter__a_duplicate_ack_on_the_dlq_publish_leaves_the_message_to_come_back(
    bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = bridge.stream_name
    seq = publish_raw(bridge, b"not json")
    # The ids this message's dead letter would get, taken first: the old predictable form and
    # the new one with its random part forced (nobody could guess it otherwise).
    for taken in (f"dlq:{DURABLE}:{stream}:{seq}", f"dlq:{DURABLE}:{stream}:{seq}:{'0' * 32}"):
        forge(bridge, bridge.subjects.subscribe, overrides={MSG_ID_HEADER: taken})
    monkeypatch.setattr(letters, "nonce", lambda: "0" * 32, raising=False)

    stats = consume(handlers.record_effect, max_messages=1)
    assert (stats.dead_lettered, stats.retried) == (0, 1)
    assert dlq.depth().messages == 2  # only the forged ones
    info = nats(lambda c: c.jsm.consumer_info(stream, DURABLE))
    assert info.num_ack_pending == 1  # not terminated: due again after the backoff

    monkeypatch.undo()
    assert consume(handlers.record_effect).dead_lettered == 1
    [real] = [m for m in dlq.list_dead_letters()[1] if m.letter.error_message != "forged"]
    assert (real.reason, real.letter.stream_seq, real.letter.deliveries) == (
        letters.MALFORMED,
        seq,
        2,
    )
    info = nats(lambda c: c.jsm.consumer_info(stream, DURABLE))
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


def test_replay__predictable_replay_ids_published_first_do_not_swallow_the_copy(
    bridge: Any,
) -> None:
    [event_id] = publish_incoming(bridge, 1, payload={"reject": True})
    consume(handlers.rejects)
    [letter] = dlq.list_dead_letters()[1]
    # The old replay id was the DLQ sequence and the millisecond of the run: take the next
    # few seconds' worth of them on the target subject.
    now_ms = time.time_ns() // 1_000_000
    items = [
        (bridge.subjects.subscribe, b"{}", {MSG_ID_HEADER: f"replay:{letter.seq}:{ms}"})
        for ms in range(now_ms, now_ms + 4000)
    ]

    async def send(conn: Connection) -> None:
        results = await conn.publish_many(items)
        assert not [r for r in results if isinstance(r, Exception)]

    nats(send)
    result = dlq.replay()
    [(dlq_seq, new_seq)] = result.replayed
    assert dlq_seq == letter.seq
    copy = nats(lambda c: c.jsm.get_message(bridge.stream_name, new_seq))
    assert copy.headers[letters.REPLAY_OF] == str(letter.seq)
    assert json.loads(copy.data)["event_id"] == event_id


def test_replay__a_duplicate_ack_keeps_the_letter_in_the_dlq(
    bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_incoming(bridge, 1, payload={"reject": True})
    consume(handlers.rejects)
    [letter] = dlq.list_dead_letters()[1]
    taken = f"replay:{letter.seq}:{'0' * 32}"
    nats(lambda c: c.publish(bridge.subjects.subscribe, b"{}", {MSG_ID_HEADER: taken}))
    monkeypatch.setattr(letters, "nonce", lambda: "0" * 32, raising=False)

    result = dlq.replay()
    assert result.replayed == []
    [(seq, why)] = result.failed
    assert seq == letter.seq
    assert "already held message id" in why
    assert [m.seq for m in dlq.list_dead_letters()[1]] == [letter.seq]


# -- 7. forged headers neither crash nor drive the terminal ----------------------------------


def test_dlq__bad_numeric_and_time_headers_are_shown_invalid_and_crash_nothing(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    bad = {
        "x": {letters.STREAM_SEQ: "x"},
        "negative": {letters.DELIVERIES: "-1"},
        "huge": {letters.STREAM_SEQ: "9" * 30},
        "exponent": {letters.STREAM_SEQ: "1e3"},
        "digits": {letters.STREAM_SEQ: "9" * 5000},
        "time": {letters.FAILED_AT: "yesterday"},
    }
    seqs = {
        name: forge(bridge, bridge.subjects.subscribe, envelope_body(bridge, n=i)[1], headers)
        for i, (name, headers) in enumerate(bad.items())
    }

    listing = manage("jetstream_dlq", "list", env=subprocess_env)
    assert listing.returncode == 0, listing.stderr
    assert f"dead letter {seqs['x']}: invalid Jsb-Stream-Seq: x" in listing.stdout
    assert f"dead letter {seqs['negative']}: invalid Jsb-Deliveries: -1" in listing.stdout
    assert f"dead letter {seqs['time']}: invalid Jsb-Failed-At: yesterday" in listing.stdout
    assert f"{len(bad)} shown; {len(bad)} dead letter(s)" in listing.stdout

    data = json.loads(manage("jetstream_dlq", "list", "--json", env=subprocess_env).stdout)
    rows = {row["seq"]: row for row in data["messages"]}
    assert rows[seqs["x"]]["original_seq"] is None
    assert rows[seqs["x"]]["invalid_headers"] == {"Jsb-Stream-Seq": "x"}
    assert rows[seqs["huge"]]["invalid_headers"] == {"Jsb-Stream-Seq": "9" * 30}
    assert rows[seqs["negative"]]["deliveries"] is None
    assert rows[seqs["time"]]["failed_at"] is None

    shown = manage("jetstream_dlq", "show", str(seqs["x"]), env=subprocess_env)
    assert shown.returncode == 0, shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if "Jsb-Stream-Seq" in line]
    assert line.split()[:2] == ["Jsb-Stream-Seq", "x"]
    assert "INVALID" in line

    replayed = manage("jetstream_dlq", "replay", env=subprocess_env)
    assert replayed.returncode == 0, replayed.stderr
    assert "Traceback" not in replayed.stderr
    assert f"replayed {len(bad)} dead letter(s), {len(bad)} removed" in replayed.stdout
    assert set(replay_copies(bridge.stream_name)) == set(seqs.values())


def test_dlq__list_and_show_print_control_characters_as_visible_escapes(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    hostile_json = json.dumps({"name": "a\u202eb\u009b31m", "note": "x\u2066y"}).encode()
    hostile_text = b"clear \x1b[2J\x1b]0;owned\x07 bs \x08\x08 cr \r over \xc2\x9b1m \xe2\x80\xae"
    headers = {
        letters.REASON: "rejected\x1b[31m",
        letters.ERROR_MESSAGE: "boom\x07\x08\x1b]0;title\x07",
        letters.EVENT_ID: "evt\u202etxt.exe",
        letters.CONSUMER: "alpha\x1b[0m\u2066",
    }
    on_json = forge(bridge, bridge.subjects.subscribe, hostile_json, headers)
    on_text = forge(bridge, bridge.subjects.subscribe, hostile_text, headers)

    outputs = {
        "list": manage_bytes("jetstream_dlq", "list", env=subprocess_env),
        "show json body": manage_bytes("jetstream_dlq", "show", str(on_json), env=subprocess_env),
        "show text body": manage_bytes("jetstream_dlq", "show", str(on_text), env=subprocess_env),
    }
    for what, (code, out, err) in outputs.items():
        assert code == 0, (what, err)
        text = (out + err).decode("utf-8")
        for control in RAW_CONTROLS:
            assert control not in text, (what, repr(control))
    _, listing, _ = outputs["list"]
    assert b"rejected\\x1b[31m" in listing
    assert b"evt\\u202etxt.exe" in listing
    _, shown_text, _ = outputs["show text body"]
    assert b"clear \\x1b[2J\\x1b]0;owned\\x07 bs \\x08\\x08 cr \\r over \\x9b1m \\u202e" in (
        shown_text
    )
    _, shown_json, _ = outputs["show json body"]
    assert b'"name": "a\\u202eb\\x9b31m"' in shown_json

    for args in (("list", "--json"), ("show", str(on_json), "--json")):
        code, out, _ = manage_bytes("jetstream_dlq", *args, env=subprocess_env)
        assert code == 0
        assert not any(control.encode() in out for control in RAW_CONTROLS)
        data = json.loads(out)  # still valid JSON, the values intact
        if "body" in data:
            assert data["body"]["name"] == "a\u202eb\u009b31m"
            assert data["headers"][letters.REASON] == "rejected\x1b[31m"
