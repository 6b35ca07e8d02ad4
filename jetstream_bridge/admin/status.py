"""The status page's figures: table counts and the tiles at the top (``health.check()``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.db import DatabaseError, models

from .. import health
from ..core.durations import format_age
from ..models import InboxStatus, OutboxStatus

logger = logging.getLogger("jetstream_bridge.admin")


def count_inbox_rows(model: type[models.Model]) -> dict[str, int] | None:
    try:
        rows = model._default_manager.values_list("status").annotate(n=models.Count("pk"))
        return {str(status): int(n) for status, n in rows.order_by()}
    except DatabaseError:
        logger.exception("the admin status page could not count inbox rows")
        return None


def status_rows(counts: dict[str, int], order: Sequence[str]) -> list[tuple[str, int]]:
    """Every known status in lifecycle order (zeros included), then any others."""
    extra = sorted(s for s in counts if s not in order)
    return [(status, counts.get(status, 0)) for status in [*order, *extra]]


def glance(report: health.HealthReport, inbox: dict[str, int]) -> list[dict[str, Any]]:
    """The tiles at the top of the status page: label, value and tone (good, bad or plain)."""
    tiles: list[dict[str, Any]] = [
        {
            "label": "bridge",
            "value": report.status,
            "tone": "good" if report.healthy else "bad",
        }
    ]
    if report.connected:
        stream = report.stream
        lag = sum(c.lag for c in report.consumers)
        dlq = report.dlq.messages if report.dlq else None
        tiles += [
            {
                "label": "stream messages",
                "value": stream.messages if stream and stream.exists else "—",
                "tone": "",
            },
            {"label": "consumer lag", "value": lag, "tone": ""},
            {
                "label": "DLQ depth",
                "value": "—" if dlq is None else dlq,
                "tone": "bad" if dlq else "good",
            },
        ]
    if report.outbox is not None:
        failed = report.outbox.counts.get(OutboxStatus.FAILED, 0)
        age = report.outbox.oldest_unsent_age
        tiles += [
            {
                "label": "outbox unsent",
                "value": report.outbox.unsent,
                "tone": "bad" if failed else "",
            },
            {
                "label": "oldest unsent",
                "value": "—" if age is None else format_age(age),
                "tone": "",
            },
        ]
    failed_in = inbox.get(InboxStatus.FAILED, 0)
    tiles.append(
        {"label": "inbox failed", "value": failed_in, "tone": "bad" if failed_in else "good"}
    )
    return tiles
