"""Views that publish like a user's would: one in a request transaction, one async."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, JsonResponse

from jetstream_bridge import Publisher


def create_order(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        result = Publisher().publish(
            resource_type="order", event_type="created", payload={"id": request.POST["id"]}
        )
    return JsonResponse({"event_id": result.event_id}, status=201)


async def create_order_async(request: HttpRequest) -> JsonResponse:
    result = await Publisher().publish_async(
        resource_type="order", event_type="created", payload={"id": request.POST["id"]}
    )
    return JsonResponse({"event_id": result.event_id}, status=201)
