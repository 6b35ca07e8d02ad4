"""Django admin for the outbox and inbox tables, and a status page.

Rows are read-only here: an event that was written or received is history. Two actions change
state, each behind its own permission (superusers have both):

* **Retry publishing** (``jetstream_bridge.retry_outboxevent``) puts unsent rows back in the
  queue, due now, and publishes them at once through the relay's code path;
* **Re-run handler** (``jetstream_bridge.rerun_inboxevent``) runs the handler again for rows not
  yet processed, in one transaction with the row's new status, as the consumer does.

The status page (``<admin>/jetstream_bridge/outboxevent/status/``, linked from both change
lists) shows the stream, consumer lag, DLQ depth and the table backlogs; it needs staff access
and permission to view outbox events.

Only the built-in models are registered. For custom ``OUTBOX_MODEL``/``INBOX_MODEL`` models,
subclass the admins, list the columns your model has, and add the permissions to its ``Meta``::

    class MyOutbox(models.Model):
        ...
        class Meta:
            permissions = [("retry_myoutbox", "Can retry publishing outbox events")]

    @admin.register(MyOutbox)
    class MyOutboxAdmin(OutboxEventAdmin):
        list_display = ("event_id", "subject", "status_badge")
        list_filter = ("status",)
        date_hierarchy = None
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError, models
from django.db.models import Q, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator

from . import health
from .conf import get_config
from .consumer import Consumer, Verdict
from .core.durations import format_age
from .core.errors import NatsError
from .core.redaction import scrub
from .exceptions import ConfigurationError
from .handlers import Handler
from .inbox import inbox_model
from .models import (
    UNSENT,
    InboxEvent,
    InboxStatus,
    OutboxEvent,
    OutboxStatus,
    field_names,
    only_fields,
)
from .relay import Relay
from .runtime import get_runtime

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = admin.ModelAdmin

logger = logging.getLogger(__name__)

STATUS_URL_NAME = "jetstream_bridge_status"


def status_badge_html(status: str, label: str | None = None) -> SafeString:
    """Return a coloured badge for an outbox or inbox status."""
    return format_html('<span class="jsb-badge jsb-badge--{}">{}</span>', status, label or status)


def _when(value: Any) -> str:
    return date_format(timezone.localtime(value), "Y-m-d H:i")


def _took(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else format_age(seconds)


class EventAdmin(_ModelAdmin):
    """Read-only browsing shared by the outbox and inbox admins."""

    # (title, field names) for the detail page; names the model lacks are left out.
    field_groups: Sequence[tuple[str | None, Sequence[str]]] = ()
    json_fields = ("payload", "headers")
    # The action the detail page offers as a button.
    row_action = ""
    ordering = ("-pk",)
    list_per_page = 50
    # Outbox and inbox tables grow large: skip the unfiltered COUNT(*) on every page.
    show_full_result_count = False
    search_fields = ("event_id",)
    search_help_text = "Exact event id."
    change_list_template = "admin/jetstream_bridge/change_list.html"
    change_form_template = "admin/jetstream_bridge/change_form.html"

    class Media:
        css = {"all": ("jetstream_bridge/admin.css",)}

    # -- read-only -----------------------------------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def _pretty_field(self, name: str) -> str:
        return f"{name}_pretty" if name in self.json_fields else name

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        names = field_names(self.model)
        placed: set[str] = set()
        fieldsets = []
        for title, group in self.field_groups:
            present = [n for n in group if n in names]
            placed.update(present)
            if present:
                fieldsets.append((title, {"fields": [self._pretty_field(n) for n in present]}))
        rest = [
            self._pretty_field(f.name)
            for f in self.model._meta.concrete_fields
            if f.name not in placed and not f.primary_key
        ]
        if rest:
            fieldsets.append(("Other", {"fields": rest}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [
            name for _, options in self.get_fieldsets(request, obj) for name in options["fields"]
        ]

    @admin.display(description="payload")
    def payload_pretty(self, obj: Any) -> SafeString:
        return _json_block(obj.payload)

    @admin.display(description="headers")
    def headers_pretty(self, obj: Any) -> SafeString:
        return _json_block(obj.headers)

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Any) -> SafeString:
        return status_badge_html(obj.status, obj.get_status_display())

    @admin.display(description="last error")
    def short_error(self, obj: Any) -> SafeString | None:
        if not obj.last_error:
            return None
        return format_html('<span class="jsb-error">{}</span>', Truncator(obj.last_error).chars(60))

    @admin.display(description="event", ordering="resource_type")
    def event(self, obj: Any) -> str:
        """``resource_type/event_type``, as handlers are registered."""
        return f"{obj.resource_type}/{obj.event_type}"

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        # An exact, case-sensitive match uses the event_id index; the default icontains scan
        # would read the whole table.
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(event_id=term), False

    # -- the detail page's action button and the status link ---------------------------------

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        own = []
        if self.row_action:
            own.append(
                path(
                    f"<path:object_id>/{self.row_action}/",
                    self.admin_site.admin_view(self.row_action_view),
                    name="{}_{}_row_action".format(*info),
                )
            )
        return [*own, *super().get_urls()]

    def _row_action(self) -> Callable[..., Any] | None:
        return getattr(self, self.row_action, None) if self.row_action else None

    def _may_run(self, request: HttpRequest, action: Callable[..., Any]) -> bool:
        needed = getattr(action, "allowed_permissions", ())
        return all(getattr(self, f"has_{p}_permission")(request) for p in needed)

    def row_action_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Run the row action for one row (the detail page's button) and come back."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        action = self._row_action()
        if action is None or not self._may_run(request, action):
            raise PermissionDenied
        obj = self.get_object(request, unquote(object_id))
        if obj is None or not self.has_view_permission(request, obj):
            raise Http404(f"{self.opts.verbose_name} {object_id!r} does not exist")
        action(request, self.get_queryset(request).filter(pk=obj.pk))
        return HttpResponseRedirect(
            reverse(
                f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_change",
                args=[quote(obj.pk)],
            )
        )

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = dict(extra_context or {})
        action = self._row_action()
        if action is not None and self._may_run(request, action):
            info = self.opts.app_label, self.opts.model_name
            context["jsb_row_action"] = {
                "url": reverse(
                    "{}:{}_{}_row_action".format(self.admin_site.name, *info), args=[object_id]
                ),
                "label": getattr(action, "short_description", self.row_action),
            }
        return super().change_view(request, object_id, form_url, context)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = dict(extra_context or {})
        with contextlib.suppress(NoReverseMatch):  # the outbox admin is not on this site
            context["jsb_status_url"] = reverse(f"{self.admin_site.name}:{STATUS_URL_NAME}")
        return super().changelist_view(request, context)


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
                '{}<br><span class="jsb-muted">not sent</span>', _when(obj.enqueued_at)
            )
        took = _took((obj.sent_at - obj.enqueued_at).total_seconds())
        return format_html(
            '{}<br><span class="jsb-muted">sent after {}</span>', _when(obj.enqueued_at), took
        )

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.retry_{self.opts.model_name}")

    @admin.action(description="Retry publishing", permissions=["retry"])
    def retry_publishing(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Make the selected unsent rows due now and publish them."""
        now = timezone.now()
        names = field_names(self.model)
        retryable = Q(status__in=UNSENT)
        if "locked_until" in names:
            # A relay that died leaves rows "publishing" with a lapsed lease; a live lease
            # means a relay is sending the row right now.
            lapsed = Q(locked_until__lt=now) | Q(locked_until__isnull=True)
            retryable |= Q(status=OutboxStatus.PUBLISHING) & lapsed
        selected = queryset.count()
        pks = list(queryset.filter(retryable).values_list("pk", flat=True))
        values = only_fields(
            self.model,
            {
                "status": OutboxStatus.PENDING,
                "available_at": now,
                "locked_by": None,
                "locked_until": None,
            },
        )
        manager = self.model._default_manager.db_manager(queryset.db)
        # Filtered again: a relay may have claimed a row since it was read.
        requeued = manager.filter(pk__in=pks).filter(retryable).update(**values)
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
        reason = error or _first_error(manager.filter(pk__in=pks).exclude(status="sent"))
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
        inbox_counts = _inbox_counts(inbox)
        outbox = report.outbox
        context.update(
            report=report,
            outbox_rows=_status_rows(outbox.counts if outbox else {}, OutboxStatus.values),
            oldest_unsent=format_age(outbox.oldest_unsent_age)
            if outbox and outbox.oldest_unsent_age is not None
            else None,
            inbox_rows=_status_rows(inbox_counts or {}, InboxStatus.values),
            inbox_unreadable=inbox_counts is None,
            outbox_changelist=self._changelist_url(apps.get_model(config.outbox_model)),
            inbox_changelist=self._changelist_url(inbox),
            glance=_glance(report, inbox_counts or {}),
        )
        return TemplateResponse(request, template, context)

    def _changelist_url(self, model: type[models.Model]) -> str | None:
        if not self.admin_site.is_registered(model):
            return None
        opts = model._meta
        return reverse(f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_changelist")


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
                '{}<br><span class="jsb-muted">not processed</span>', _when(obj.received_at)
            )
        took = _took((obj.processed_at - obj.received_at).total_seconds())
        return format_html(
            '{}<br><span class="jsb-muted">processed after {}</span>', _when(obj.received_at), took
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
            consumer = Consumer(
                durable_name=str(durable) if has_consumer else "",
                handler=self.handler,
                config=config,
                using=queryset.db,
            )
            try:
                outcome = consumer.process_stored(pk)
            except self.model.DoesNotExist:
                skipped += 1
                continue
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
            reason = _first_error(
                self.model._default_manager.db_manager(queryset.db).filter(pk__in=failed)
            )
            self.message_user(
                request,
                f"{len(failed)} event(s) failed again" + (f": {reason}" if reason else "."),
                messages.ERROR,
            )


def _json_block(value: Any) -> SafeString:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return format_html('<pre class="jsb-json">{}</pre>', text)


def _first_error(queryset: QuerySet[Any]) -> str | None:
    if "last_error" not in field_names(queryset.model):
        return None
    error = queryset.exclude(last_error=None).values_list("last_error", flat=True).first()
    return Truncator(error).chars(200) if error else None


def _inbox_counts(model: type[models.Model]) -> dict[str, int] | None:
    try:
        rows = model._default_manager.values_list("status").annotate(n=models.Count("pk"))
        return {str(status): int(n) for status, n in rows.order_by()}
    except DatabaseError:
        logger.exception("the admin status page could not count inbox rows")
        return None


def _status_rows(counts: dict[str, int], order: Sequence[str]) -> list[tuple[str, int]]:
    """Every known status in lifecycle order (zeros included), then any others."""
    extra = sorted(s for s in counts if s not in order)
    return [(status, counts.get(status, 0)) for status in [*order, *extra]]


def _glance(report: health.HealthReport, inbox: dict[str, int]) -> list[dict[str, Any]]:
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


admin.site.register(OutboxEvent, OutboxEventAdmin)
admin.site.register(InboxEvent, InboxEventAdmin)
