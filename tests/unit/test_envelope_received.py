"""What a consumer refuses in a received envelope: anything the stack would alter or no
database stores (issue 13, defects 1 and 6)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from jetstream_bridge.core.envelope import (
    INBOX_LIMITS,
    FieldLimits,
    build_envelope,
    decode,
    encode,
    event_id_problem,
)
from jetstream_bridge.core.errors import MalformedEnvelope
from jetstream_bridge.inbox import field_limits
from jetstream_bridge.models import InboxEvent
from jetstream_bridge.outcomes import describe, storable_text


def body(**fields: Any) -> bytes:
    envelope = {"event_id": "e-1", "event_type": "created", "resource_type": "order"}
    envelope["payload"] = {"id": 1}
    envelope.update(fields)
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    ("event_id", "problem"),
    [
        ("a " * 1, "leading or trailing whitespace"),
        (" a", "leading or trailing whitespace"),
        ("a\u00a0", "leading or trailing whitespace"),
        ("a\tb", "control characters"),
        ("a\r\nX-Forged: 1", "control characters"),
        ("a\x85b", "control characters"),
        ("a\ud800", "lone surrogates"),
        ("x" * 256, "longer than 255"),
        ("", "non-empty string"),
        (7, "non-empty string"),
    ],
)
def test_event_id_problem__names_what_the_wire_would_alter(event_id: Any, problem: str) -> None:
    assert problem in (event_id_problem(event_id) or "")


@pytest.mark.parametrize(
    "event_id", ["0190c2a4-7f0e-7d63-9d2b-5d1f2a9b8c01", "a b", "é-😀", "x" * 255]
)
def test_event_id_problem__accepts_ids_that_travel_unchanged(event_id: str) -> None:
    assert event_id_problem(event_id) is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (body(event_id="\ud800"), "event_id contains control characters or lone surrogates"),
        (body(event_id="e-1 "), "leading or trailing whitespace"),
        (body(resource_type="o\udfff"), "resource_type contains NUL or a lone surrogate"),
        (body(event_type="c\u0000"), "event_type contains NUL or a lone surrogate"),
        (body(resource_type="r" * 101), "resource_type is longer than 100 characters"),
        (body(event_type="e" * 101), "event_type is longer than 100 characters"),
        (body(payload={"k": ["ok", {"deep": "\udc00"}]}), "NUL or a lone surrogate"),
        (body(payload={"\ud800": 1}), "NUL or a lone surrogate"),
        (body(payload={"k": "a\u0000b"}), "NUL or a lone surrogate"),
        (body(producer="\u0000"), "NUL or a lone surrogate"),
        (body().replace(b'"id": 1', b'"id": "\xed\xa0\x80"'), "lone surrogate"),
        (body().replace(b'"id": 1', b'"id": NaN'), "NaN"),
        (body().replace(b'"id": 1', b'"id": Infinity'), "Infinity"),
        (body().replace(b'"id": 1', b'"id": -Infinity'), "-Infinity"),
        (body(payload={"k": "\u0000"}).decode().encode("utf-16"), "NUL or a lone surrogate"),
    ],
)
def test_decode__refuses_what_no_database_stores(data: bytes, problem: str) -> None:
    with pytest.raises(MalformedEnvelope) as info:
        decode(data)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        {"emoji": "\U0001f600", "text": "é"},  # json.dumps escapes it as a surrogate PAIR
        {"backslash": "\\u0000 and \\ud800 are text here"},
        {"hangul": "\ud55c\uad6d\uc5b4"},  # UTF-8 lead byte 0xED, not a surrogate
        {"n": 1e308, "big": 2**70},
    ],
)
def test_decode__accepts_text_that_only_looks_suspect(payload: dict[str, Any]) -> None:
    for data in (
        body(payload=payload),
        json.dumps(json.loads(body(payload=payload)), ensure_ascii=False).encode(),
    ):
        assert decode(data)["payload"] == payload


def test_decode__limits_follow_the_inbox_columns() -> None:
    assert field_limits(InboxEvent) == INBOX_LIMITS
    data = body(event_type="e" * 20)
    assert decode(data)["event_type"] == "e" * 20
    with pytest.raises(MalformedEnvelope, match="event_type is longer than 10"):
        decode(data, FieldLimits(event_type=10))
    assert decode(body(resource_type="r" * 500), FieldLimits(resource_type=None))


def test_decode__accepts_what_the_publisher_builds() -> None:
    envelope = build_envelope(
        producer="a", resource_type="order", event_type="created", payload={"x": "é\U0001f600"}
    )
    assert decode(encode(envelope)) == envelope


def test_storable_text__escapes_what_a_column_or_header_cannot_hold() -> None:
    assert storable_text("a\ud800b\x00c\x1bd\té") == "a\\ud800b\\x00c\\x1bd\té"
    try:
        "\ud800".encode()
    except UnicodeEncodeError as exc:
        error = exc
    assert describe(error).encode("utf-8")  # storable: no surrogate left
    assert "\\ud800" in describe(error)
