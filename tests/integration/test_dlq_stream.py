"""The DLQ's own stream against a real nats-server: limits, overlap, and the move out of the
events' stream for environments created before it existed."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from jetstream_bridge import dlq
from jetstream_bridge.conf import get_config
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core.envelope import MSG_ID_HEADER
from jetstream_bridge.dlq_stream import move_dlq
from jetstream_bridge.topology import ensure_topology
from tests.helpers import (
    fast_retry_bridge,
    manage,
    nats,
    publish_incoming,
    publish_raw,
    stream_messages,
    stream_subjects,
)
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)
DURABLE = "alpha-events"


def consume(handler: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("stop_when_idle", True)
    kwargs.setdefault("idle_timeout", 1.0)
    return asyncio.run(Consumer(durable_name=DURABLE, handler=handler, **kwargs).run_async())


def flood_dlq(config: Any, count: int, size: int) -> None:
    """Publish ``count`` dead letters of ``size`` bytes, as a burst of failures would."""
    body = b"x" * size
    items = [
        (config.subjects.dlq, body, {MSG_ID_HEADER: f"flood-{n}", letters.REASON: "malformed"})
        for n in range(count)
    ]

    async def send(conn: Any) -> None:
        results = await conn.publish_many(items)
        assert not [r for r in results if isinstance(r, Exception)]

    nats(send)


def state(stream: str) -> Any:
    info = nats(lambda c: c.jsm.stream_info(stream))
    assert info is not None, stream
    return info.state


def flood_with_live_events(settings: Any, **dlq_settings: Any) -> tuple[Any, list[str]]:
    """Under a 64 KiB events' stream, 40 live events then 400 KiB of dead letters."""
    config = fast_retry_bridge(settings, DURABLE, STREAM_MAX_BYTES=64 * 1024, **dlq_settings)
    live = publish_incoming(config, 40)
    flood_dlq(config, 200, 2048)
    return config, live


def test_dlq_stream__a_dead_letter_flood_evicts_no_live_event(
    jetstream_bridge: Any, settings: Any
) -> None:
    config, live = flood_with_live_events(settings, DLQ_MAX_BYTES=32 * 1024)
    events = state(config.stream_name)
    assert (events.messages, events.first_seq) == (40, 1)  # not one live event evicted
    letters_kept = state(config.dlq_stream_name)
    assert letters_kept.bytes <= 32 * 1024
    assert 0 < letters_kept.messages < 200  # the oldest dead letters made room
    assert letters_kept.last_seq == 200
    assert dlq.depth().messages == letters_kept.messages

    stats = consume(handlers.record_effect)
    assert stats.processed == 40
    effects = Effect.objects.values_list("event_id", flat=True)
    assert sorted(effects) == sorted(live)


def test_dlq_stream__the_same_flood_in_a_shared_stream_evicts_live_events(
    jetstream_bridge: Any, settings: Any
) -> None:
    # What the stream of its own prevents (and proof that the test above can fail).
    config, _ = flood_with_live_events(settings, DLQ_STREAM_NAME=jetstream_bridge.stream_name)
    assert stream_subjects(config.stream_name) == [
        config.subjects.publish,
        config.subjects.subscribe,
        config.subjects.dlq,
    ]
    events = state(config.stream_name)
    assert events.first_seq > 1
    assert consume(handlers.record_effect).processed < 40


def test_dlq_stream__limits_follow_the_settings_and_check_reports_the_drift(
    jetstream_bridge: Any, settings: Any, subprocess_env: dict[str, str]
) -> None:
    config = fast_retry_bridge(settings, DURABLE, DLQ_MAX_AGE="1h")
    assert state(config.dlq_stream_name).messages == 0
    env = dict(subprocess_env)
    env["JSB_TEST_OVERRIDES"] = json.dumps(
        {**json.loads(env["JSB_TEST_OVERRIDES"]), "DLQ_MAX_AGE": "2h", "DLQ_MAX_BYTES": 4096}
    )
    check = manage("jetstream_ensure_topology", "--check", env=env)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "update dlq stream" in check.stdout
    assert "max_age: 3600s -> 7200s" in check.stdout
    assert "max_bytes: -1 -> 4096" in check.stdout
    applied = manage("jetstream_ensure_topology", env=env)
    assert applied.returncode == 0, applied.stderr
    info = nats(lambda c: c.jsm.stream_info(config.dlq_stream_name))
    assert (info.config.max_age, info.config.max_bytes) == (7200.0, 4096)
    assert manage("jetstream_ensure_topology", "--check", env=env).returncode == 0


