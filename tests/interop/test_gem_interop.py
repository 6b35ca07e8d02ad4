"""A Django bridge service next to Ruby jetstream_bridge services, on one real nats-server.

The Ruby side is ``tests/interop/gem_peer.py``: it does on the wire what the gem (v2.0.0, the
last release with this bridge's subjects) does. Each test says which behaviour it pins.

The bridge keeps its dead letters in a stream of their own (``DLQ_STREAM_NAME``, by default
``{STREAM_NAME}-dlq``): the gem's ensure then finds the DLQ subject taken and leaves it there,
and the gem's letters survive. ``DLQ_STREAM_NAME`` equal to ``STREAM_NAME`` is the gem's own
shared layout, where its letters are dropped as duplicates (pinned below).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import call_command
from django.db import transaction

from jetstream_bridge import Publisher, dlq
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core.durations import to_nanos
from jetstream_bridge.core.envelope import MSG_ID_HEADER
from jetstream_bridge.core.topology_plan import dlq_stream_config
from jetstream_bridge.relay import Relay
from jetstream_bridge.topology import ensure_topology
from tests.helpers import consumer_answer, manage, nats, stream_answer, stream_messages
from tests.interop.gem_peer import GemConfig, GemPeer, run
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = [pytest.mark.nats, pytest.mark.django_db(transaction=True)]
DURABLE = "alpha-events"  # the Django service is "alpha", the Rails one "beta"


def configure(settings: Any, **overrides: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, **overrides}
    from jetstream_bridge.conf import get_config

    return get_config()


def rails(config: Any, app: str = "beta", destination: str = "alpha", **options: Any) -> GemConfig:
    return GemConfig(env=config.env, app_name=app, destination_app=destination, **options)


def peer_run(nats_server: Any, config: GemConfig, job: Callable[[GemPeer], Any]) -> Any:
    return run(nats_server.url, config, job)


async def connect_ensure(peer: GemPeer) -> str:
    """What the gem's ensure did when the peer connected (every gem process runs it)."""
    return peer.ensured


def consume(**kwargs: Any) -> Any:
    kwargs.setdefault("handler", handlers.record_effect)
    consumer = Consumer(durable_name=DURABLE, stop_when_idle=True, **kwargs)
    return asyncio.run(consumer.run_async())


def effects() -> list[str]:
    return list(Effect.objects.exclude(consumer="attempt").values_list("event_id", flat=True))


def on_subject(stream: str, subject: str) -> list[Any]:
    return [m for m in stream_messages(stream) if m.subject == subject]


def test_gem_peer__creates_what_the_gem_creates(jetstream_bridge: Any, nats_server: Any) -> None:
    """Interest retention and server defaults; ack_wait and backoff in the wrong units."""
    config = jetstream_bridge
    gem = rails(config)
    action = peer_run(nats_server, gem, lambda p: p.ensure_consumer())
    assert action["config"]["durable_name"] == f"{config.env}-beta-workers"
    stream = stream_answer(gem.stream_name)["config"]
    assert stream["name"] == config.stream_name  # the same default name as ours
    assert sorted(stream["subjects"]) == sorted(
        [config.subjects.publish, config.subjects.subscribe, config.subjects.dlq]
    )
    assert (stream["retention"], stream["storage"]) == ("interest", "file")
    assert (stream["max_age"], stream["max_bytes"], stream["allow_direct"]) == (0, -1, False)
    assert stream["duplicate_window"] == to_nanos(120)
    durable = consumer_answer(gem.stream_name, gem.durable_name)["config"]
    assert durable["filter_subject"] == config.subjects.publish  # beta reads what alpha sends
    assert durable["max_deliver"] == 5
    # The gem sends backoff in milliseconds, which the server reads as nanoseconds, and the
    # server then uses the first backoff value as ack_wait: 1 microsecond, not 30 seconds.
    assert durable["backoff"] == [1_000, 5_000, 15_000, 30_000, 60_000]
    assert durable["ack_wait"] == 1_000


