"""Scenario 1: the nats-server is SIGKILLed and restarted on the same store during traffic."""

from __future__ import annotations

import time

import pytest

from jetstream_bridge.topology import ensure_topology

from .harness import Campaign, Traffic, require_postgres, rng, scaled

pytestmark = pytest.mark.django_db(transaction=True)

PRODUCERS, PER_PRODUCER = scaled((2, 1000), (4, 5000))
RESTARTS = scaled(2, 5)


@pytest.mark.timeout(scaled(240, 1200))
def test_chaos__broker_restarts_lose_and_duplicate_nothing(campaign: Campaign) -> None:
    require_postgres()
    campaign.scenario = "broker-restarts"
    server = campaign.server()
    config = campaign.configure()
    ensure_topology()
    traffic = Traffic(campaign, config, PRODUCERS, PER_PRODUCER)
    traffic.start()
    downtime = rng("broker-downtime")

    def restart(k: int) -> None:
        server.stop(kill=True)
        # The outage itself: publishes, fetches and acks in flight fail meanwhile.
        time.sleep(downtime.uniform(0.5, 3.0))
        server.start(timeout=60)

    traffic.inject(RESTARTS, restart, seed="broker", timeout=scaled(120, 600))
    traffic.finish(drain_timeout=scaled(120, 600), restarts=RESTARTS)
