"""The event envelope: build, encode, decode and validate.

An envelope is a plain ``dict`` so handlers receive exactly what went over the wire::

    {"event_id": "...", "schema_version": 1, "event_type": "created", "producer": "orders",
     "resource_type": "order", "resource_id": "42", "occurred_at": "2025-08-13T21:00:00Z",
     "trace_id": "...", "payload": {...}}
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidEvent, MalformedEnvelope

SCHEMA_VERSION = 1
MSG_ID_HEADER = "Nats-Msg-Id"  # case matters: the server dedupes on this exact name
REQUIRED_FIELDS = ("event_id", "event_type", "resource_type", "payload")
# Payload levels, the innermost value counting as one even when it is an empty list or
# object. With the envelope's own object that is 32 levels: as deep as MariaDB's JSON columns
# accept (the outbox and inbox store the envelope), and far more than a real event needs.
MAX_DEPTH = 31
MAX_ID_LENGTH = 255  # fits the event_id and resource_id columns
MAX_TYPE_LENGTH = 100  # fits the event_type and resource_type columns
# A NUL escape in encoded JSON (an odd run of backslashes before u0000): PostgreSQL's text and
# jsonb cannot hold it.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# Header names NATS accepts (RFC 7230 token characters), as nats-py checks them.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

Envelope = dict[str, Any]


def new_event_id() -> str:
    """Return a time-ordered UUIDv7 string (RFC 9562): sorts by creation time, unique."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(secrets.token_bytes(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def new_trace_id() -> str:
    return os.urandom(16).hex()


