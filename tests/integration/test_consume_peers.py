"""Consuming from several peers in one process, against a real nats-server and database."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from jetstream_bridge.broker import Connection
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core.envelope import build_envelope, encode
from jetstream_bridge.core.errors import TopologyError, UnknownPeer
from jetstream_bridge.core.topology_plan import consumer_config
from jetstream_bridge.handlers import HandlerRegistry
from jetstream_bridge.models import InboxEvent
from jetstream_bridge.topology import ensure_topology
from tests.helpers import consumer_answer, manage, nats
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)
DURABLE = "alpha-events"
PEERS = ["billing", "shipping"]


def configure(settings: Any, peers: list[str]) -> Any:
    """Point the bridge at ``peers`` and make the stream capture what each sends us.

    The stream side of several peers is provisioned by ``jetstream_ensure_topology``; here
    only the consumers are under test, so the peers' subjects are added directly.
    """
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "DESTINATION_APP": peers}
    from jetstream_bridge.conf import get_config

    config = get_config()
    ensure_topology()
    wanted = [config.subjects_for(peer).subscribe for peer in peers]

    async def add_subjects(conn: Connection) -> None:
        info = await conn.jsm.stream_info(config.stream_name)
        assert info is not None
        raw = dict(info.config.raw)
        raw["subjects"] = list(dict.fromkeys([*raw["subjects"], *wanted]))
        await conn.jsm.update_stream(raw)

    nats(add_subjects)
    return config


def publish_from(
    config: Any, peer: str, count: int, *, claims: str | None = None, **payload: Any
) -> list[str]:
    """Publish ``count`` order/created events as ``peer`` would; return their event ids.

    ``claims`` puts another producer in the envelope (and a header), as a hostile peer could.
    """
    subject = config.subjects_for(peer).subscribe
    ids = []
    for i in range(count):
        envelope = build_envelope(
            producer=claims or peer,
            resource_type="order",
            event_type="created",
            payload={"id": i, "sent": time.time(), **payload},
        )
        headers = {"Nats-Msg-Id": envelope["event_id"], "producer": claims or peer}
        nats(lambda c, e=envelope, h=headers: c.publish(subject, encode(e), h))
        ids.append(envelope["event_id"])
    return ids


class Recorder:
    """Handlers that remember which events they saw (thread-safe: loops run in threads)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}
        self.latency: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def handler(self, name: str, sleep: float = 0.0) -> Callable[..., None]:
        def handle(event: dict[str, Any], subject: str, deliveries: int) -> None:
            time.sleep(sleep)
            with self.lock:
                self.seen.setdefault(name, []).append(event["event_id"])
                age = time.time() - float(event["payload"]["sent"])
                self.latency.setdefault(name, []).append(age)

        return handle


def consume(**kwargs: Any) -> Any:
    kwargs.setdefault("stop_when_idle", True)
    return asyncio.run(Consumer(durable_name=DURABLE, **kwargs).run_async())


def inbox_ids(durable: str) -> set[str]:
    return set(InboxEvent.objects.filter(consumer=durable).values_list("event_id", flat=True))


def test_consume__one_process_handles_two_peers_with_per_producer_handlers(
    jetstream_bridge: Any, settings: Any
) -> None:
    config = configure(settings, PEERS)
    billing = publish_from(config, "billing", 3)
    shipping = publish_from(config, "shipping", 2)
    # Arrives on shipping's subject while its envelope and headers claim billing: the subject
    # decides, so it goes to the fallback, never to billing's handler.
    forged = publish_from(config, "shipping", 1, claims="billing")
    recorder, registry = Recorder(), HandlerRegistry()
    registry.register("order", "created", recorder.handler("billing"), producer="billing")
    registry.register("order", "created", recorder.handler("fallback"))

    stats = consume(registry=registry)

    assert stats.processed == 6
    assert sorted(recorder.seen["billing"]) == sorted(billing)
    assert sorted(recorder.seen["fallback"]) == sorted(shipping + forged)
    # One durable per peer: the default peer keeps the name, the other gets NAME-PEER.
    assert inbox_ids(DURABLE) == set(billing)
    assert inbox_ids(f"{DURABLE}-shipping") == set(shipping + forged)
    for peer, durable in (("billing", DURABLE), ("shipping", f"{DURABLE}-shipping")):
        answer = consumer_answer(config.stream_name, durable)
        assert answer is not None
        assert answer["config"]["filter_subject"] == config.subjects_for(peer).subscribe
        assert answer["num_ack_pending"] == 0
        assert answer["num_pending"] == 0
    assert consume(registry=registry).handled == 0


