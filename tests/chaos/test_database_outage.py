"""Scenario 4: the workers' PostgreSQL sessions are terminated, and the database refuses new
connections for a few seconds, while consumers and the relay are busy."""

from __future__ import annotations

import time

import pytest
from django.db import connection

from jetstream_bridge.topology import ensure_topology

from .harness import Campaign, Traffic, require_postgres, rng, scaled

pytestmark = pytest.mark.django_db(transaction=True)

PRODUCERS, PER_PRODUCER = scaled((2, 1000), (4, 2500))
OUTAGES = scaled(3, 6)
VICTIMS = ("jsb-chaos-consumer", "jsb-chaos-relay")


def terminate_worker_sessions() -> int:
    """Kill the consumers' and relays' backends (never the producers' or our own)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = ANY(%s)",
            [list(VICTIMS)],
        )
        return int(cursor.fetchone()[0])


def allow_connections(allowed: bool) -> None:
    """Open or close the test database to new sessions (from the maintenance database: the
    server refuses to close the database a session is connected to)."""
    import psycopg

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    name = connection.ops.quote_name(params.pop("dbname"))
    with psycopg.connect(**params, dbname="postgres", autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(allowed).lower()}")


@pytest.mark.timeout(scaled(240, 1200))
def test_chaos__consumers_and_relay_ride_out_database_outages(campaign: Campaign) -> None:
    require_postgres()
    campaign.scenario = "database-outage"
    campaign.server()
    # The default MAX_DELIVER: an outage must not use up a message's deliveries.
    config = campaign.configure(MAX_DELIVER=5)
    ensure_topology()
    traffic = Traffic(campaign, config, PRODUCERS, PER_PRODUCER)
    traffic.start()
    chooser = rng("database-outage")
    terminated: list[int] = []

    def outage(k: int) -> None:
        # Every other fault is a real outage: the database refuses new connections for a
        # while (producers retry their transactions meanwhile), not just dropped sessions.
        refuse = k % 2 == 1
        if refuse:
            allow_connections(False)
        try:
            terminated.append(terminate_worker_sessions())
            if refuse:
                time.sleep(chooser.uniform(3.0, 8.0))  # the outage itself
        finally:
            if refuse:
                allow_connections(True)

    traffic.inject(OUTAGES, outage, seed="database-outage-points", timeout=scaled(120, 600))
    traffic.finish(
        drain_timeout=scaled(120, 600), outages=OUTAGES, sessions_terminated=sum(terminated)
    )
