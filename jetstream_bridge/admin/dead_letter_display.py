"""What the *Dead letters* pages show: the filter form, one row per letter, one letter whole.

Every text here comes from a message anyone allowed to publish on the DLQ subject could have
written. Django's templates escape HTML; ``printable`` also shows control, bidi and other
invisible characters as escapes (``\\u202e``), as ``jetstream_dlq`` does in a terminal, so a
header cannot disguise itself on the page either.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from django import forms
from django.http import QueryDict
from django.utils.text import Truncator

from .. import dlq
from ..core import dead_letter as core_dlq
from ..core.durations import format_age, parse_duration
from ..core.errors import AuthenticationFailed, NatsError, NatsUnavailable
from ..core.redaction import scrub
from ..exceptions import ConfigurationError
from ..management.render import printable

logger = logging.getLogger("jetstream_bridge.admin")

T = TypeVar("T")

KNOWN_REASONS = (
    core_dlq.MAX_DELIVER,
    core_dlq.MALFORMED,
    core_dlq.REJECTED,
    core_dlq.NO_HANDLER,
    core_dlq.INVALID,
)

# verification -> (badge tone, label, explanation)
VERIFICATION = {
    core_dlq.VERIFIED: ("ok", "signed", "signed with DLQ_SIGNING_KEY by a bridge holding it"),
    core_dlq.UNVERIFIED: (
        "failed",
        "unverified",
        "no valid Jsb-Signature for DLQ_SIGNING_KEY: this bridge did not write it (or wrote it "
        "with another key); replay skips it",
    ),
    core_dlq.UNVERIFIABLE: (
        "plain",
        "no key",
        "DLQ_SIGNING_KEY is not set, so nobody can tell who wrote this letter",
    ),
}


# Whose headers a letter carries (``ClaimedLetter.format``) -> how the pages say it.
WRITTEN_BY = {
    core_dlq.BRIDGE_FORMAT: "jetstream-bridge (Jsb- headers)",
    core_dlq.GEM_FORMAT: "the Ruby gem (x-dlq-* headers)",
    "": "unknown: neither dead-letter header set",
}


class DurationField(forms.CharField):
    """A duration as in the settings (``90s``, ``15m``, ``1h``, ``7d``), cleaned to seconds."""

    def clean(self, value: Any) -> float | None:
        text = super().clean(value)
        if not text:
            return None
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc


class FilterForm(forms.Form):
    """The list's filters (GET), also sent along with *Purge all matching* (POST)."""

    reason = forms.CharField(required=False, max_length=200)
    consumer = forms.CharField(required=False, max_length=255)
    newer_than = DurationField(required=False, max_length=32, label="Newer than")
    older_than = DurationField(required=False, max_length=32, label="Older than")
    after = forms.IntegerField(required=False, min_value=0, widget=forms.HiddenInput)

    def selection(self) -> dlq.Selection:
        data = self.cleaned_data
        return dlq.Selection(
            reason=data["reason"] or None,
            consumer=data["consumer"] or None,
            since=data["newer_than"],
            older_than=data["older_than"],
        )

    def describe(self) -> str:
        """Say which filters are set, for the confirmation page and the audit trail."""
        parts = [
            f"{name}={printable(str(self.data.get(name)))}"
            for name in ("reason", "consumer", "newer_than", "older_than")
            if self.cleaned_data.get(name) not in (None, "")
        ]
        return ", ".join(parts) or "no filter"

    def query(self, **changes: Any) -> str:
        """Return the filters as a query string, with ``changes`` applied."""
        values = {
            name: self.data.get(name, "")
            for name in ("reason", "consumer", "newer_than", "older_than")
        }
        values.update(changes)
        query = QueryDict(mutable=True)
        for name, value in values.items():
            if value not in (None, ""):
                query[name] = str(value)
        return query.urlencode()


def parse_seqs(values: list[str], limit: int) -> frozenset[int]:
    """Return the selected stream sequences; raise ``ValueError`` saying what is wrong."""
    seqs: set[int] = set()
    for value in values:
        text = value.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 20:
            raise ValueError(f"{printable(text[:40])!r} is not a stream sequence")
        seqs.add(int(text))
    if len(seqs) > limit:
        raise ValueError(f"select at most {limit} dead letters at a time")
    return frozenset(seqs)


