"""The work every consumer in the benchmark does: write one row per event."""

from __future__ import annotations

import time
from typing import Any

from django.db import IntegrityError, transaction

from jetstream_bridge import MessageContext, handler

from .models import HandledEvent


def write_row(event: dict[str, Any], subject: str, deliveries: int) -> None:
    """Bridge handler: the consumer's inbox already dedupes and owns the transaction."""
    started = time.time()
    HandledEvent.objects.create(event_id=event["event_id"], source="bridge", started_at=started)


def write_row_once(event_id: str) -> None:
    """Plain handler (FastStream): its own transaction, dedupe on the unique key."""
    started = time.time()
    try:
        with transaction.atomic():
            HandledEvent.objects.create(event_id=event_id, source="faststream", started_at=started)
    except IntegrityError:
        pass  # a redelivery of an event that was already handled


def write_rows(contexts: list[MessageContext]) -> None:
    """Bridge batch handler: the same rows, one ``bulk_create`` per consumer batch."""
    started = time.time()
    HandledEvent.objects.bulk_create(
        [
            HandledEvent(event_id=ctx.event_id, source="bridge", started_at=started)
            for ctx in contexts
        ]
    )


# Registered with batch=True (``--handler benchmarks.handlers.write_rows`` keeps that style).
handler("order", "created", batch=True)(write_rows)
