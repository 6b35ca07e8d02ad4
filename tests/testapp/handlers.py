"""Handlers used by the consumer tests; they write Effect rows the tests count."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from jetstream_bridge.core.errors import RejectMessage

from .models import Effect

# event_id -> monotonic times of each delivery (in-process tests only)
deliveries_seen: dict[str, list[float]] = defaultdict(list)


def record_effect(event: dict[str, Any], subject: str, deliveries: int) -> None:
    Effect.objects.create(event_id=event["event_id"], consumer=subject, payload=event["payload"])


def slow_effect(event: dict[str, Any], subject: str, deliveries: int) -> None:
    time.sleep(float(event["payload"].get("sleep", 0.002)))
    record_effect(event, subject, deliveries)


def flaky(event: dict[str, Any], subject: str, deliveries: int) -> None:
    """Fail the first ``payload["fail_times"]`` deliveries, then succeed."""
    deliveries_seen[event["event_id"]].append(time.monotonic())
    Effect.objects.create(event_id=event["event_id"], consumer="attempt")  # rolled back
    if deliveries <= int(event["payload"].get("fail_times", 0)):
        raise RuntimeError(f"flaky failure on delivery {deliveries}")
    record_effect(event, subject, deliveries)


def always_fails(event: dict[str, Any], subject: str, deliveries: int) -> None:
    if event["payload"].get("poison"):
        raise ValueError("cannot handle this one")
    record_effect(event, subject, deliveries)


def rejects(event: dict[str, Any], subject: str, deliveries: int) -> None:
    if event["payload"].get("reject"):
        raise RejectMessage("customer does not exist")
    record_effect(event, subject, deliveries)


async def async_effect(event: dict[str, Any], subject: str, deliveries: int) -> None:
    from asgiref.sync import sync_to_async

    await sync_to_async(record_effect)(event, subject, deliveries)
