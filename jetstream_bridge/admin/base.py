"""What the outbox and inbox admins share: read-only browsing, the row action, formatting."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator

from ..core.durations import format_age
from ..models import field_names

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = admin.ModelAdmin

STATUS_URL_NAME = "jetstream_bridge_status"


def status_badge_html(status: str, label: str | None = None) -> SafeString:
    """Return a coloured badge for an outbox or inbox status."""
    return format_html('<span class="jsb-badge jsb-badge--{}">{}</span>', status, label or status)


def when(value: Any) -> str:
    """Return a timestamp as the change lists show it, in the current time zone."""
    return date_format(timezone.localtime(value), "Y-m-d H:i")


def elapsed(seconds: float) -> str:
    """Return a duration for humans: milliseconds under a second, else ``format_age``."""
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
        return json_block(obj.payload)

    @admin.display(description="headers")
    def headers_pretty(self, obj: Any) -> SafeString:
        return json_block(obj.headers)

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


def json_block(value: Any) -> SafeString:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return format_html('<pre class="jsb-json">{}</pre>', text)


def first_error(queryset: QuerySet[Any]) -> str | None:
    if "last_error" not in field_names(queryset.model):
        return None
    error = queryset.exclude(last_error=None).values_list("last_error", flat=True).first()
    return Truncator(error).chars(200) if error else None
