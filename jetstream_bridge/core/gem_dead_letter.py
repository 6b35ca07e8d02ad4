"""Dead letters written by the Ruby ``jetstream_bridge`` gem, read as untrusted claims.

From its v2.4.0 the gem marks a dead letter with ``x-dead-letter: true``, ``x-dlq-reason``
(``malformed_json``, ``unrecoverable``, ``max_deliver_exceeded``), ``x-deliveries`` and
``x-dlq-context``, a JSON object with ``event_id``, ``reason``, ``error_class``,
``error_message``, ``deliveries``, ``original_subject``, ``sequence``, ``consumer``,
``stream`` and ``published_at``, next to the original message's own headers. Those releases
look the event id up as ``nats-msg-id`` in a case-sensitive map, so for a message sent with
``Nats-Msg-Id`` the context holds a random UUID instead; the copied ``Nats-Msg-Id`` header,
when present, is the event's real id and wins. ``sequence`` may be the Ruby client's
``#<struct ... stream=N, consumer=M>`` text rather than a number.

Anyone may publish such headers, so nothing here is trusted: a field of the wrong type, a
number that does not parse or a context that is not a JSON object is reported in
``invalid`` (name -> shortened text) and ignored, never raised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

DEAD_LETTER = "x-dead-letter"
REASON = "x-dlq-reason"
DELIVERIES = "x-deliveries"
CONTEXT = "x-dlq-context"
MARKERS = (DEAD_LETTER, REASON, CONTEXT)

MAX_CONTEXT_LENGTH = 64 * 1024  # far above a real context; a bigger one is not parsed
MAX_SHOWN = 200  # characters of an invalid value kept for display
MAX_COUNT = 2**64 - 1
_COUNT = re.compile(r"[0-9]{1,20}")
_STRUCT_STREAM_SEQ = re.compile(r"#<struct [A-Za-z:]*SequencePair stream=([0-9]{1,20}),")
_TEXT_FIELDS = {
    "reason": "reason",
    "error_class": "error_class",
    "error_message": "error_message",
    "original_subject": "original_subject",
    "stream": "stream",
    "consumer": "consumer",
}


def _find(headers: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """Return (header name as written, value) for ``name`` in any case, or ``None``."""
    if name in headers:
        return name, headers[name]
    for key, value in headers.items():
        if key.lower() == name:
            return key, value
    return None


def is_gem_letter(headers: Mapping[str, str]) -> bool:
    """Tell whether the headers carry the gem's dead-letter marks."""
    return any(_find(headers, name) is not None for name in MARKERS)


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, str) and _COUNT.fullmatch(value.strip()):
        number = int(value.strip())
        return number if number <= MAX_COUNT else None
    return None


def _sequence(value: Any) -> int | None:
    number = _count(value)
    if number is None and isinstance(value, str):
        match = _STRUCT_STREAM_SEQ.match(value.strip())
        number = _count(match.group(1)) if match else None
    return number


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _context(headers: Mapping[str, str], invalid: dict[str, str]) -> dict[str, Any]:
    found = _find(headers, CONTEXT)
    if found is None or not found[1].strip():
        return {}
    name, raw = found
    if len(raw) > MAX_CONTEXT_LENGTH:
        invalid[name] = f"{len(raw)} characters, more than {MAX_CONTEXT_LENGTH}: not read"
        return {}
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        invalid[name] = _shorten(raw)
        return {}
    if not isinstance(value, dict):
        invalid[name] = _shorten(raw)
        return {}
    return value


def claims(headers: Mapping[str, str]) -> dict[str, Any]:
    """Return ``ClaimedLetter`` fields read from the gem's headers (``invalid`` included)."""
    invalid: dict[str, str] = {}
    context = _context(headers, invalid)
    result: dict[str, Any] = {}
    for key, attribute in _TEXT_FIELDS.items():
        value = context.get(key)
        if isinstance(value, str):
            result[attribute] = value
        elif value is not None:
            invalid[f"{CONTEXT}.{key}"] = _shorten(json.dumps(value)[:MAX_SHOWN])
    reason = _find(headers, REASON)
    if reason is not None and reason[1].strip():
        result["reason"] = reason[1].strip()
    checked = (
        ("deliveries", _count, "deliveries"),
        ("sequence", _sequence, "stream_seq"),
        ("published_at", _time, "failed_at"),
    )
    for key, parse, attribute in checked:
        if key in context and context[key] is not None:
            parsed = parse(context[key])
            if parsed is None:
                invalid[f"{CONTEXT}.{key}"] = _shorten(json.dumps(context[key])[:MAX_SHOWN])
            result[attribute] = parsed
    deliveries = _find(headers, DELIVERIES)
    if deliveries is not None and deliveries[1].strip():
        count = _count(deliveries[1])
        if count is None:
            invalid[deliveries[0]] = _shorten(deliveries[1])
        else:
            result["deliveries"] = count
    result["event_id"] = _event_id(headers, context)
    result["invalid"] = invalid
    return result


def _event_id(headers: Mapping[str, str], context: Mapping[str, Any]) -> str | None:
    copied = headers.get("Nats-Msg-Id", "").strip()
    if copied:
        return copied
    claimed = context.get("event_id")
    return claimed if isinstance(claimed, str) and claimed.strip() else None
