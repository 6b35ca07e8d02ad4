from __future__ import annotations

from django.db import models


class Order(models.Model):
    number = models.CharField(max_length=32, unique=True)
    total_cents = models.PositiveIntegerField()
    status = models.CharField(max_length=16, default="placed")  # "invoiced" once billing replies
    shipped = models.BooleanField(default=False)  # set when shipping replies
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"order {self.number} ({self.status})"
