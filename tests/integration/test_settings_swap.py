"""Changing the settings at run time (``override_settings``, a reload) under live publishing.

The swap retires the shared connection instead of closing it under the publishes in flight:
they finish on it (or fail into the outbox, where the relay finds them), and new publishes use
a connection made with the new settings. Judged by what the stream stores.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from django.db import connections, transaction
from django.test import override_settings

from jetstream_bridge import Publisher
from jetstream_bridge.broker import Connection
from jetstream_bridge.core.settings import BridgeConfig
from jetstream_bridge.fast_path import fast_path
from jetstream_bridge.models import OutboxEvent, OutboxStatus
from jetstream_bridge.relay import Relay
from jetstream_bridge.runtime import get_runtime
from jetstream_bridge.topology import ensure_topology
from tests.helpers import stream_msg_ids

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 4
SWAPS = 30


@pytest.fixture
def bridge(jetstream_bridge: BridgeConfig) -> BridgeConfig:
    ensure_topology()
    return jetstream_bridge


def publish_until(stop: threading.Event, sent: list[str], errors: list[BaseException]) -> None:
    """Publish one event per transaction (outbox row, then the fast path on commit)."""
    try:
        while not stop.is_set():
            with transaction.atomic():
                result = Publisher().publish(
                    resource_type="order", event_type="created", payload={"n": len(sent)}
                )
            sent.append(result.event_id)
    except BaseException as exc:
        errors.append(exc)
    finally:
        connections.close_all()


async def request_timeout(conn: Connection) -> float:
    return conn.config.request_timeout


def test_settings_swap__under_a_publishing_loop_loses_and_doubles_nothing(
    bridge: BridgeConfig, settings: Any
) -> None:
    base = dict(settings.JETSTREAM_BRIDGE)
    stop = threading.Event()
    sent: list[str] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=publish_until, args=(stop, sent, errors)) for _ in range(THREADS)
    ]
    runtimes = set()
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        for swap in range(SWAPS):
            # Same stream and subjects; a different connection setting each time.
            with override_settings(JETSTREAM_BRIDGE={**base, "REQUEST_TIMEOUT": f"{5 + swap}s"}):
                runtimes.add(id(get_runtime()))
                # New work runs on a connection made with the new settings.
                assert get_runtime().call(request_timeout) == 5 + swap
                time.sleep(0.05)
            runtimes.add(id(get_runtime()))
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert fast_path().wait_idle(30)
    assert len(runtimes) >= SWAPS, "each swap must have made a new connection"
    by_fast_path = OutboxEvent.objects.filter(status=OutboxStatus.SENT).count()
    Relay().run(once=True)  # whatever the fast path could not send, as in production

    assert len(sent) > 100, f"only {len(sent)} publishes: the loop did not run under the swaps"
    ids = stream_msg_ids(bridge.stream_name)
    doubled = [event_id for event_id, n in Counter(ids).items() if n > 1]
    assert not doubled
    assert sorted(ids) == sorted(sent)
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}
    print(f"{len(sent)} events over {SWAPS * 2} swaps; {by_fast_path} sent by the fast path")