def test_bridge_to_gem__outbox_and_relay_events_reach_the_peer_once_each(
    jetstream_bridge: Any, nats_server: Any, settings: Any
) -> None:
    config = configure(settings, OUTBOX_FAST_PATH=False)
    ensure_topology()
    gem = rails(config, use_inbox=True)  # the gem's generator turns its inbox on
    # Our DLQ stream holds the DLQ subject the gem also wants: its ensure sends no update.
    assert peer_run(nats_server, gem, connect_ensure) == "blocked"
    assert sorted(stream_answer(config.stream_name)["config"]["subjects"]) == sorted(
        [config.subjects.publish, config.subjects.subscribe]
    )
    peer_run(nats_server, gem, lambda p: p.ensure_consumer())
    with transaction.atomic():
        ids = [
            Publisher()
            .publish(resource_type="order", event_type="created", payload={"id": i, "n": "x"})
            .event_id
            for i in range(40)
        ]
    stats = Relay().run(once=True)
    assert (stats.sent, stats.failed) == (40, 0)

    seen: list[dict[str, Any]] = []
    peer_stats = peer_run(
        nats_server, gem, lambda p: p.consume(lambda e, s, d: seen.append(e), batch_size=10)
    )
    assert sorted(peer_stats.handled) == sorted(ids)  # each once, none missing
    assert sorted(e["event_id"] for e in seen) == sorted(ids)
    for event in seen:  # what the gem's handlers read
        assert event["producer"] == "alpha"
        assert (event["resource_type"], event["event_type"]) == ("order", "created")
        assert event["resource_id"] == str(event["payload"]["id"])
        assert event["schema_version"] == 1
    stored = on_subject(config.stream_name, config.subjects.publish)
    assert sorted(m.headers[MSG_ID_HEADER] for m in stored) == sorted(ids)
    # The gem's 1-microsecond ack_wait makes the server redeliver what is still in hand;
    # only its inbox keeps those copies from running the handler again.
    assert peer_stats.deliveries == len(ids) + peer_stats.acked_as_seen


def test_gem_to_bridge__peer_events_are_handled_once_and_a_late_resend_is_deduped(
    jetstream_bridge: Any, nats_server: Any, settings: Any
) -> None:
    # A short dedupe window, so the gem's re-send of an event is stored a second time.
    config = configure(settings, DUPLICATE_WINDOW="1s", RELAY_LEASE="500ms")
    ensure_topology(durable=DURABLE)
    gem = rails(config)

    async def publish_all(peer: GemPeer) -> list[dict[str, Any]]:
        sent = [await peer.publish("customer", "updated", {"id": i}) for i in range(30)]
        return [envelope for envelope, _ in sent]

    envelopes = peer_run(nats_server, gem, publish_all)
    stats = consume()
    assert (stats.processed, stats.duplicates, stats.dead_lettered) == (30, 0, 0)
    assert sorted(effects()) == sorted(e["event_id"] for e in envelopes)

    first = envelopes[0]

    async def resend(peer: GemPeer) -> Any:
        deadline = time.monotonic() + 15
        while True:  # as the gem's outbox would, once the server forgot the id
            options = {"event_id": first["event_id"], "trace_id": first["trace_id"]}
            _, ack = await peer.publish("customer", "updated", first["payload"], **options)
            if not ack.duplicate or time.monotonic() > deadline:
                return ack
            await asyncio.sleep(0.5)

    assert not peer_run(nats_server, gem, resend).duplicate
    again = consume()
    assert (again.processed, again.duplicates) == (0, 1)
    assert sorted(effects()) == sorted(e["event_id"] for e in envelopes)


def drifted_stream(config: Any, nats_server: Any) -> dict[str, Any]:
    """Our stream with pinned limits, then a third gem service adds its subjects."""
    ensure_topology()
    before = stream_answer(config.stream_name)["config"]
    assert before["max_age"] == to_nanos(7 * 86400)
    assert before["duplicate_window"] == to_nanos(600)
    gamma = rails(config, app="gamma", destination="beta")
    assert peer_run(nats_server, gamma, connect_ensure) == "updated"
    return stream_answer(config.stream_name)["config"]


PINNED = {
    "STREAM_MAX_AGE": "7d",
    "STREAM_MAX_BYTES": 1_000_000_000,
    "DUPLICATE_WINDOW": "10m",
}


def test_gem_partial_update__resets_the_limits_the_bridge_set(
    jetstream_bridge: Any, nats_server: Any, settings: Any
) -> None:
    config = configure(settings, **PINNED)
    after = drifted_stream(config, nats_server)
    assert f"{config.env}.data.sync.gamma.beta" in after["subjects"]
    assert config.subjects.subscribe in after["subjects"]
    # Only name and subjects were sent: everything else fell back to the server's defaults.
    assert after["max_age"] == 0
    assert after["max_bytes"] == -1
    assert after["duplicate_window"] == to_nanos(120)
    assert after["allow_direct"] is False
    assert after["retention"] == "limits"


