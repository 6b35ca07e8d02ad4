from __future__ import annotations

import uuid
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from jetstream_bridge import FanOutResult, Publisher

from ...models import Order


class Command(BaseCommand):
    help = (
        "Place orders; each one and its 'order.created' event commit together. The event goes "
        "to every peer in DESTINATION_APP: one copy each, all with the same event_id."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--count", type=int, default=5)
        parser.add_argument(
            "--poison", type=int, default=0, help="also place orders billing must reject (total 0)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        publisher = Publisher()
        totals = [1000 + 250 * i for i in range(options["count"])] + [0] * options["poison"]
        for total in totals:
            with transaction.atomic():
                order = Order.objects.create(number=uuid.uuid4().hex[:8], total_cents=total)
                result = publisher.publish(
                    resource_type="order",
                    event_type="created",
                    payload={"id": order.pk, "number": order.number, "total_cents": total},
                )
            # With several peers one publish makes a copy per peer, all with the same event_id.
            sent_to = (
                ", ".join(result.copies) if isinstance(result, FanOutResult) else result.subject
            )
            self.stdout.write(
                f"placed order {order.number} ({total / 100:.2f}) -> "
                f"event {result.event_id} to {sent_to} [{result.status}]"
            )
