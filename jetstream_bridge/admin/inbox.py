"""The inbox admin: browse rows and *Re-run handler*."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from ..conf import get_config
from ..exceptions import ConfigurationError
from ..handlers import Handler
from ..models import field_names
from ..processing import BatchProcessor, Verdict
from .base import EventAdmin, elapsed, first_error, when

logger = logging.getLogger("jetstream_bridge.admin")


class InboxEventAdmin(EventAdmin):
    list_display = (
        "event_id",
        "consumer",
        "event",
        "subject",
        "status_badge",
        "deliveries",
        "short_error",
        "timing",
    )
    list_filter = ("status", "consumer", "subject", "event_type", "resource_type")
    date_hierarchy = "received_at"

    actions = ("rerun_handler",)
    row_action = "rerun_handler"
    field_groups = (
        (
            None,
            ("event_id", "consumer", "subject", "status", "resource_type", "event_type"),
        ),
        (
            "Delivery",
            (
                "deliveries",
                "last_error",
                "stream",
                "stream_seq",
                "received_at",
                "processed_at",
                "created_at",
                "updated_at",
            ),
        ),
        ("Message", ("payload", "headers")),
    )
    # Run this handler instead of the registry's (for consumers started with ``--handler``).
    handler: Handler | None = None
    # Handlers run inside the request: re-run at most this many rows per click.
    max_rerun = 100

    @admin.display(description="received / processed", ordering="received_at")
    def timing(self, obj: Any) -> SafeString:
        if obj.processed_at is None:
            return format_html(
                '{}<br><span class="jsb-muted">not processed</span>', when(obj.received_at)
            )
        took = elapsed((obj.processed_at - obj.received_at).total_seconds())
        return format_html(
            '{}<br><span class="jsb-muted">processed after {}</span>', when(obj.received_at), took
        )

    def has_rerun_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.rerun_{self.opts.model_name}")

    @admin.action(description="Re-run handler", permissions=["rerun"])
    def rerun_handler(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Run the handler again for the selected rows that are not processed yet."""
        try:
            config = replace(get_config(), inbox_model=self.model._meta.label)
        except ConfigurationError:
            self.message_user(
                request,
                "JETSTREAM_BRIDGE settings are invalid; run manage.py check",
                messages.ERROR,
            )
            return
        has_consumer = "consumer" in field_names(self.model)
        selected = list(
            queryset.order_by("pk").values_list("pk", "consumer" if has_consumer else "pk")[
                : self.max_rerun + 1
            ]
        )
        if len(selected) > self.max_rerun:
            self.message_user(
                request,
                f"Only the first {self.max_rerun} selected events were re-run; select fewer.",
                messages.WARNING,
            )
            selected = selected[: self.max_rerun]
        processed, failed, skipped = [], [], 0
        for pk, durable in selected:
            processor = BatchProcessor(
                durable=str(durable) if has_consumer else "",
                handler=self.handler,
                config=config,
                using=queryset.db,
            )
            try:
                outcome = processor.process_stored(pk)
            except self.model.DoesNotExist:
                skipped += 1
                continue
            # Nothing is settled, but the middleware's observers hear how it ended (tracing).
            processor.chain.settled(outcome.message, outcome.settled_as, config)
            if outcome.verdict is Verdict.ACK and outcome.duplicate:
                skipped += 1
            elif outcome.verdict is Verdict.ACK:
                processed.append(pk)
            else:
                failed.append(pk)
        logger.info(
            "inbox handlers re-run from the admin",
            extra={
                "processed": len(processed),
                "failed": len(failed),
                "user": request.user.get_username(),
            },
        )
        if processed:
            self.message_user(request, f"{len(processed)} event(s) processed.", messages.SUCCESS)
        if skipped:
            self.message_user(
                request, f"{skipped} event(s) skipped: already processed.", messages.WARNING
            )
        if failed:
            reason = first_error(
                self.model._default_manager.db_manager(queryset.db).filter(pk__in=failed)
            )
            self.message_user(
                request,
                f"{len(failed)} event(s) failed again" + (f": {reason}" if reason else "."),
                messages.ERROR,
            )