def _format_time(value: datetime | str | None) -> str:
    if value is None:
        value = datetime.now(timezone.utc)
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidEvent(f"occurred_at {value!r} is not an ISO-8601 timestamp") from exc
        return value
    if value.tzinfo is None:
        raise InvalidEvent("occurred_at must be timezone-aware (use django.utils.timezone.now())")
    text = value.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _depth(value: Any, limit: int) -> int:
    """Return the nesting depth of ``value`` without recursing (stops counting past ``limit``)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, (Mapping, list, tuple)) and not item:
            # An empty container still takes a level below it in MariaDB's count.
            stack.append((None, depth + 1))
        elif isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _has_control_characters(text: str) -> bool:
    # An event id travels in the Nats-Msg-Id header (where CR/LF would forge headers) and is a
    # key in the inbox (PostgreSQL text cannot hold NUL: one such id failed every batch it
    # arrived in). Ids are identifiers, so control characters are refused outright.
    return any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)


def storage_problem(envelope: Mapping[str, Any], data: bytes) -> str | None:
    """Return why the encoded envelope cannot be stored on every database, or ``None``.

    The columns' lengths hold on the outbox and the inbox alike; ``data`` is ``encode()``'s
    output, where a NUL anywhere shows as an escape.
    """
    for name, limit in (("resource_type", MAX_TYPE_LENGTH), ("event_type", MAX_TYPE_LENGTH)):
        if len(str(envelope.get(name) or "")) > limit:
            return f"{name} is longer than {limit} characters"
    resource_id = envelope.get("resource_id")
    if resource_id is not None and not isinstance(resource_id, (str, int)):
        return f"resource_id must be a string, got {type(resource_id).__name__}"
    if len(str(resource_id or "")) > MAX_ID_LENGTH:
        return f"resource_id is longer than {MAX_ID_LENGTH} characters"
    if _NUL_ESCAPE.search(data):
        return "it holds a NUL character (\\u0000), which PostgreSQL cannot store"
    return None


# core.dead_letter.REPLAY_FOR and REPLAY_SIGNATURE: they aim a replay at one durable.
_REPLAY_ONLY = frozenset({"jsb-replay-for", "jsb-replay-signature"})


def header_problem(name: object, value: object) -> str | None:
    """Return why ``name: value`` cannot travel as a message header unchanged, or ``None``.

    A header nats-py refuses would fail its outbox row on every attempt (and, with
    OUTBOX_ORDERING, hold back its resource); one NATS would alter arrives different. The
    ``Nats-`` names are the server's own: they dedupe, expect sequences or roll the stream up.
    """
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        return (
            f"header name {name!r} must be a non-empty string of letters, digits and "
            "!#$%&'*+-.^_`|~ (no spaces, colons, control or non-ASCII characters)"
        )
    if name.lower().startswith("nats-"):
        return f"header name {name!r} is reserved for the NATS server (Nats-*)"
    if name.lower() in _REPLAY_ONLY:
        return f"header name {name!r} is set only by `jetstream_dlq replay`"
    if not isinstance(value, str):
        return f"header {name!r} must be a string, got {type(value).__name__}"
    if value != value.strip() or _has_control_characters(value):
        return (
            f"header {name!r} must not hold control characters (CR, LF, NUL) or start or end "
            "with whitespace"
        )
    if not value.isprintable() and any(0xD800 <= ord(char) <= 0xDFFF for char in value):
        return f"header {name!r} is not valid Unicode (it holds a lone surrogate)"
    return None


def _require_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent(f"{name} must be a non-empty string, got {value!r}")
    return value


def build_envelope(  # noqa: PLR0913 (keyword-only: one argument per envelope field)
    *,
    producer: str,
    resource_type: str,
    event_type: str,
    payload: Mapping[str, Any],
    event_id: str | None = None,
    trace_id: str | None = None,
    occurred_at: datetime | str | None = None,
    resource_id: str | None = None,
) -> Envelope:
    """Build and validate an envelope; raise ``InvalidEvent`` saying what to fix."""
    _require_text("resource_type", resource_type)
    _require_text("event_type", event_type)
    if not isinstance(payload, Mapping):
        raise InvalidEvent(f"payload must be a dict, got {type(payload).__name__}")
    if event_id is None:
        event_id = new_event_id()
    problem = event_id_problem(event_id)
    if problem:
        raise InvalidEvent(f"{problem} (got {event_id!r})")
    if _depth(payload, MAX_DEPTH) > MAX_DEPTH:
        raise InvalidEvent(f"payload is nested deeper than {MAX_DEPTH} levels")
    if resource_id is None and payload.get("id") is not None:
        resource_id = str(payload["id"])
    return {
        "event_id": event_id,
        "schema_version": SCHEMA_VERSION,
        "event_type": event_type,
        "producer": producer,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "occurred_at": _format_time(occurred_at),
        "trace_id": trace_id or new_trace_id(),
        "payload": dict(payload),
    }


def encode(envelope: Mapping[str, Any]) -> bytes:
    """Encode an envelope as compact UTF-8 JSON; raise ``InvalidEvent`` if it cannot be."""
    try:
        text = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidEvent(
            f"payload is not JSON-serialisable ({exc}); convert dates, decimals and model "
            "instances to strings or numbers first"
        ) from exc
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent(
            "the event holds text that is not valid Unicode (a lone surrogate such as "
            f"'\\ud800' at character {exc.start}); fix the string or its decoding"
        ) from None


@dataclass(frozen=True)
class FieldLimits:
    """The longest values the receiving side stores, in characters (``None``: no limit).

    The defaults are the built-in inbox columns; ``inbox.field_limits`` reads a custom
    model's.
    """

    event_id: int | None = MAX_ID_LENGTH
    event_type: int | None = MAX_TYPE_LENGTH
    resource_type: int | None = MAX_TYPE_LENGTH


INBOX_LIMITS = FieldLimits()

# Text no database column stores: NUL (PostgreSQL text and jsonb refuse it) and lone
# surrogates (not Unicode scalar values: drivers fail to encode them, with an error that is
# not even a database error).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# What the stack would alter in an event id, or cannot carry: control characters (C0, DEL,
# C1; CR/LF would end the Nats-Msg-Id header) and lone surrogates.
_ID_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# In a body's bytes, whatever may decode to unstorable text: an escape of NUL or of a
# surrogate, or a surrogate encoded as such (``json.loads`` lets it through). Only a body that
# matches is walked value by value, so the common body costs a scan in C.
_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\xed[\xa0-\xbf]")


def event_id_problem(value: object) -> str | None:
    """Say why ``value`` cannot be an event id, or return ``None`` when it can.

    The one rule for both sides: the publisher refuses such an id and a consumer dead-letters
    a message carrying one as malformed. An event id travels as the ``Nats-Msg-Id`` header,
    whose value NATS trims of surrounding whitespace and where CR/LF would end the header, and
    it is a key of the outbox and inbox tables: an id the wire or a column would alter is
    deduplicated and matched as another id.
    """
    if not isinstance(value, str) or not value.strip():
        return f"event_id must be a non-empty string, got {type(value).__name__}"
    if len(value) > MAX_ID_LENGTH:
        return f"event_id is longer than {MAX_ID_LENGTH} characters"
    if _ID_REFUSED.search(value):
        return "event_id contains control characters or lone surrogates"
    if value != value.strip():
        return "event_id has leading or trailing whitespace, which NATS trims from headers"
    return None


def _text_problem(name: str, value: object, limit: int | None) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"{name} must be a non-empty string"
    if limit is not None and len(value) > limit:
        return f"{name} is longer than {limit} characters"
    if _UNSTORABLE.search(value):
        return f"{name} contains NUL or a lone surrogate, which no database stores"
    return None


def _unstorable(value: Any) -> str | None:
    """Say what in ``value`` (decoded JSON) no database column stores, without recursing."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item):
                return "a string in the body contains NUL or a lone surrogate"
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _suspect(data: bytes) -> bool:
    # A UTF-16/32 body (json.loads takes those) has NUL bytes: walk it, the scan cannot tell.
    # Substring tests first: much cheaper than the regex for the usual body.
    if b"\x00" in data:
        return True
    return (b"\\u" in data or b"\xed" in data) and _SUSPECT.search(data) is not None