def test_gem_partial_update__check_reports_the_drift(
    jetstream_bridge: Any, nats_server: Any, settings: Any, capsys: Any
) -> None:
    config = configure(settings, **PINNED)
    drifted_stream(config, nats_server)
    with pytest.raises(SystemExit) as exit_info:
        call_command("jetstream_ensure_topology", "--check")
    out = capsys.readouterr().out
    assert exit_info.value.code == 1, out
    assert "update stream" in out, out
    assert "max_age: unlimited -> 7d" in out, out
    assert "max_bytes: unlimited -> 953.7 MiB" in out, out
    assert "duplicate_window: 2m -> 10m" in out, out
    assert "retention: limits -> interest" not in out, out  # retention is not set here


def test_gem_interest_stream__bridge_adds_its_subjects_and_keeps_its_retention(
    jetstream_bridge: Any, nats_server: Any, settings: Any
) -> None:
    config = configure(settings, USE_OUTBOX=False)
    beta_gamma = rails(config, app="beta", destination="gamma")
    assert peer_run(nats_server, beta_gamma, connect_ensure) == "created"
    ensure_topology()
    after = stream_answer(config.stream_name)["config"]
    assert after["retention"] == "interest"  # full-config update: nothing reset
    assert sorted(after["subjects"]) == sorted(
        [
            *beta_gamma.wanted_subjects(),
            config.subjects.publish,
            config.subjects.subscribe,
        ]
    )
    assert after["duplicate_window"] == to_nanos(120)
    # The gem's ensure, run again by the next Rails process, finds nothing to do.
    assert peer_run(nats_server, beta_gamma, connect_ensure) == "covered"

    # Interest retention: with no consumer on our subject yet, the server acks and drops.
    dropped = Publisher().publish(resource_type="order", event_type="created", payload={"id": 1})
    assert dropped.status == "sent"
    assert on_subject(config.stream_name, config.subjects.publish) == []

    ensure_topology(durable=DURABLE)
    beta_alpha = rails(config)
    envelope, ack = peer_run(
        nats_server, beta_alpha, lambda p: p.publish("customer", "updated", {"id": 7})
    )
    assert not ack.duplicate
    assert consume().processed == 1
    assert effects() == [envelope["event_id"]]
    # Acked by the only interested consumer: the interest stream let it go.
    assert on_subject(config.stream_name, config.subjects.subscribe) == []


def separate_dlq_stream(config: Any) -> str:
    """The bridge's DLQ stream (``DLQ_STREAM_NAME``), made before anything else has run: what
    a gem service meets once a bridge service has started."""
    nats(lambda c: c.jsm.create_stream(dlq_stream_config(config)))
    return str(config.dlq_stream_name)


def test_gem_ensure__converges_with_a_separate_dlq_stream(
    jetstream_bridge: Any, nats_server: Any
) -> None:
    config = jetstream_bridge
    dlq_stream = separate_dlq_stream(config)
    gem = rails(config)
    assert peer_run(nats_server, gem, connect_ensure) == "created"
    assert peer_run(nats_server, gem, connect_ensure) == "blocked"
    assert sorted(stream_answer(config.stream_name)["config"]["subjects"]) == sorted(
        [config.subjects.publish, config.subjects.subscribe]
    )
    assert ensure_topology(durable=DURABLE).consumer_stream == config.stream_name
    report = ensure_topology(durable=DURABLE)
    # Nothing left to change; what remains is the gem's interest retention, reported.
    assert not any(action.change for action in report.actions), report.actions
    assert len(report.warnings) == 1, report.warnings
    assert "interest" in report.warnings[0], report.warnings
    assert peer_run(nats_server, gem, connect_ensure) == "blocked"
    assert stream_answer(dlq_stream)["config"]["subjects"] == [config.subjects.dlq]


def failing(event: Any, subject: str, deliveries: int) -> None:
    raise RuntimeError(f"Couldn't find Customer with 'id'={event['payload']['id']}")


def rails_alpha_dead_letters(config: Any, nats_server: Any, **options: Any) -> tuple[Any, Any]:
    """The Rails half of "alpha" fails one event from beta until it dead-letters it."""
    envelope, _ = peer_run(
        nats_server, rails(config), lambda p: p.publish("customer", "updated", {"id": 42})
    )
    alpha_rails = rails(config, app="alpha", destination="beta", max_deliver=3, **options)
    stats = peer_run(nats_server, alpha_rails, lambda p: p.consume(failing))
    return envelope, stats


