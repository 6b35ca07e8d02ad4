"""Billing handles order events and replies with an invoice event."""

from __future__ import annotations

from typing import Any

from jetstream_bridge import Publisher, RejectMessage, handler

from .models import Invoice


@handler("order", "created")
def create_invoice(event: dict[str, Any], subject: str, deliveries: int) -> None:
    order = event["payload"]
    if order["total_cents"] <= 0:
        # Retrying cannot fix this: send it to the dead-letter queue with the reason.
        raise RejectMessage(f"order {order['number']} has a non-positive total")
    invoice = Invoice.objects.create(
        order_number=order["number"], amount_cents=order["total_cents"]
    )
    # The reply goes through billing's outbox in this same transaction.
    Publisher().publish(
        resource_type="invoice",
        event_type="created",
        payload={
            "id": invoice.pk,
            "order_number": invoice.order_number,
            "amount_cents": invoice.amount_cents,
        },
    )
