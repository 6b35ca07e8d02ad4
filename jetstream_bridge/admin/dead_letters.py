"""The *Dead letters* admin: list, filter, inspect, replay and purge the letters on the DLQ.

The letters live in a NATS stream, not a table (``DeadLetter`` is a model without one, for the
index entry and the permissions), so the views are the admin's own: a page reads at most
``scan_limit`` letters after a cursor (``dlq_pages``), never the whole DLQ. Replaying needs
``jetstream_bridge.replay_deadletter`` and purging ``jetstream_bridge.purge_deadletter``;
viewing needs ``view_deadletter``. Each action is recorded as an admin log entry (*Recent
actions*, the object history) and a structured log record naming the user.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.http import url_has_allowed_host_and_scheme

from .. import dlq, dlq_pages
from ..core import dead_letter as core_dlq
from ..models import DeadLetter
from .dead_letter_display import FilterForm, call_nats, detail, parse_seqs, rows

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = admin.ModelAdmin

logger = logging.getLogger("jetstream_bridge.admin")

TEMPLATES = "admin/jetstream_bridge/"


def _query(encoded: str) -> str:
    return f"?{encoded}" if encoded else ""


class DeadLetterAdmin(_ModelAdmin):
    """Triage of the dead letters on ``DLQ_SUBJECT``: the admin's views over ``dlq``."""

    list_per_page = 50
    # Letters read per page at most, matching the filters or not.
    scan_limit = 1000
    # Letters one replay or purge of a selection may name.
    max_selected = 100

    class Media:
        css = {"all": ("jetstream_bridge/admin.css",)}

    # -- permissions ---------------------------------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.replay_{self.opts.model_name}")

    def has_purge_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.purge_{self.opts.model_name}")

    # -- urls ----------------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        # The usual names, so the index and the log entries' links find these pages.
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        view = self.admin_site.admin_view
        return [
            path("", view(self.list_view), name=f"{name}_changelist"),
            path("<int:seq>/", view(self.detail_view), name=f"{name}_change"),
            path("replay/", view(self.replay_view), name=f"{name}_replay"),
            path("purge/", view(self.purge_view), name=f"{name}_purge"),
        ]

    def _url(self, view: str, *args: Any) -> str:
        info = self.admin_site.name, self.opts.app_label, self.opts.model_name
        return reverse("{}:{}_{}_".format(*info) + view, args=args)

    def _context(self, request: HttpRequest, title: str) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.opts,
            "list_url": self._url("changelist"),
            "replay_url": self._url("replay"),
            "purge_url": self._url("purge"),
            "may_replay": self.has_replay_permission(request),
            "may_purge": self.has_purge_permission(request),
            "scan_limit": self.scan_limit,
        }

    def _check(self, request: HttpRequest, permission: str) -> None:
        if not getattr(self, f"has_{permission}_permission")(request):
            raise PermissionDenied

    # -- pages ---------------------------------------------------------------------------------

    def list_view(self, request: HttpRequest) -> HttpResponse:
        """One page of dead letters, oldest first, with the filters applied."""
        self._check(request, "view")
        context = self._context(request, "Dead letters")
        form = FilterForm(request.GET)
        context["form"] = form
        if form.is_valid():
            after = form.cleaned_data["after"] or 0
            page, error = call_nats(
                lambda: dlq_pages.page(
                    form.selection(),
                    after=after,
                    limit=self.list_per_page,
                    scan_limit=self.scan_limit,
                )
            )
            context["error"] = error
            if page is not None:
                context.update(
                    depth=page.depth,
                    rows=rows(page.messages),
                    here=self._url("changelist") + _query(form.query(after=after or None)),
                    next_url=_query(form.query(after=page.next_after)) if page.next_after else None,
                    first_url=_query(form.query()) or "?" if after else None,
                    filtered=not form.selection().everything,
                )
        return TemplateResponse(request, TEMPLATES + "dead_letters.html", context)

    def detail_view(self, request: HttpRequest, seq: int) -> HttpResponse:
        """One dead letter: what its headers claim, every header, and the body."""
        self._check(request, "view")
        context = self._context(request, f"Dead letter {seq}")
        if seq > core_dlq.MAX_COUNT:  # no stream holds it; the server would only complain
            message, error = None, None
        else:
            message, error = call_nats(lambda: dlq.get_dead_letter(seq))
        context.update(error=error, seq=seq, back=self._safe_next(request, "next"))
        status = 200
        if message is not None:
            context["letter"] = detail(message)
        elif error is None:
            status = 404
        return TemplateResponse(request, TEMPLATES + "dead_letter.html", context, status=status)

    # -- actions -------------------------------------------------------------------------------

    def replay_view(self, request: HttpRequest) -> HttpResponse:
        """Republish the selected letters to their original subjects (``dlq.replay``), each
        for the durable that dead-lettered it only; broadcasting is the command's business."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        self._check(request, "replay")
        back = self._safe_next(request, "next") or self._url("changelist")
        seqs = self._selected(request)
        if not seqs:
            return HttpResponseRedirect(back)
        result, error = call_nats(lambda: dlq.replay(dlq.Selection(seqs=seqs)))
        if result is None:
            self.message_user(request, f"Nothing replayed: {error}", messages.ERROR)
            return HttpResponseRedirect(back)
        self._audit_replay(request, seqs, result)
        if result.replayed:
            done = ", ".join(f"{seq} as stream sequence {new}" for seq, new in result.replayed)
            self.message_user(
                request,
                f"Replayed {len(result.replayed)} dead letter(s): {done}.",
                messages.SUCCESS,
            )
        for seq, why in result.failed:
            self.message_user(request, f"Dead letter {seq} not replayed: {why}", messages.ERROR)
        missing = len(seqs) - len(result.replayed) - len(result.failed)
        if missing:
            self.message_user(
                request, f"{missing} dead letter(s) were gone already.", messages.WARNING
            )
        return HttpResponseRedirect(back)

    def purge_view(self, request: HttpRequest) -> HttpResponse:
        """Ask, then delete the selected letters or every letter matching the filters."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        self._check(request, "purge")
        back = self._safe_next(request, "next") or self._url("changelist")
        form = FilterForm(request.POST)
        if "matching" in request.POST:
            if not form.is_valid():
                self.message_user(request, "The filters are not valid.", messages.ERROR)
                return HttpResponseRedirect(back)
            selection, seqs = form.selection(), frozenset[int]()
        else:
            seqs = self._selected(request)
            if not seqs:
                return HttpResponseRedirect(back)
            selection = dlq.Selection(seqs=seqs)
        if request.POST.get("confirm") == "yes":
            return self._purge(request, selection, back, form if not seqs else None)
        counted, error = call_nats(lambda: dlq.count(selection))
        if counted is None:
            self.message_user(request, f"Nothing purged: {error}", messages.ERROR)
            return HttpResponseRedirect(back)
        matching, last_seq = counted
        if not matching:
            self.message_user(request, "No dead letters match; nothing purged.", messages.WARNING)
            return HttpResponseRedirect(back)
        context = self._context(request, "Purge dead letters")
        context.update(
            matching=matching,
            upto_seq=last_seq,
            seqs=sorted(seqs),
            form=form if not seqs else None,
            described=form.describe() if not seqs and form.is_valid() else "",
            back=back,
        )
        return TemplateResponse(request, TEMPLATES + "dead_letters_purge.html", context)

    def _purge(
        self,
        request: HttpRequest,
        selection: dlq.Selection,
        back: str,
        form: FilterForm | None,
    ) -> HttpResponse:
        try:
            upto_seq = int(request.POST.get("upto_seq", ""))
        except ValueError:
            self.message_user(request, "The confirmation is incomplete.", messages.ERROR)
            return HttpResponseRedirect(back)
        purged, error = call_nats(lambda: dlq.purge(selection, upto_seq=upto_seq))
        if purged is None:
            self.message_user(request, f"Nothing purged: {error}", messages.ERROR)
            return HttpResponseRedirect(back)
        described = form.describe() if form is not None else ""
        self._audit_purge(request, selection, upto_seq, purged, described)
        self.message_user(request, f"Purged {purged} dead letter(s).", messages.SUCCESS)
        return HttpResponseRedirect(back)

    def _selected(self, request: HttpRequest) -> frozenset[int]:
        try:
            return parse_seqs(request.POST.getlist("seq"), self.max_selected)
        except ValueError as exc:
            self.message_user(request, f"Nothing done: {exc}.", messages.ERROR)
            return frozenset()

    def _safe_next(self, request: HttpRequest, name: str) -> str | None:
        target = request.POST.get(name) or request.GET.get(name) or ""
        if target and url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            return target
        return None

    # -- audit ---------------------------------------------------------------------------------

    def _audit_replay(self, request: HttpRequest, seqs: frozenset[int], result: Any) -> None:
        user = request.user.get_username()
        logger.info(
            "dead letters replayed from the admin",
            extra={
                "user": user,
                "action": "replay",
                "seqs": sorted(seqs),
                "replayed": [seq for seq, _ in result.replayed],
                "failed": [seq for seq, _ in result.failed],
            },
        )
        self._log_entries(
            request,
            [
                (str(seq), f"dead letter {seq}", f"Replayed as stream sequence {new}.")
                for seq, new in result.replayed
            ],
            CHANGE,
        )

    def _audit_purge(
        self,
        request: HttpRequest,
        selection: dlq.Selection,
        upto_seq: int,
        purged: int,
        described: str,
    ) -> None:
        seqs = sorted(selection.seqs)
        logger.warning(
            "dead letters purged from the admin",
            extra={
                "user": request.user.get_username(),
                "action": "purge",
                "seqs": seqs,
                "filter": described or None,
                "upto_seq": upto_seq,
                "purged": purged,
            },
        )
        entries: list[tuple[str | None, str, str]]
        if seqs:
            entries = [(str(seq), f"dead letter {seq}", "Purged from the DLQ.") for seq in seqs]
        else:
            message = (
                f"Purged {purged} dead letter(s) matching {described}, "
                f"up to stream sequence {upto_seq}."
            )
            entries = [(None, f"{purged} dead letter(s) matching {described}", message)]
        self._log_entries(request, entries, DELETION)

    def _log_entries(
        self, request: HttpRequest, entries: Sequence[tuple[str | None, str, str]], flag: int
    ) -> None:
        """Add admin log entries: (object id, what, change message) each, for this user."""
        content_type = ContentType.objects.get_for_model(DeadLetter)
        LogEntry.objects.bulk_create(
            LogEntry(
                user_id=cast(int, request.user.pk),  # admin views: always a logged-in user
                content_type=content_type,
                object_id=object_id,
                object_repr=what[:200],
                action_flag=flag,
                change_message=message,
            )
            for object_id, what, message in entries
        )