def test_dlq_stream__another_stream_capturing_the_dlq_subject_is_respected(
    jetstream_bridge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = jetstream_bridge
    owner = {"name": "DLQ-ELSEWHERE", "subjects": [config.subjects.dlq], "storage": "memory"}
    nats(lambda c: c.jsm.create_stream(owner))
    try:
        with caplog.at_level(logging.WARNING, logger="jetstream_bridge.dlq_stream"):
            report = ensure_topology(durable=DURABLE)
        assert nats(lambda c: c.jsm.stream_info(config.dlq_stream_name)) is None
        [skip] = [a for a in report.actions if a.target == config.subjects.dlq]
        assert "captured by other stream(s) DLQ-ELSEWHERE" in skip.detail
        assert "DLQ-ELSEWHERE" in caplog.text
        assert not skip.change
        publish_raw(config, b"not json")
        assert consume(handlers.record_effect).dead_lettered == 1
        assert dlq.depth().stream == "DLQ-ELSEWHERE"
        assert dlq.depth().messages == 1
    finally:
        nats(lambda c: c.jsm.delete_stream("DLQ-ELSEWHERE"))


def test_dlq_stream__concurrent_ensures_converge_on_one_dlq_stream(
    jetstream_bridge: Any,
) -> None:
    from jetstream_bridge.topology import TopologyReport, ensure_topology_async

    config = jetstream_bridge

    async def many(conn: Any) -> list[Any]:
        return await asyncio.gather(*(ensure_topology_async(conn, config) for _ in range(8)))

    reports: list[TopologyReport] = nats(many)
    created = [a for r in reports for a in r.actions if a.kind == "create-dlq-stream"]
    assert created  # at least one of them made it; none failed
    assert sorted(nats(lambda c: c.jsm.stream_names(subject=f"{config.env}.>"))) == sorted(
        [config.stream_name, config.dlq_stream_name]
    )
    assert stream_subjects(config.dlq_stream_name) == [config.subjects.dlq]
    assert config.subjects.dlq not in stream_subjects(config.stream_name)
    assert ensure_topology().in_sync


# -- an environment created before the DLQ had a stream of its own ---------------------------


def shared_environment(settings: Any, jetstream_bridge: Any, *, letters_count: int) -> Any:
    """Build the old layout: the DLQ subject in the events' stream, with dead letters in it;
    then switch to the current settings (a DLQ stream of its own)."""
    old = fast_retry_bridge(
        settings,
        DURABLE,
        DLQ_STREAM_NAME=jetstream_bridge.stream_name,
        DLQ_SIGNING_KEY="s" * 40,
    )
    assert old.subjects.dlq in stream_subjects(old.stream_name)
    for n in range(letters_count):
        publish_raw(old, f"not json {n}".encode())
    assert consume(handlers.record_effect).dead_lettered == letters_count
    settings.JETSTREAM_BRIDGE = {
        key: value for key, value in settings.JETSTREAM_BRIDGE.items() if key != "DLQ_STREAM_NAME"
    }
    return get_config()


def test_move__an_existing_shared_dlq_keeps_working_until_moved(
    jetstream_bridge: Any, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = shared_environment(settings, jetstream_bridge, letters_count=2)
    with caplog.at_level(logging.WARNING, logger="jetstream_bridge.dlq_stream"):
        report = ensure_topology(durable=DURABLE)
    [kept] = [a for a in report.actions if a.target == config.subjects.dlq]
    assert "kept in the events' stream" in kept.detail
    assert "--move-dlq" in kept.detail
    assert not kept.change
    assert report.in_sync
    assert f"stay in stream {config.stream_name}" in caplog.text
    assert nats(lambda c: c.jsm.stream_info(config.dlq_stream_name)) is None
    # Dead letters still go where they went, and the tool finds them there.
    publish_raw(config, b"still not json")
    assert consume(handlers.record_effect).dead_lettered == 1
    depth = dlq.depth()
    assert (depth.stream, depth.messages) == (config.stream_name, 3)


def test_move__copies_the_letters_purges_them_and_keeps_the_events(
    jetstream_bridge: Any, settings: Any, subprocess_env: dict[str, str]
) -> None:
    config = shared_environment(settings, jetstream_bridge, letters_count=3)
    live = publish_incoming(config, 5)
    before = [m for m in stream_messages(config.stream_name) if m.subject == config.subjects.dlq]
    assert len(before) == 3

    plan = manage("jetstream_ensure_topology", "--move-dlq", "--dry-run", env=subprocess_env)
    assert plan.returncode == 0, plan.stderr
    assert "remove subject" in plan.stdout
    assert "create dlq stream" in plan.stdout
    assert config.subjects.dlq in stream_subjects(config.stream_name)

    moved = manage("jetstream_ensure_topology", "--move-dlq", env=subprocess_env)
    assert moved.returncode == 0, moved.stderr
    assert "copied 3 dead letter(s), purged 3" in moved.stdout
    assert stream_subjects(config.stream_name) == [
        config.subjects.publish,
        config.subjects.subscribe,
    ]
    assert stream_subjects(config.dlq_stream_name) == [config.subjects.dlq]
    after = stream_messages(config.dlq_stream_name)
    assert [(m.data, m.headers) for m in after] == [(m.data, m.headers) for m in before]
    remaining = stream_messages(config.stream_name)
    assert [m for m in remaining if m.subject == config.subjects.dlq] == []
    # The events stay: the three that failed and the five live ones.
    assert [m.subject for m in remaining] == [config.subjects.subscribe] * 8

    _, found = dlq.list_dead_letters()
    assert [m.stream for m in found] == [config.dlq_stream_name] * 3
    assert {m.verification for m in found} == {letters.VERIFIED}  # signatures survive
    assert consume(handlers.record_effect).processed == 5
    assert sorted(Effect.objects.values_list("event_id", flat=True)) == sorted(live)

    again = manage("jetstream_ensure_topology", "--move-dlq", env=subprocess_env)
    assert again.returncode == 0, again.stderr
    assert "copied 0 dead letter(s), purged 0" in again.stdout
    assert len(stream_messages(config.dlq_stream_name)) == 3


def test_move__a_dead_letter_during_the_move_is_retried_not_lost(
    jetstream_bridge: Any, settings: Any
) -> None:
    config = shared_environment(settings, jetstream_bridge, letters_count=1)
    info = nats(lambda c: c.jsm.stream_info(config.stream_name))
    without = [s for s in info.config.subjects if s != config.subjects.dlq]

    def move_starts_meanwhile(event: dict[str, Any], subject: str, deliveries: int) -> None:
        # The first step of a move, taken while this message is being handled: until the
        # DLQ stream exists, no stream captures the DLQ subject.
        if deliveries == 1:
            nats(lambda c: c.jsm.update_stream(info.config.with_subjects(without)))
        handlers.rejects(event, subject, deliveries)

    [event_id] = publish_incoming(config, 1, payload={"reject": True})
    stats = consume(move_starts_meanwhile, max_messages=1)
    assert (stats.dead_lettered, stats.retried) == (0, 1)  # the DLQ publish failed: NAKed
    assert stream_subjects(config.stream_name) == without
    pending = nats(lambda c: c.jsm.consumer_info(config.stream_name, DURABLE))
    assert pending.num_ack_pending == 1  # not terminated: it comes back

    result = move_dlq()  # run again: it finishes the move
    assert (result.subject_removed, result.copied, result.purged) == (False, 1, 1)
    assert consume(move_starts_meanwhile).dead_lettered == 1
    _, found = dlq.list_dead_letters()
    assert [m.letter.event_id for m in found] == [None, event_id]  # the older malformed one
    assert {m.stream for m in found} == {config.dlq_stream_name}
    assert [m.letter.deliveries for m in found] == [1, 2]


def test_move__refuses_without_a_dlq_stream_or_with_a_wildcard(
    jetstream_bridge: Any, settings: Any
) -> None:
    from jetstream_bridge.core.errors import TopologyError

    fast_retry_bridge(settings, DURABLE, DLQ_STREAM_NAME=jetstream_bridge.stream_name)
    with pytest.raises(TopologyError, match="no DLQ stream to move"):
        move_dlq()
