"""The outbox admin: browse rows, *Retry publishing*, and the status page."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import replace
from typing import Any

from django.apps import apps
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from .. import health
from ..conf import get_config
from ..core.durations import format_age
from ..core.errors import NatsError
from ..core.redaction import scrub
from ..core.settings import BridgeConfig
from ..exceptions import ConfigurationError
from ..inbox import inbox_model
from ..models import DeadLetter, InboxStatus, OutboxStatus
from ..outbox import OutboxStore
from ..relay import Relay
from ..runtime import get_runtime
from .base import STATUS_URL_NAME, EventAdmin, elapsed, first_error, when
from .status import count_inbox_rows, glance, status_rows

logger = logging.getLogger("jetstream_bridge.admin")


class OutboxEventAdmin(EventAdmin):
    list_display = (
        "event_id",
        "event",
        "subject",
        "status_badge",
        "attempts",
        "short_error",
        "timing",
    )
    list_filter = ("status", "subject", "event_type", "resource_type")
    date_hierarchy = "enqueued_at"

    actions = ("retry_publishing",)
    row_action = "retry_publishing"
    field_groups = (
        (None, ("event_id", "subject", "status", "resource_type", "resource_id", "event_type")),
        (
            "Delivery",
            (
                "attempts",
                "last_error",
                "enqueued_at",
                "available_at",
                "sent_at",
                "stream_seq",
                "locked_by",
                "locked_until",
                "created_at",
                "updated_at",
            ),
        ),
        ("Message", ("payload", "headers")),
    )
    # Publish at once from the admin request instead of waiting for a running relay. This is
    # one relay round (``Relay.drain``): it sends every row that is due, not only the selected
    # ones, and starts no new batch after ``publish_time_limit`` seconds.
    publish_on_retry = True
    publish_time_limit = 10.0
    # Seconds to wait for NATS; None: the health check's own (CONNECT_TIMEOUT plus 1s).
    status_timeout: float | None = None

    @admin.display(description="enqueued / sent", ordering="enqueued_at")
    def timing(self, obj: Any) -> SafeString:
        if obj.sent_at is None:
            return format_html(
                '{}<br><span class="jsb-muted">not sent</span>', when(obj.enqueued_at)
            )
        took = elapsed((obj.sent_at - obj.enqueued_at).total_seconds())
        return format_html(
            '{}<br><span class="jsb-muted">sent after {}</span>', when(obj.enqueued_at), took
        )

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.retry_{self.opts.model_name}")

    @admin.action(description="Retry publishing", permissions=["retry"])
    def retry_publishing(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Make the selected unsent rows due now and publish them."""
        store = self._outbox_store(queryset.db)
        selected = queryset.count()
        requeue = store.requeue(queryset.values_list("pk", flat=True))
        pks, requeued = requeue.pks, requeue.count
        manager = store.manager
        skipped = selected - requeued
        if skipped:
            self.message_user(
                request,
                f"{skipped} event(s) skipped: already sent, or being published by a relay.",
                messages.WARNING,
            )
        if not requeued:
            return
        logger.info(
            "outbox rows queued again from the admin",
            extra={"rows": requeued, "user": request.user.get_username()},
        )
        if not self.publish_on_retry:
            self.message_user(request, f"{requeued} event(s) queued for the relay.")
            return
        unreachable = self._nats_unreachable()
        if unreachable:
            self.message_user(
                request,
                f"{requeued} event(s) queued for the relay; not published now: {unreachable}",
                messages.WARNING,
            )
            return
        error = self._publish_due(queryset.db)
        sent = manager.filter(pk__in=pks, status=OutboxStatus.SENT).count()
        if sent == requeued:
            self.message_user(request, f"{sent} event(s) published.", messages.SUCCESS)
            return
        reason = error or first_error(manager.filter(pk__in=pks).exclude(status="sent"))
        self.message_user(
            request,
            f"{requeued} event(s) queued again, {sent} published now; the relay will retry "
            f"the rest" + (f" ({reason})." if reason else "."),
            messages.WARNING,
        )

    def _nats_unreachable(self) -> str | None:
        """Say why publishing cannot work now, before the relay leases rows it cannot send."""
        try:
            config = get_config()
            get_runtime().call(
                lambda conn: conn.round_trip(),
                timeout=config.connect_timeout + config.request_timeout,
            )
        except ConfigurationError:
            return "JETSTREAM_BRIDGE settings are invalid; run manage.py check."
        except NatsError as exc:
            return f"{type(exc).__name__}: {scrub(str(exc))}"
        except concurrent.futures.TimeoutError:
            return "NATS did not answer in time."
        return None

    def _outbox_store(self, using: str) -> OutboxStore:
        """The store of this admin's model (a custom OUTBOX_MODEL has an admin of its own)."""
        try:
            config = get_config()
        except ConfigurationError:
            # Requeueing reads no settings; publishing after it says they are invalid.
            config = BridgeConfig(nats_urls=(), env="", app_name="", destination_app="")
        return OutboxStore(replace(config, outbox_model=self.model._meta.label), using=using)

    def _publish_due(self, using: str) -> str | None:
        """Drain what is due with the relay's code path; return an error to show, if any."""
        config = replace(get_config(), outbox_model=self.model._meta.label)
        # One worker: the request's own thread and database connection, no thread pool.
        relay = Relay(config=config, using=using, workers=1)
        deadline = threading.Timer(self.publish_time_limit, relay.stop.set)
        deadline.daemon = True
        deadline.start()
        try:
            relay.drain()
        except Exception as exc:
            # A batch in hand rolls back (row locks) or stays leased until the lease ends
            # (SQLite); either way a relay sends it later.
            logger.warning("publishing from the admin failed: %s", exc, exc_info=True)
            return f"{type(exc).__name__}: {scrub(str(exc))}"
        finally:
            deadline.cancel()
            relay.close()
        return None

    # -- status page -------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        status = path("status/", self.admin_site.admin_view(self.status_view), name=STATUS_URL_NAME)
        return [status, *super().get_urls()]

    def status_view(self, request: HttpRequest) -> HttpResponse:
        """Show ``jetstream_bridge.health.check()``: stream, consumer lag, DLQ, backlogs."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": "JetStream bridge status",
            "opts": self.opts,
        }
        template = "admin/jetstream_bridge/status.html"
        try:
            config = get_config()
            report = health.check(timeout=self.status_timeout)
        except ConfigurationError as exc:
            context["config_problems"] = [f"{p.msg} {p.hint}" for p in exc.problems]
            return TemplateResponse(request, template, context)
        except Exception as exc:
            logger.exception("the admin status page could not check the bridge")
            context["failure"] = f"{type(exc).__name__} while checking the bridge; see the log."
            return TemplateResponse(request, template, context)
        inbox = inbox_model(config)
        inbox_counts = count_inbox_rows(inbox)
        outbox = report.outbox
        context.update(
            report=report,
            outbox_rows=status_rows(outbox.counts if outbox else {}, OutboxStatus.values),
            oldest_unsent=format_age(outbox.oldest_unsent_age)
            if outbox and outbox.oldest_unsent_age is not None
            else None,
            inbox_rows=status_rows(inbox_counts or {}, InboxStatus.values),
            inbox_unreadable=inbox_counts is None,
            outbox_changelist=self._changelist_url(apps.get_model(config.outbox_model)),
            inbox_changelist=self._changelist_url(inbox),
            glance=glance(report, inbox_counts or {}),
            dead_letters_url=self._dead_letters_url(request),
        )
        return TemplateResponse(request, template, context)

    def _dead_letters_url(self, request: HttpRequest) -> str | None:
        """The *Dead letters* page, for users who may see it."""
        if not request.user.has_perm(f"{self.opts.app_label}.view_deadletter"):
            return None
        return self._changelist_url(DeadLetter)

    def _changelist_url(self, model: type[models.Model]) -> str | None:
        if not self.admin_site.is_registered(model):
            return None
        opts = model._meta
        return reverse(f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_changelist")
