"""Several peers: topology, auto-provisioning and operations against a real server and database.

``orders`` exchanges events with three peers. Its stream must hold six subjects (what it
publishes to each peer and what each sends it); a publish-only service provisions them on
its first publish; health, metrics, the status page and the DLQ tool see every peer.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import pytest
from django.db import transaction
from django.test import Client
from prometheus_client import REGISTRY

from jetstream_bridge import Publisher, dlq, health
from jetstream_bridge.conf import get_config
from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core.envelope import build_envelope
from jetstream_bridge.core.settings import BridgeConfig
from jetstream_bridge.fast_path import fast_path
from jetstream_bridge.models import OutboxEvent, OutboxStatus
from jetstream_bridge.relay import Relay
from jetstream_bridge.topology import ensure_topology
from tests.helpers import manage, nats, spawn, stream_messages, stream_subjects

pytestmark = pytest.mark.django_db(transaction=True)

PEERS = ["billing", "shipping", "notify"]
STATUS = "/admin/jetstream_bridge/outboxevent/status/"


@pytest.fixture
def peers(jetstream_bridge: Any, settings: Any) -> BridgeConfig:
    """``orders`` with three peers, on a fresh ENV: nobody has run ensure yet."""
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "APP_NAME": "orders",
        "DESTINATION_APP": PEERS,
        "RELAY_RETRY_BACKOFF": ["100ms"],
    }
    return get_config()


def six_subjects(config: BridgeConfig) -> set[str]:
    return {s for p in config.peer_subjects for s in (p.publish, p.subscribe)}


def outbox_row(config: BridgeConfig, peer: str, number: int) -> OutboxEvent:
    envelope = build_envelope(
        producer=config.app_name, resource_type="order", event_type="placed", payload={"n": number}
    )
    return OutboxEvent.objects.create(
        event_id=envelope["event_id"],
        subject=config.subjects_for(peer).publish,
        payload=envelope,
        resource_type="order",
        resource_id=str(number),
        event_type="placed",
    )


def provisioning_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "(AUTO_PROVISION)" in r.getMessage()]


# -- topology ---------------------------------------------------------------------------------


def test_ensure__three_peers_get_all_six_subjects_and_check_reports_a_missing_one(
    peers: BridgeConfig, subprocess_env: dict[str, str]
) -> None:
    ensure_topology()
    assert set(stream_subjects(peers.stream_name)) == six_subjects(peers)  # the DLQ: own stream
    assert manage("jetstream_ensure_topology", "--check", env=subprocess_env).returncode == 0

    # Someone drops shipping's inbound subject: --check names it.
    gone = peers.subjects_for("shipping").subscribe
    info = nats(lambda c: c.jsm.stream_info(peers.stream_name))
    body = {**info.config.raw, "subjects": [s for s in info.config.subjects if s != gone]}
    nats(lambda c: c.jsm.update_stream(body))
    check = manage("jetstream_ensure_topology", "--check", env=subprocess_env)
    assert check.returncode != 0, check.stdout
    assert gone in check.stdout
    assert "differs from the settings" in check.stdout


# -- auto-provisioning ------------------------------------------------------------------------


def test_auto_provision__a_direct_publish_without_outbox_provisions_too(
    peers: BridgeConfig, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_OUTBOX": False}
    assert nats(lambda c: c.jsm.stream_info(peers.stream_name)) is None
    with caplog.at_level(logging.INFO, logger="jetstream_bridge"):
        for number in range(5):
            result = Publisher().publish(
                resource_type="order", event_type="placed", payload={"n": number}
            )
            assert result.status == "sent"
    per_peer = Counter(m.subject for m in stream_messages(peers.stream_name))
    assert per_peer == {peers.subjects_for(p).publish: 5 for p in peers.destinations}
    assert len(provisioning_logs(caplog)) == 1


def test_auto_provision__fast_path_publishes_in_a_fresh_environment_ensuring_once(
    peers: BridgeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    assert nats(lambda c: c.jsm.stream_info(peers.stream_name)) is None
    with caplog.at_level(logging.INFO, logger="jetstream_bridge"):
        for number in range(20):
            with transaction.atomic():
                Publisher().publish(
                    resource_type="order", event_type="placed", payload={"n": number}
                )
        assert fast_path().wait_idle()
    # Every publish fans out to the three peers: 60 rows, 60 messages, 20 per peer.
    rows = list(OutboxEvent.objects.values_list("status", "last_error"))
    assert rows == [(OutboxStatus.SENT, None)] * 60
    stored = stream_messages(peers.stream_name)
    assert len(stored) == 60
    per_peer = Counter(m.subject for m in stored)
    assert per_peer == {peers.subjects_for(p).publish: 20 for p in peers.destinations}
    assert set(stream_subjects(peers.stream_name)) >= six_subjects(peers)
    # One ensure for the process, not one per publish.
    assert len(provisioning_logs(caplog)) == 1


def test_auto_provision__relay_publishes_every_peers_rows_in_a_fresh_environment(
    peers: BridgeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    for number, peer in enumerate(PEERS * 2):
        outbox_row(peers, peer, number)
    with caplog.at_level(logging.INFO, logger="jetstream_bridge"):
        Relay().run(once=True)
    assert list(OutboxEvent.objects.values_list("status", flat=True)) == [OutboxStatus.SENT] * 6
    stored = stream_messages(peers.stream_name)
    assert sorted(m.subject for m in stored) == sorted(
        peers.subjects_for(peer).publish for peer in PEERS * 2
    )
    assert len(provisioning_logs(caplog)) == 1


def test_auto_provision__concurrent_relay_processes_converge_on_one_stream(
    peers: BridgeConfig, subprocess_env: dict[str, str]
) -> None:
    for number, peer in enumerate(PEERS * 10):
        outbox_row(peers, peer, number)
    relays = [
        spawn("jetstream_relay", "--once", "--batch-size", "5", env=subprocess_env)
        for _ in range(3)
    ]
    for relay in relays:
        _, err = relay.communicate(timeout=120)
        assert relay.returncode == 0, err
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}
    assert set(stream_subjects(peers.stream_name)) == six_subjects(peers)  # the DLQ: own stream
    stored = stream_messages(peers.stream_name)
    assert len({m.headers["Nats-Msg-Id"] for m in stored}) == len(stored) == 30


def test_auto_provision_off__the_row_and_the_log_say_who_must_run_ensure(
    peers: BridgeConfig, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "AUTO_PROVISION": False}
    with caplog.at_level(logging.WARNING, logger="jetstream_bridge"):
        with transaction.atomic():
            Publisher().publish(resource_type="order", event_type="placed", payload={"n": 1})
        assert fast_path().wait_idle()
        outbox_row(get_config(), "shipping", 2)
        Relay().run(once=True)
    assert nats(lambda c: c.jsm.stream_info(peers.stream_name)) is None  # nothing created
    errors = dict(OutboxEvent.objects.values_list("subject", "last_error"))
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.FAILED}
    for peer in ("billing", "shipping"):
        error = errors[peers.subjects_for(peer).publish]
        assert "AUTO_PROVISION is off for 'orders'" in error
        assert "must run `manage.py jetstream_ensure_topology`" in error
        assert "APP_NAME='orders'" in error
        assert f"DESTINATION_APP={PEERS!r}" in error
        assert f"the service {peer!r} runs it" in error
    logged = [r.getMessage() for r in caplog.records]
    for where, peer in (("fast-path publish failed", "billing"), ("relay publish failed", "")):
        refused = "AUTO_PROVISION is off for 'orders'"
        if peer:
            refused = f"{peers.subjects_for(peer).publish!r} and {refused}"
        assert any(where in m and refused in m for m in logged), logged


# -- operations -------------------------------------------------------------------------------


@pytest.fixture
def two_durables(peers: BridgeConfig) -> dict[str, str]:
    """Our durables on billing's and shipping's inbound subjects, named unconventionally.

    Billing's own durable (reading what we send billing) shares the stream and is not ours.
    """
    ensure_topology()
    ours = {
        "from-billing": peers.subjects_for("billing").subscribe,
        "ship-inbox": peers.subjects_for("shipping").subscribe,
    }
    theirs = {"billing-reads-orders": peers.subjects_for("billing").publish}
    for durable, subject in {**ours, **theirs}.items():
        config = {"durable_name": durable, "filter_subject": subject, "ack_policy": "explicit"}
        nats(lambda c, config=config: c.jsm.create_consumer(peers.stream_name, config))
    for _ in range(3):  # lag on billing's durable
        nats(lambda c: c.publish(peers.subjects_for("billing").subscribe, b"{}"))
    for number, peer in enumerate(["billing", "billing", "shipping"]):
        outbox_row(peers, peer, number)  # unsent rows, as if the relay were down
    return ours


def test_health__lists_every_destination_and_every_durable_of_ours(
    two_durables: dict[str, str], peers: BridgeConfig, subprocess_env: dict[str, str]
) -> None:
    report = health.check()
    assert {c.durable: c.filter_subjects for c in report.consumers} == {
        name: (subject,) for name, subject in two_durables.items()
    }
    assert {c.durable: c.num_pending for c in report.consumers} == {
        "from-billing": 3,
        "ship-inbox": 0,
    }
    assert [(d.peer, d.subject, d.stream, d.unsent) for d in report.destinations] == [
        (peer, peers.subjects_for(peer).publish, peers.stream_name, unsent)
        for peer, unsent in zip(PEERS, [2, 1, 0], strict=True)
    ]
    assert json.loads(json.dumps(report.to_dict()))["destinations"][1]["peer"] == "shipping"
    named = health.check(["ship-inbox"])
    assert [(c.durable, c.exists) for c in named.consumers] == [("ship-inbox", True)]

    text = manage("jetstream_health", env=subprocess_env).stdout
    assert "destinations" in text
    for peer in PEERS:
        assert f"{peers.subjects_for(peer).publish}  ->  {peers.stream_name}" in text
    assert "from-billing" in text
    assert "ship-inbox" in text
    assert "billing-reads-orders" not in text


def test_metrics__every_durable_and_the_backlog_per_destination(
    two_durables: dict[str, str], peers: BridgeConfig
) -> None:
    pending = "jetstream_bridge_consumer_pending_messages"
    stream = peers.stream_name
    assert REGISTRY.get_sample_value(pending, {"stream": stream, "consumer": "from-billing"}) == 3
    assert REGISTRY.get_sample_value(pending, {"stream": stream, "consumer": "ship-inbox"}) == 0
    assert (
        REGISTRY.get_sample_value(pending, {"stream": stream, "consumer": "billing-reads-orders"})
        is None
    )
    unsent = "jetstream_bridge_outbox_unsent_rows_by_destination"
    for peer, rows in zip(PEERS, [2, 1, 0], strict=True):
        labels = {"destination": peer, "subject": peers.subjects_for(peer).publish}
        assert REGISTRY.get_sample_value(unsent, labels) == rows


def test_admin_status__shows_every_destination_and_durable(
    two_durables: dict[str, str], peers: BridgeConfig, admin_client: Client
) -> None:
    page = admin_client.get(STATUS).content.decode()
    for peer in PEERS:
        assert f'data-peer="{peer}"' in page
        assert peers.subjects_for(peer).publish in page
    assert 'data-consumer="from-billing"' in page
    assert 'data-consumer="ship-inbox"' in page
    assert 'data-consumer="billing-reads-orders"' not in page


def dead_letter(config: BridgeConfig, peer: str, consumer: str) -> None:
    headers = {
        letters.REASON: letters.REJECTED,
        letters.CONSUMER: consumer,
        letters.ORIGINAL_SUBJECT: config.subjects_for(peer).subscribe,
        "Nats-Msg-Id": f"dlq-{peer}-{consumer}",
    }
    body = json.dumps(
        build_envelope(producer=peer, resource_type="r", event_type="e", payload={})
    ).encode()
    nats(lambda c: c.publish(config.subjects.dlq, body, headers))


def test_dlq__consumer_selection_spans_peers_and_replays_to_each_peers_subject(
    peers: BridgeConfig, subprocess_env: dict[str, str]
) -> None:
    ensure_topology()
    dead_letter(peers, "billing", "orders-in")
    dead_letter(peers, "shipping", "orders-in")
    dead_letter(peers, "notify", "someone-else")

    listed = manage(
        "jetstream_dlq", "list", "--consumer", "orders-in", "--json", env=subprocess_env
    )
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)["messages"]
    assert sorted(m["original_subject"] for m in found) == sorted(
        peers.subjects_for(peer).subscribe for peer in ("billing", "shipping")
    )

    # "orders-in" is a name in the letters, not a durable here: broadcast, not targeted.
    broadcast = dlq.ReplayPolicy(broadcast=True)
    result = dlq.replay(dlq.Selection(consumer="orders-in"), keep=True, policy=broadcast)
    assert (len(result.replayed), result.failed) == (2, [])
    inbound = [
        m.subject for m in stream_messages(peers.stream_name) if m.subject != peers.subjects.dlq
    ]
    assert sorted(inbound) == sorted(
        peers.subjects_for(peer).subscribe for peer in ("billing", "shipping")
    )
