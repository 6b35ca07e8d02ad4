"""Orders receives billing's replies: an invoice was created for one of our orders."""

from __future__ import annotations

from typing import Any

from jetstream_bridge import handler

from .models import Order


@handler("invoice", "created")
def mark_invoiced(event: dict[str, Any], subject: str, deliveries: int) -> None:
    # Runs in the consumer's transaction, together with the inbox row: once per event.
    Order.objects.filter(number=event["payload"]["order_number"]).update(status="invoiced")
