"""Tables the benchmark writes: a business row and one row per handled event."""

from __future__ import annotations

from django.db import models


class Order(models.Model):
    """The business write of a request-like transaction."""

    number = models.CharField(max_length=64)
    total_cents = models.IntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    objects: models.Manager[Order] = models.Manager()

    def __str__(self) -> str:
        return self.number


class HandledEvent(models.Model):
    """One row per handled event; the unique key is what a plain consumer dedupes on."""

    event_id = models.CharField(max_length=255, unique=True)
    source = models.CharField(max_length=32)
    started_at = models.FloatField(help_text="time.time() when the handler started")

    objects: models.Manager[HandledEvent] = models.Manager()

    def __str__(self) -> str:
        return self.event_id