@pytest.mark.parametrize("dlq_headers", ["v2.0", "v2.4"])
def test_gem_dead_letter__in_the_shared_stream_is_dropped_as_a_duplicate(
    jetstream_bridge: Any, nats_server: Any, settings: Any, dlq_headers: str
) -> None:
    """The gem keeps the event's Nats-Msg-Id on the letter: in the shared layout (one stream
    for events and letters, ``DLQ_STREAM_NAME`` = ``STREAM_NAME``) the dedupe drops it."""
    config = configure(settings, DLQ_STREAM_NAME=jetstream_bridge.stream_name)
    ensure_topology()
    assert sorted(stream_answer(config.stream_name)["config"]["subjects"]) == sorted(
        [config.subjects.publish, config.subjects.subscribe, config.subjects.dlq]
    )
    _, stats = rails_alpha_dead_letters(
        config, nats_server, backoff=("1s", "1s"), dlq_headers=dlq_headers
    )
    assert stats.naks == 2
    assert [letter["duplicate"] for letter in stats.dead_letters] == [True]
    assert dlq.depth().messages == 0


def test_gem_dead_letter__in_the_bridges_dlq_stream_survives(
    jetstream_bridge: Any, nats_server: Any
) -> None:
    """The default layout: the DLQ stream has not seen the event's Nats-Msg-Id, so it keeps it."""
    config = jetstream_bridge
    ensure_topology()
    envelope, stats = rails_alpha_dead_letters(config, nats_server, backoff=("1s", "1s"))
    [landed] = stats.dead_letters
    assert (landed["stream"], landed["duplicate"]) == (config.dlq_stream_name, None)
    [letter] = dlq.list_dead_letters()[1]
    assert (letter.stream, letter.seq) == (config.dlq_stream_name, landed["seq"])
    # v2.0 letters carry the event as it came, under its own Nats-Msg-Id: kept, not deduped.
    assert letter.headers[MSG_ID_HEADER] == envelope["event_id"]
    assert json.loads(letter.data) == envelope


def test_gem_dead_letter__listed_shown_and_replayed_to_our_inbound_subject(
    jetstream_bridge: Any, nats_server: Any, subprocess_env: dict[str, str]
) -> None:
    config = jetstream_bridge
    ensure_topology(durable=DURABLE)
    dlq_stream = config.dlq_stream_name
    envelope, stats = rails_alpha_dead_letters(
        config, nats_server, backoff=("1s", "1s"), dlq_headers="v2.4"
    )
    event_id = envelope["event_id"]
    [landed] = stats.dead_letters
    assert (landed["stream"], landed["duplicate"]) == (dlq_stream, None)
    assert consume().processed == 1  # the Django durable on the same subject handled it
    rails_durable = f"{config.env}-alpha-workers"

    listing = manage("jetstream_dlq", "list", env=subprocess_env)
    assert listing.returncode == 0, listing.stderr
    [row] = [
        line
        for line in listing.stdout.splitlines()[1:-1]  # the table's rows
        if line.split()[:1] == [str(landed["seq"])]
    ]
    for text in ("max_deliver_exceeded", rails_durable, config.subjects.subscribe, event_id):
        assert text in row
    assert "RuntimeError: Couldn't find Customer with 'id'=42" in row
    assert f"1 dead letter(s) on {config.subjects.dlq} in stream {dlq_stream}" in listing.stdout

    as_json = json.loads(manage("jetstream_dlq", "list", "--json", env=subprocess_env).stdout)
    [item] = as_json["messages"]
    assert (item["format"], item["deliveries"], item["consumer"]) == ("ruby-gem", 3, rails_durable)
    assert (item["original_stream"], item["event_id"]) == (config.stream_name, event_id)
    assert item["original_seq"] == 1
    assert item["invalid_headers"] == {}

    shown = manage("jetstream_dlq", "show", str(landed["seq"]), env=subprocess_env)
    assert shown.returncode == 0, shown.stderr
    assert "written by   a Ruby jetstream_bridge service (x-dlq-* headers)" in shown.stdout
    assert "reason       max_deliver_exceeded" in shown.stdout
    assert f"subject      {config.subjects.subscribe}" in shown.stdout
    assert "deliveries   3" in shown.stdout
    assert '"payload": {' in shown.stdout

    selected = manage(
        "jetstream_dlq", "list", "--consumer", rails_durable, "--json", env=subprocess_env
    )
    assert len(json.loads(selected.stdout)["messages"]) == 1

    replayed = manage("jetstream_dlq", "replay", env=subprocess_env)
    assert replayed.returncode == 0, replayed.stderr + replayed.stdout
    assert "replayed 1 dead letter(s), 1 removed from the DLQ" in replayed.stdout
    copies = on_subject(config.stream_name, config.subjects.subscribe)
    assert [m.headers.get(letters.REPLAY_OF) for m in copies] == [None, str(landed["seq"])]
    assert json.loads(copies[1].data)["event_id"] == event_id
    # The copy is for the Rails durable that dead-lettered it: the Django durable, which has
    # handled the event already, acks it without running its handler.
    assert copies[1].headers[letters.REPLAY_FOR] == rails_durable
    again = consume()
    assert (again.processed, again.duplicates, again.skipped) == (0, 0, 1)
    assert effects() == [event_id]
    assert dlq.depth().messages == 0
    # The copy reaches the Rails durable it is for (its inbox absorbs the redeliveries the
    # gem's 1-microsecond ack_wait causes).
    alpha_rails = rails(config, app="alpha", destination="beta", use_inbox=True)
    handled = peer_run(nats_server, alpha_rails, lambda p: p.consume(lambda e, s, d: None))
    assert handled.handled == [event_id]