def verification_badge(message: dlq.DeadLetterMessage) -> dict[str, str]:
    tone, label, why = VERIFICATION.get(
        message.verification, ("plain", message.verification, "unknown verification state")
    )
    return {"tone": tone, "label": label, "why": why}


def _when(value: datetime | None, now: datetime) -> tuple[str, str]:
    if value is None:
        return "?", ""
    age = max(0.0, (now - value).total_seconds())
    return value.isoformat(timespec="seconds").replace("+00:00", "Z"), format_age(age)


@dataclass(frozen=True)
class Row:
    """One line of the list, every text made safe to show."""

    seq: int
    stored_at: str
    age: str
    reason: str
    consumer: str
    original_subject: str
    event_id: str
    error: str
    verification: dict[str, str]
    invalid: bool
    gem: bool

    @classmethod
    def of(cls, message: dlq.DeadLetterMessage, now: datetime) -> Row:
        letter = message.letter
        stored_at, age = _when(message.stored_at, now)
        error = f"{letter.error_class}: {letter.error_message}".strip(": ")
        return cls(
            seq=message.seq,
            stored_at=stored_at,
            age=age,
            reason=printable(letter.reason),
            consumer=printable(letter.consumer),
            original_subject=printable(letter.original_subject),
            event_id=printable(letter.event_id or ""),
            error=Truncator(printable(error)).chars(80),
            verification=verification_badge(message),
            invalid=bool(letter.invalid),
            gem=letter.format == core_dlq.GEM_FORMAT,
        )


def rows(messages: list[dlq.DeadLetterMessage]) -> list[Row]:
    now = datetime.now(timezone.utc)
    return [Row.of(message, now) for message in messages]


def _body_kind(message: dlq.DeadLetterMessage) -> str:
    if message.body() is not None:
        return "JSON, indented"
    try:
        message.data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8: shown as escaped bytes"
    return "text"


def detail(message: dlq.DeadLetterMessage) -> dict[str, Any]:
    """Return the detail page's context for one letter."""
    letter = message.letter
    now = datetime.now(timezone.utc)
    stored_at, age = _when(message.stored_at, now)
    failed_at = letter.failed_at.isoformat() if letter.failed_at else ""
    fields = [
        ("Written by", WRITTEN_BY.get(letter.format, letter.format)),
        ("Reason", letter.reason),
        ("Error", f"{letter.error_class}: {letter.error_message}".strip(": ")),
        ("Original subject", letter.original_subject),
        ("Original stream / sequence", f"{letter.stream} / {letter.stream_seq or '?'}"),
        ("Deliveries", "" if letter.deliveries is None else str(letter.deliveries)),
        ("Consumer", letter.consumer),
        ("Event id", letter.event_id or ""),
        ("Failed at", failed_at),
    ]
    headers = sorted(
        (printable(name), printable(value), name in letter.invalid)
        for name, value in message.headers.items()
    )
    return {
        "seq": message.seq,
        "stream": message.stream,
        "subject": printable(message.subject),
        "stored_at": stored_at,
        "age": age,
        "verification": verification_badge(message),
        "fields": [(label, printable(value)) for label, value in fields],
        "invalid": sorted((printable(k), printable(v)) for k, v in letter.invalid.items()),
        "headers": headers,
        "body": printable(message.body_text(), newlines=True),
        "body_kind": _body_kind(message),
        "size": len(message.data),
    }


def call_nats(job: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run ``job`` (a ``dlq`` call); return its result, or a message to show instead.

    The message never holds credentials: error texts are scrubbed of URL user info.
    """
    try:
        return job(), None
    except ConfigurationError:
        return None, "JETSTREAM_BRIDGE settings are invalid; run manage.py check."
    except (NatsUnavailable, AuthenticationFailed) as exc:
        return None, f"NATS is unreachable: {type(exc).__name__}: {scrub(str(exc))}"
    except NatsError as exc:
        return None, f"NATS refused the request: {type(exc).__name__}: {scrub(str(exc))}"
    except concurrent.futures.TimeoutError:
        return None, "NATS did not answer in time."
    except Exception as exc:
        logger.exception("the admin could not read or change the dead letters")
        return None, f"{type(exc).__name__} while talking to NATS; see the log."
