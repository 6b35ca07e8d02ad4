from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from jetstream_bridge.core.envelope import (
    build_envelope,
    decode,
    encode,
    new_event_id,
)
from jetstream_bridge.core.errors import InvalidEvent, MalformedEnvelope


def _build(**overrides: object) -> dict:
    kwargs: dict = dict(
        producer="orders",
        resource_type="user",
        event_type="created",
        payload={"id": 42, "name": "Ada"},
    )
    kwargs.update(overrides)
    return build_envelope(**kwargs)


def test_build_envelope__has_every_field_and_infers_resource_id() -> None:
    envelope = _build(
        occurred_at=datetime(2025, 8, 13, 21, 0, tzinfo=timezone.utc),
        trace_id="abc",
        event_id="e-1",
    )
    assert envelope == {
        "event_id": "e-1",
        "schema_version": 1,
        "event_type": "created",
        "producer": "orders",
        "resource_type": "user",
        "resource_id": "42",
        "occurred_at": "2025-08-13T21:00:00.000Z",
        "trace_id": "abc",
        "payload": {"id": 42, "name": "Ada"},
    }


def test_envelope__round_trips_through_encode_decode() -> None:
    envelope = _build(payload={"id": "x", "name": "Zoë", "nested": {"a": [1, 2.5, None]}})
    assert decode(encode(envelope)) == envelope


def test_new_event_id__is_a_time_ordered_uuid7() -> None:
    ids = [new_event_id() for _ in range(200)]
    parsed = [uuid.UUID(value) for value in ids]
    assert all(u.version == 7 for u in parsed)
    assert len(set(ids)) == 200
    timestamps = [u.int >> 80 for u in parsed]
    assert timestamps == sorted(timestamps)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"event_type": ""}, "event_type must be a non-empty string"),
        ({"resource_type": "  "}, "resource_type must be a non-empty string"),
        ({"payload": [1, 2]}, "payload must be a dict"),
        ({"event_id": "x" * 300}, "longer than 255"),
        ({"occurred_at": datetime(2025, 1, 1)}, "timezone-aware"),
        ({"occurred_at": "yesterday"}, "ISO-8601"),
    ],
)
def test_build_envelope__rejects_bad_input(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        _build(**overrides)


def test_encode__rejects_values_json_cannot_hold() -> None:
    with pytest.raises(InvalidEvent, match="not JSON-serialisable"):
        encode(_build(payload={"price": Decimal("1.10")}))
    with pytest.raises(InvalidEvent, match="not JSON-serialisable"):
        encode(_build(payload={"ratio": float("nan")}))


def test_build_envelope__rejects_deeply_nested_payloads() -> None:
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(InvalidEvent, match="nested deeper"):
        _build(payload=deep)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"not json", "not JSON"),
        (b"[1,2]", "JSON list, not an object"),
        (
            json.dumps({"event_type": "x", "resource_type": "y", "payload": {}}).encode(),
            "missing required field(s): event_id",
        ),
        (
            json.dumps(
                {"event_id": "", "event_type": "x", "resource_type": "y", "payload": {}}
            ).encode(),
            "event_id must be a non-empty string",
        ),
        (
            json.dumps(
                {"event_id": "1", "event_type": "x", "resource_type": "y", "payload": "text"}
            ).encode(),
            "payload must be a JSON object",
        ),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_decode__rejects_malformed_messages_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedEnvelope) as info:
        decode(data)
    assert reason in str(info.value)


@pytest.mark.parametrize("event_id", ["a\x00b", "a\r\nX-Forged: 1", "tab\there", "del\x7f"])
def test_event_id__control_characters_are_refused_on_both_ends(event_id: str) -> None:
    # Found by tests/chaos: a NUL in a received id failed every inbox batch it arrived in.
    with pytest.raises(InvalidEvent, match="control characters"):
        build_envelope(
            producer="a", resource_type="r", event_type="e", payload={}, event_id=event_id
        )
    body = json.dumps(
        {"event_id": event_id, "event_type": "e", "resource_type": "r", "payload": {}}
    ).encode()
    with pytest.raises(MalformedEnvelope, match="control characters"):
        decode(body)
