"""Scenario 2: relays and consumers are SIGKILLed at random points and started again."""

from __future__ import annotations

import pytest

from jetstream_bridge.topology import ensure_topology

from .harness import Campaign, Traffic, require_postgres, rng, scaled

pytestmark = pytest.mark.django_db(transaction=True)

PRODUCERS, PER_PRODUCER = scaled((2, 1000), (4, 5000))
RELAY_KILLS, CONSUMER_KILLS = scaled((1, 2), (3, 5))


@pytest.mark.timeout(scaled(240, 1200))
def test_chaos__killed_relays_and_consumers_lose_and_duplicate_nothing(
    campaign: Campaign,
) -> None:
    require_postgres()
    campaign.scenario = "worker-crashes"
    campaign.server()
    # Without the fast path every event goes through a relay, so killing relays matters.
    config = campaign.configure(OUTBOX_FAST_PATH=False)
    ensure_topology()
    traffic = Traffic(campaign, config, PRODUCERS, PER_PRODUCER, relays=2, consumers=2)
    traffic.start()
    victims = ["relay"] * RELAY_KILLS + ["consumer"] * CONSUMER_KILLS
    chooser = rng("worker-crashes")
    chooser.shuffle(victims)

    def crash(k: int) -> None:
        kind = victims[k]
        candidates = [w for w in campaign.fleet.workers if w.name.startswith(kind) and w.running]
        worker = chooser.choice(candidates)
        worker.kill()
        worker.start()

    traffic.inject(len(victims), crash, seed="worker-crash-points", timeout=scaled(120, 600))
    traffic.finish(
        drain_timeout=scaled(120, 600), relay_kills=RELAY_KILLS, consumer_kills=CONSUMER_KILLS
    )
