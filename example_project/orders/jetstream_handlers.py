"""Orders receives the replies of both peers: billing's invoices and shipping's shipments."""

from __future__ import annotations

from typing import Any

from jetstream_bridge import handler

from .models import Order


# Each runs in the consumer's transaction, together with the inbox row: once per event.
@handler("invoice", "created")
def mark_invoiced(event: dict[str, Any], subject: str, deliveries: int) -> None:
    Order.objects.filter(number=event["payload"]["order_number"]).update(status="invoiced")


@handler("shipment", "created")
def mark_shipped(event: dict[str, Any], subject: str, deliveries: int) -> None:
    Order.objects.filter(number=event["payload"]["order_number"]).update(shipped=True)
