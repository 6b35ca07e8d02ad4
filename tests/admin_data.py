"""Rows, users and handlers shared by the admin tests (Django client and browser)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import Permission, User
from django.utils import timezone

from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core.envelope import MSG_ID_HEADER, build_envelope, encode
from jetstream_bridge.core.settings import BridgeConfig
from jetstream_bridge.handlers import registry
from jetstream_bridge.models import InboxEvent, OutboxEvent
from tests.testapp import handlers

PASSWORD = "correct horse battery staple"


def outbox_row(
    config: BridgeConfig,
    *,
    status: str = "failed",
    resource_type: str = "order",
    event_type: str = "created",
    number: int = 1,
    attempts: int = 3,
    last_error: str | None = "NatsUnavailable: could not connect to NATS",
    age: timedelta = timedelta(minutes=5),
) -> OutboxEvent:
    """An outbox row as the publisher writes it; failed rows wait an hour for their retry."""
    envelope = build_envelope(
        producer=config.app_name,
        resource_type=resource_type,
        event_type=event_type,
        payload={"id": number, "total": "19.90", "currency": "EUR"},
    )
    now = timezone.now()
    return OutboxEvent.objects.create(
        event_id=envelope["event_id"],
        subject=config.subjects.publish,
        payload=envelope,
        headers={MSG_ID_HEADER: envelope["event_id"]},
        resource_type=resource_type,
        resource_id=str(number),
        event_type=event_type,
        status=status,
        attempts={"pending": 0, "sent": 1}.get(status, attempts),
        last_error=last_error if status == "failed" else None,
        enqueued_at=now - age,
        available_at=now + timedelta(hours=1) if status == "failed" else now - age,
        sent_at=now - age + timedelta(milliseconds=40) if status == "sent" else None,
        stream_seq=number if status == "sent" else None,
    )


def inbox_row(
    config: BridgeConfig,
    *,
    consumer: str = "alpha-events",
    status: str = "failed",
    resource_type: str = "invoice",
    event_type: str = "created",
    payload: dict[str, Any] | None = None,
    deliveries: int = 5,
    seq: int = 1,
    last_error: str | None = "ValueError: customer 42 does not exist",
) -> InboxEvent:
    """An inbox row as the consumer records it after the handler failed ``deliveries`` times."""
    envelope = build_envelope(
        producer=config.destination_app,
        resource_type=resource_type,
        event_type=event_type,
        payload={"id": seq, **(payload or {})},
    )
    return InboxEvent.objects.create(
        consumer=consumer,
        event_id=envelope["event_id"],
        subject=config.subjects.subscribe,
        payload=envelope,
        headers={MSG_ID_HEADER: envelope["event_id"]},
        event_type=event_type,
        resource_type=resource_type,
        stream=config.stream_name,
        stream_seq=seq,
        deliveries=deliveries,
        status=status,
        last_error=last_error if status == "failed" else None,
        processed_at=timezone.now() if status == "processed" else None,
    )


def dead_letter(
    config: BridgeConfig,
    *,
    reason: str = letters.REJECTED,
    consumer: str = "alpha-events",
    subject: str | None = None,
    error: tuple[str, str] = ("RejectMessage", "customer 42 does not exist"),
    payload: dict[str, Any] | None = None,
    body: bytes | None = None,
    key: bytes | None = None,
) -> tuple[int, str]:
    """Publish a dead letter as the consumer writes it; return its DLQ sequence and event id.

    The body is an envelope from the peer app (or ``body``), dead-lettered from this app's
    inbound subject (or ``subject``) by ``consumer``; signed when ``key`` is given.
    """
    from tests.helpers import nats

    envelope = build_envelope(
        producer=config.destination_app,
        resource_type="invoice",
        event_type="created",
        payload=payload or {"id": 42, "total": "19.90", "currency": "EUR"},
    )
    data = encode(envelope) if body is None else body
    letter = letters.DeadLetter(
        reason=reason,
        error_class=error[0],
        error_message=error[1],
        original_subject=subject or config.subjects.subscribe,
        stream=config.stream_name,
        stream_seq=7,
        deliveries=1 if reason != letters.MAX_DELIVER else config.max_deliver,
        consumer=consumer,
        event_id=envelope["event_id"],
    )
    headers = letter.headers(data, key=key)
    ack = nats(lambda c: c.publish(config.subjects.dlq, data, headers))
    return ack.seq, envelope["event_id"]


def staff_user(username: str = "viewer", *, perms: tuple[str, ...] = ()) -> User:
    """A staff user who may view outbox and inbox rows, plus ``perms`` (codenames)."""
    user = User.objects.create_user(username, password=PASSWORD, is_staff=True)
    codenames = ("view_outboxevent", "view_inboxevent", *perms)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="jetstream_bridge", codename__in=codenames
        )
    )
    return user


def superuser(username: str = "admin") -> User:
    return User.objects.create_superuser(username, "admin@example.com", PASSWORD)


@contextmanager
def invoice_handlers() -> Iterator[None]:
    """Register handlers for ``invoice`` events in the global registry, as an app would.

    ``invoice/*`` writes an Effect row, or raises ``ValueError`` when the payload says
    ``poison``; ``invoice/flaky`` writes, then fails while ``deliveries`` is at most
    ``payload["fail_times"]``. The registry is restored afterwards.
    """
    saved = dict(registry._handlers)
    registry.register("invoice", "*", handlers.always_fails)
    registry.register("invoice", "flaky", handlers.flaky)
    try:
        yield
    finally:
        registry._handlers.clear()
        registry._handlers.update(saved)