def test_consume__same_event_id_from_two_peers_is_two_events(
    jetstream_bridge: Any, settings: Any
) -> None:
    config = configure(settings, PEERS)
    envelope = build_envelope(
        producer="billing", resource_type="order", event_type="created", payload={"sent": 0}
    )
    for peer in PEERS:
        subject = config.subjects_for(peer).subscribe
        nats(lambda c, s=subject: c.publish(s, encode(envelope), {"Nats-Msg-Id": s}))
    recorder = Recorder()
    stats = consume(handler=recorder.handler("any"))
    assert (stats.processed, stats.duplicates) == (2, 0)
    assert recorder.seen["any"] == [envelope["event_id"]] * 2
    assert inbox_ids(DURABLE) == inbox_ids(f"{DURABLE}-shipping") == {envelope["event_id"]}


def test_consume__a_slow_peer_does_not_stop_the_other(jetstream_bridge: Any, settings: Any) -> None:
    """Billing's handler sleeps; shipping's events keep flowing meanwhile.

    On PostgreSQL/MySQL each peer's transactions run in a thread of their own: shipping is
    not held up at all. SQLite has one writer, so there the peers' batches take turns: a
    shipping batch waits for at most the billing batch in hand, never for all of billing.
    """
    sqlite = connection.vendor == "sqlite"
    sleep, batch = (1.0, 2) if sqlite else (2.0, 2)
    billing_count, shipping_count = (6, 2) if sqlite else (4, 20)
    bound = 2 * sleep * batch + 1.0 if sqlite else 1.0
    config = configure(settings, PEERS)
    recorder, registry = Recorder(), HandlerRegistry()
    registry.register("order", "created", recorder.handler("billing", sleep), producer="billing")
    registry.register("order", "created", recorder.handler("shipping"), producer="shipping")
    consumer = Consumer(durable_name=DURABLE, registry=registry, batch_size=batch, idle_timeout=0.2)
    publish_from(config, "billing", billing_count)
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(asyncio.run(consumer.run_async())))
    worker.start()
    try:
        time.sleep(1.0)  # billing's first batch is in its handler by now
        for _ in range(shipping_count):
            publish_from(config, "shipping", 1)
            time.sleep(0.1)
        deadline = time.monotonic() + bound + 5
        while len(recorder.seen.get("shipping", [])) < shipping_count:
            assert time.monotonic() < deadline, recorder.latency
            time.sleep(0.02)
        billing_done = len(recorder.seen.get("billing", []))
    finally:
        consumer.stop.set()
        worker.join(timeout=60)
    latencies = sorted(recorder.latency["shipping"])
    p50, worst = statistics.median(latencies), latencies[-1]
    print(
        f"\n{connection.vendor}: shipping latency while billing sleeps {sleep}s/event "
        f"(batches of {batch}): p50 {p50:.3f}s max {worst:.3f}s over {len(latencies)} events; "
        f"billing had finished {billing_done}/{billing_count}"
    )
    assert len(latencies) == shipping_count
    assert billing_done < billing_count, "billing finished before shipping was measured"
    assert worst < bound, latencies
    # The stop settled every loop: the batches in hand were finished and acked, none retried.
    assert done
    assert done[0].retried == 0
    assert done[0].processed == shipping_count + len(recorder.seen["billing"])
    for durable in (DURABLE, f"{DURABLE}-shipping"):
        answer = consumer_answer(config.stream_name, durable)
        assert answer is not None
        assert answer["num_ack_pending"] == 0
        assert answer["num_redelivered"] == 0


def test_consume__from_restricts_the_peers_and_an_unknown_peer_is_an_error(
    jetstream_bridge: Any, settings: Any, subprocess_env: dict[str, str]
) -> None:
    config = configure(settings, PEERS)
    env = {
        **subprocess_env,
        "JSB_TEST_OVERRIDES": json.dumps(
            {**json.loads(subprocess_env["JSB_TEST_OVERRIDES"]), "DESTINATION_APP": PEERS}
        ),
    }
    publish_from(config, "billing", 2)
    shipping = publish_from(config, "shipping", 3)
    args = ["jetstream_consume", "--durable", DURABLE, "--stop-when-idle"]
    handler = ["--handler", "tests.testapp.handlers.record_effect"]
    done = manage(*args, *handler, "--from", "shipping", env=env)
    assert done.returncode == 0, done.stderr
    assert "processed 3," in done.stdout
    assert sorted(Effect.objects.values_list("event_id", flat=True)) == sorted(shipping)
    assert consumer_answer(config.stream_name, DURABLE) is None  # billing's was not touched

    wrong = manage(*args, "--from", "shipping", "--from", "nobody", env=env)
    assert wrong.returncode == 1
    assert "'nobody' is not a configured peer" in wrong.stderr
    assert "DESTINATION_APP names billing, shipping" in wrong.stderr
    with pytest.raises(UnknownPeer, match="'nobody'"):
        Consumer(durable_name=DURABLE, peers=["nobody"])


