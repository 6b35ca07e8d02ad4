"""Shipping handles the same order events as billing and replies with a shipment event."""

from __future__ import annotations

from typing import Any

from jetstream_bridge import Publisher, handler

from .models import Shipment


@handler("order", "created")
def create_shipment(event: dict[str, Any], subject: str, deliveries: int) -> None:
    # Every order ships, free ones too: billing's refusal of a zero total is billing's business.
    shipment = Shipment.objects.create(order_number=event["payload"]["number"])
    # The reply goes through shipping's outbox in this same transaction.
    Publisher().publish(
        resource_type="shipment",
        event_type="created",
        payload={"id": shipment.pk, "order_number": shipment.order_number},
    )
