"""Handlers the chaos scenarios run in their consumer processes."""

from __future__ import annotations

from typing import Any

from jetstream_bridge.core.errors import RejectMessage
from tests.testapp.handlers import record_effect


def poison_aware(event: dict[str, Any], subject: str, deliveries: int) -> None:
    """Reject ``payload.reject``, always fail ``payload.poison``, record everything else."""
    payload = event["payload"]
    if payload.get("reject") is True:
        raise RejectMessage("rejected by the chaos handler")
    if payload.get("poison") is True:
        raise ValueError("the chaos handler always fails this one")
    record_effect(event, subject, deliveries)


def fails_first_delivery(event: dict[str, Any], subject: str, deliveries: int) -> None:
    """Fail each message's first delivery (leaving a failed inbox row), then record."""
    if deliveries == 1:
        raise RuntimeError("first delivery fails")
    record_effect(event, subject, deliveries)