def _refuse_constant(name: str) -> Any:
    raise MalformedEnvelope(f"body holds {name}, which JSON does not allow")


# One decoder for every message: ``json.loads`` with a hook would build one per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def decode(data: bytes, limits: FieldLimits = INBOX_LIMITS) -> Envelope:
    """Decode and validate a received envelope; raise ``MalformedEnvelope`` with the reason.

    Anything the inbox could not store makes the message malformed (never retried) rather
    than failing its batch: NUL or a lone surrogate anywhere in the body, ``NaN`` or
    ``Infinity`` (not JSON: JSON columns refuse them), an id or type longer than ``limits``, an
    event id the wire would alter (``event_id_problem``).
    """
    try:
        # As json.loads does with bytes: UTF-8, -16 or -32, with or without a byte-order mark.
        value = _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except MalformedEnvelope:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedEnvelope(f"body is not JSON: {exc.__class__.__name__}") from exc
    if not isinstance(value, dict):
        raise MalformedEnvelope(f"body is a JSON {type(value).__name__}, not an object")
    missing = [name for name in REQUIRED_FIELDS if name not in value]
    if missing:
        raise MalformedEnvelope(f"missing required field(s): {', '.join(missing)}")
    problem = (
        event_id_problem(value["event_id"])
        or _text_problem("event_type", value["event_type"], limits.event_type)
        or _text_problem("resource_type", value["resource_type"], limits.resource_type)
    )
    if problem is None and limits.event_id is not None and len(value["event_id"]) > limits.event_id:
        problem = f"event_id is longer than {limits.event_id} characters"
    if problem is not None:
        raise MalformedEnvelope(problem)
    if not isinstance(value["payload"], dict):
        raise MalformedEnvelope("payload must be a JSON object")
    # Each level of nesting opens a bracket, so a body with fewer brackets than the limit
    # cannot exceed it: counting bytes in C spares walking every payload (~5% of a consumer
    # batch's time in benchmarks/).
    if data.count(b"{") + data.count(b"[") > MAX_DEPTH and (
        _depth(value["payload"], MAX_DEPTH) > MAX_DEPTH
    ):
        raise MalformedEnvelope(f"payload is nested deeper than {MAX_DEPTH} levels")
    if _suspect(data) and (problem := _unstorable(value)):
        raise MalformedEnvelope(problem)
    return value
