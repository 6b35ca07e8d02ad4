from __future__ import annotations

from django.db import models


class Shipment(models.Model):
    order_number = models.CharField(max_length=32, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"shipment for {self.order_number}"