def test_consume__single_peer_durable_config_is_unchanged(jetstream_bridge: Any) -> None:
    config = jetstream_bridge
    assert config.destinations == ("beta",)
    subject = f"{config.env}.data.sync.beta.alpha"
    assert consumer_config(config, DURABLE, subject) == {
        "durable_name": DURABLE,
        "filter_subject": subject,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": 30_000_000_000,
        "max_deliver": 5,
        "max_ack_pending": 1000,
    }
    consumer = Consumer(durable_name=DURABLE, handler=lambda *a: None, stop_when_idle=True)
    assert consumer.durables == {"beta": DURABLE}
    asyncio.run(consumer.run_async())
    answer = consumer_answer(config.stream_name, DURABLE)
    assert answer is not None
    server = answer["config"]
    assert {key: server.get(key) for key in consumer_config(config, DURABLE, subject)} == (
        consumer_config(config, DURABLE, subject)
    )
    assert "filter_subjects" not in server
    names = nats(lambda c: c.jsm.api(f"CONSUMER.NAMES.{config.stream_name}"))
    assert names["consumers"] == [DURABLE]


def test_consume__a_peer_added_later_does_not_replay_the_first(
    jetstream_bridge: Any, settings: Any
) -> None:
    config = configure(settings, ["billing"])
    old = publish_from(config, "billing", 3)
    recorder = Recorder()
    assert consume(handler=recorder.handler("first")).processed == 3
    before = consumer_answer(config.stream_name, DURABLE)
    assert before is not None

    config = configure(settings, PEERS)
    new = publish_from(config, "billing", 1)
    shipping = publish_from(config, "shipping", 2)
    stats = consume(handler=recorder.handler("second"))

    assert stats.processed == 3
    assert sorted(recorder.seen["second"]) == sorted(new + shipping)
    after = consumer_answer(config.stream_name, DURABLE)
    assert after is not None
    assert after["created"] == before["created"]  # the same durable, not a new one
    assert after["config"]["filter_subject"] == config.subjects_for("billing").subscribe
    assert inbox_ids(DURABLE) == set(old + new)
    assert inbox_ids(f"{DURABLE}-shipping") == set(shipping)


def test_consume__reordering_the_peers_is_refused_not_replayed(
    jetstream_bridge: Any, settings: Any
) -> None:
    configure(settings, PEERS)
    ensure_topology(durable=DURABLE)
    config = configure(settings, ["shipping", "billing"])
    for peers in (None, ["billing"]):
        with pytest.raises(TopologyError, match="Keep 'billing' first in DESTINATION_APP"):
            consume(handler=lambda *a: None, peers=peers)
    # Neither re-filtered nor given a second durable that would replay billing's history.
    assert consumer_answer(config.stream_name, f"{DURABLE}-billing") is None
    answer = consumer_answer(config.stream_name, DURABLE)
    assert answer is not None
    assert answer["config"]["filter_subject"] == config.subjects_for("billing").subscribe


def test_consume__sigterm_settles_every_peers_batch_in_hand(
    jetstream_bridge: Any, settings: Any, subprocess_env: dict[str, str]
) -> None:
    config = configure(settings, PEERS)
    overrides = {**json.loads(subprocess_env["JSB_TEST_OVERRIDES"]), "DESTINATION_APP": PEERS}
    env = {**subprocess_env, "JSB_TEST_OVERRIDES": json.dumps(overrides)}
    ids = {peer: publish_from(config, peer, 40, sleep=0.05) for peer in PEERS}
    durables = {"billing": DURABLE, "shipping": f"{DURABLE}-shipping"}
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "django", "jetstream_consume", "--durable", DURABLE),
            *("--batch-size", "10"),
            *("--handler", "tests.testapp.handlers.slow_effect"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while {s for s in Effect.objects.values_list("consumer", flat=True)} != {
        config.subjects_for(peer).subscribe for peer in PEERS
    }:
        assert time.monotonic() < deadline, "both peers must be consumed before the stop"
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    applied = list(Effect.objects.values_list("event_id", flat=True))
    assert len(applied) < 80, "SIGTERM must stop it before the end"
    assert f"processed {len(applied)}," in out
    for peer, durable in durables.items():
        answer = consumer_answer(config.stream_name, durable)
        assert answer is not None
        assert answer["num_ack_pending"] == 0  # every loop settled its batch in hand
        assert inbox_ids(durable) == set(applied) & set(ids[peer])