def test_gem_dead_letter__garbled_context_never_stops_a_listing(
    jetstream_bridge: Any, nats_server: Any, subprocess_env: dict[str, str]
) -> None:
    config = jetstream_bridge
    ensure_topology()
    _, stats = rails_alpha_dead_letters(config, nats_server, backoff=("1s", "1s"))
    [good] = stats.dead_letters
    hostile = {
        "x-dead-letter": "true",
        "x-dlq-reason": "max_deliver_exceeded",
        "x-deliveries": "-1",
        "x-dlq-context": '{"original_subject": {"$JS": 1}, "deliveries": "\\u0000", ' + "[" * 5000,
    }
    bad_seq = nats(lambda c: c.publish(config.subjects.dlq, b"\xff\xfe", hostile)).seq

    listing = manage("jetstream_dlq", "list", env=subprocess_env)
    assert listing.returncode == 0, listing.stderr
    assert "2 shown; 2 dead letter(s)" in listing.stdout
    assert f"dead letter {bad_seq}: invalid x-dlq-context:" in listing.stdout
    assert f"dead letter {bad_seq}: invalid x-deliveries: -1" in listing.stdout
    assert any(line.split()[:1] == [str(good["seq"])] for line in listing.stdout.splitlines())
    shown = manage("jetstream_dlq", "show", str(bad_seq), env=subprocess_env)
    assert shown.returncode == 0, shown.stderr
    assert "<- INVALID, ignored" in shown.stdout
    refused = manage("jetstream_dlq", "replay", "--seq", str(bad_seq), env=subprocess_env)
    assert refused.returncode != 0
    assert f"not replayed {bad_seq}: no original subject" in refused.stderr


def test_gem_dead_letter__of_another_apps_subject_is_replayed_only_when_named(
    jetstream_bridge: Any, nats_server: Any, subprocess_env: dict[str, str]
) -> None:
    """The Rails "beta" fails an event alpha sent it: not our inbound subject, so named only."""
    config = jetstream_bridge
    ensure_topology()
    alpha_rails = rails(config, app="alpha", destination="beta")
    envelope, _ = peer_run(
        nats_server, alpha_rails, lambda p: p.publish("invoice", "paid", {"id": 5})
    )
    beta = rails(config, max_deliver=3, backoff=("1s", "1s"), dlq_headers="v2.4")
    stats = peer_run(nats_server, beta, lambda p: p.consume(failing))
    [landed] = stats.dead_letters
    [letter] = dlq.list_dead_letters()[1]
    assert (letter.original_subject, letter.consumer) == (
        config.subjects.publish,
        beta.durable_name,
    )

    refused = manage("jetstream_dlq", "replay", env=subprocess_env)
    assert refused.returncode != 0
    assert f"not replayed {landed['seq']}: refusing to publish to" in refused.stderr
    assert "not this app's inbound subject" in refused.stderr
    assert dlq.depth().messages == 1

    named = manage(
        "jetstream_dlq", "replay", "--to-subject", config.subjects.publish, env=subprocess_env
    )
    assert named.returncode == 0, named.stderr
    handled = peer_run(nats_server, beta, lambda p: p.consume(lambda e, s, d: None))
    assert handled.handled == [envelope["event_id"]]
    assert dlq.depth().messages == 0
