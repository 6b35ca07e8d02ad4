"""Scenario 3: a three-node JetStream cluster with an R3 stream loses its stream leader."""

from __future__ import annotations

import time
from typing import Any

import pytest

from jetstream_bridge.core.errors import JetStreamBridgeError
from jetstream_bridge.runtime import reset_runtime
from jetstream_bridge.testing.server import NatsServer
from jetstream_bridge.topology import ensure_topology

from .harness import (
    Campaign,
    Traffic,
    cluster_config,
    cluster_ports,
    nats_call,
    require_postgres,
    rng,
    scaled,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

PRODUCERS, PER_PRODUCER = scaled((2, 500), (2, 5000))
NODE_KILLS = scaled(1, 3)


def stream_cluster(stream: str) -> dict[str, Any]:
    try:
        # The server's own answer: the typed StreamInfo does not carry the cluster state.
        info = nats_call(lambda c: c.jsm.api(f"STREAM.INFO.{stream}"), timeout=30)
    except JetStreamBridgeError:  # StreamNotFound included
        return {}
    return dict(info.get("cluster") or {})


def healthy(stream: str) -> bool:
    """A leader is elected and both followers are caught up."""
    cluster = stream_cluster(stream)
    replicas = cluster.get("replicas") or []
    return (
        bool(cluster.get("leader"))
        and len(replicas) == 2
        and all(r.get("current") and not r.get("offline") for r in replicas)
    )


def ensure_when_ready() -> bool:
    try:
        ensure_topology()
    except JetStreamBridgeError:
        reset_runtime()  # the meta leader is not elected yet: ask again
        return False
    return True


@pytest.mark.timeout(scaled(300, 1200))
def test_chaos__r3_stream_survives_losing_its_leader(campaign: Campaign) -> None:
    require_postgres()
    campaign.scenario = "cluster"
    ports = cluster_ports(3)
    routes = [cluster for _, cluster in ports]
    for client, cluster in ports:
        campaign.servers.append(
            NatsServer(port=client, config=cluster_config("jsb-chaos", cluster, routes))
        )
    for server in campaign.servers:
        server.start(timeout=60)
    config = campaign.configure(STREAM_REPLICAS=3)
    wait_until(ensure_when_ready, timeout=90, what="the JetStream meta leader", interval=1.0)
    wait_until(lambda: healthy(config.stream_name), timeout=90, what="an R3 stream in sync")
    traffic = Traffic(campaign, config, PRODUCERS, PER_PRODUCER)
    traffic.start()
    downtime = rng("cluster-downtime")
    killed: list[str] = []

    def kill_leader(k: int) -> None:
        wait_until(lambda: healthy(config.stream_name), timeout=120, what="replicas in sync")
        leader = stream_cluster(config.stream_name)["leader"]
        node = next(s for s in campaign.servers if s.name == leader)
        killed.append(leader)
        node.stop(kill=True)
        time.sleep(downtime.uniform(1.0, 3.0))  # the outage: a new leader is elected meanwhile
        node.start(timeout=60)

    traffic.inject(NODE_KILLS, kill_leader, seed="cluster", timeout=scaled(180, 600))
    traffic.finish(drain_timeout=scaled(180, 600), node_kills=NODE_KILLS, killed=killed)
    assert config.stream_replicas == 3
