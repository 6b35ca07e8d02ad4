"""Tables that test handlers write to, so tests can count effects."""

from __future__ import annotations

from django.db import models


class Effect(models.Model):
    """One row per handler run that committed: tests count them to prove exactly-once."""

    event_id = models.CharField(max_length=255)
    consumer = models.CharField(max_length=255, default="")
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)


class MinimalOutbox(models.Model):
    """A custom outbox with only the required columns."""

    event_id = models.CharField(max_length=255, unique=True)
    subject = models.CharField(max_length=255)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=16, default="pending")


class BrokenOutbox(models.Model):
    """A custom outbox that lacks required columns (for the system check)."""

    event_id = models.CharField(max_length=255)
