"""Dead-letter headers: the message id, the signature, reading forged headers, replay targets."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core.dead_letter import ClaimedLetter, DeadLetter, ReplayPolicy
from jetstream_bridge.core.envelope import MSG_ID_HEADER
from jetstream_bridge.core.subjects import Subjects

KEY = b"k" * 32
SUBJECTS = Subjects.build("prod", "alpha", "beta")
NOW = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)


def _letter(**overrides: object) -> DeadLetter:
    fields: dict[str, object] = {
        "reason": letters.REJECTED,
        "error_class": "RejectMessage",
        "error_message": "no such customer",
        "original_subject": SUBJECTS.subscribe,
        "stream": "prod-jetstream-bridge-stream",
        "stream_seq": 42,
        "deliveries": 1,
        "consumer": "alpha-events",
        "event_id": "e-1",
    }
    fields.update(overrides)
    return DeadLetter(**fields)  # type: ignore[arg-type]


def test_message_id__names_the_origin_and_ends_in_128_random_bits() -> None:
    first = _letter().headers(now=NOW)[MSG_ID_HEADER]
    second = _letter().headers(now=NOW)[MSG_ID_HEADER]
    pattern = r"dlq:alpha-events:prod-jetstream-bridge-stream:42:[0-9a-f]{32}"
    assert re.fullmatch(pattern, first)
    assert re.fullmatch(pattern, second)
    assert first != second


def test_headers__are_byte_for_byte_the_old_ones_without_a_key() -> None:
    headers = _letter().headers(b"{}", now=NOW)
    headers.pop(MSG_ID_HEADER)
    assert headers == {
        letters.REASON: "rejected",
        letters.ERROR_CLASS: "RejectMessage",
        letters.ERROR_MESSAGE: "no such customer",
        letters.ORIGINAL_SUBJECT: "prod.data.sync.beta.alpha",
        letters.STREAM: "prod-jetstream-bridge-stream",
        letters.STREAM_SEQ: "42",
        letters.DELIVERIES: "1",
        letters.CONSUMER: "alpha-events",
        letters.FAILED_AT: "2026-12-01T03:00:00.000Z",
        letters.EVENT_ID: "e-1",
    }


def test_headers__hold_no_line_break_or_lone_surrogate() -> None:
    headers = _letter(event_id="a\r\nInjected: 1\ud800", error_message="x" * 999 + " y").headers()
    assert headers[letters.EVENT_ID] == "a  Injected: 1\\ud800"
    assert headers[letters.ERROR_MESSAGE] == "x" * 999  # cut, and no trailing space
    for value in headers.values():
        value.encode("utf-8")


def test_signature__verifies_what_was_signed_and_nothing_else() -> None:
    headers = _letter().headers(b'{"a": 1}', key=KEY)
    assert headers[letters.SIGNATURE].startswith("v1=")
    assert letters.verification(headers, b'{"a": 1}', KEY) == letters.VERIFIED
    # The wire trims header values; what is read back still verifies.
    padded = {name: f" {value} " for name, value in headers.items()}
    assert letters.verification(padded, b'{"a": 1}', KEY) == letters.VERIFIED
    assert letters.verification(headers, b'{"a": 2}', KEY) == letters.UNVERIFIED
    assert letters.verification(headers, b'{"a": 1}', b"another key") == letters.UNVERIFIED
    for name in letters.SIGNED_HEADERS:
        changed = {**headers, name: headers.get(name, "") + "x"}
        assert letters.verification(changed, b'{"a": 1}', KEY) == letters.UNVERIFIED, name
    without_event_id = {k: v for k, v in headers.items() if k != letters.EVENT_ID}
    assert letters.verification(without_event_id, b'{"a": 1}', KEY) == letters.UNVERIFIED
    unsigned = {k: v for k, v in headers.items() if k != letters.SIGNATURE}
    assert letters.verification(unsigned, b'{"a": 1}', KEY) == letters.UNVERIFIED
    assert letters.verification(unsigned, b'{"a": 1}', None) == letters.UNVERIFIABLE


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("7", 7),
        (" 7 ", 7),
        ("0", 0),
        (str(2**64 - 1), 2**64 - 1),
        (str(2**64), None),
        ("9" * 5000, None),
        ("x", None),
        ("-1", None),
        ("+1", None),
        ("1e3", None),
        ("١٢", None),  # other scripts' digits
        ("1_000", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_count__accepts_only_plain_unsigned_64_bit_numbers(
    raw: str | None, expected: int | None
) -> None:
    assert letters.parse_count(raw) == expected


def test_claimed_letter__keeps_what_does_not_parse_as_invalid() -> None:
    headers = {
        letters.STREAM_SEQ: "x",
        letters.DELIVERIES: "-1",
        letters.FAILED_AT: "yesterday",
        letters.REASON: "rejected",
    }
    claimed = ClaimedLetter.from_headers(headers)
    assert (claimed.stream_seq, claimed.deliveries, claimed.failed_at) == (None, None, None)
    assert claimed.invalid == {
        letters.STREAM_SEQ: "x",
        letters.DELIVERIES: "-1",
        letters.FAILED_AT: "yesterday",
    }
    good = ClaimedLetter.from_headers(_letter().headers(now=NOW))
    assert (good.stream_seq, good.deliveries, good.failed_at) == (42, 1, NOW)
    assert good.invalid == {}
    assert ClaimedLetter.from_headers({}).invalid == {}


@pytest.mark.parametrize(
    ("subject", "allowed", "problem"),
    [
        ("prod.data.sync.beta.alpha", (), None),
        ("prod.data.sync.alpha.beta", (), "not this app's inbound subject"),
        ("prod.data.sync.gamma.delta", (), "not this app's inbound subject"),
        ("prod.data.sync.alpha.beta", ("prod.data.sync.alpha.beta",), None),
        ("prod.data.sync.dlq", ("prod.data.sync.dlq",), "the DLQ itself"),
        ("$JS.API.STREAM.DELETE.x", ("$JS.API.STREAM.DELETE.x",), "system subject"),
        ("billing.internal", ("billing.internal",), "outside this bridge's"),
        ("prod.data.sync.*", ("prod.data.sync.*",), "wildcards"),
        ("", (), "no original subject (neither a Jsb-Original-Subject header"),
    ],
)
def test_target_problem__allows_the_inbound_subject_and_named_ones_only(
    subject: str, allowed: tuple[str, ...], problem: str | None
) -> None:
    found = letters.target_problem(SUBJECTS, subject, allowed)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_replay_policy__skips_unverified_letters_unless_told() -> None:
    inbound = SUBJECTS.subscribe
    assert ReplayPolicy().problem(SUBJECTS, inbound, letters.VERIFIED) is None
    assert ReplayPolicy().problem(SUBJECTS, inbound, letters.UNVERIFIABLE) is None
    why = ReplayPolicy().problem(SUBJECTS, inbound, letters.UNVERIFIED)
    assert why is not None
    assert why.startswith("unverified")
    assert "--include-unverified" in why
    assert ReplayPolicy(include_unverified=True).problem(SUBJECTS, inbound, "unverified") is None


# -- a replay for one durable ---------------------------------------------------------------


def test_replay_headers__carry_the_target_and_a_replay_id() -> None:
    headers = letters.replay_headers(12, b"{}", target="alpha-events", key=None)
    assert re.fullmatch(r"replay:12:[0-9a-f]{32}", headers[MSG_ID_HEADER])
    assert headers[letters.REPLAY_FOR] == "alpha-events"
    assert headers[letters.REPLAY_OF] == "12"
    assert letters.REPLAY_SIGNATURE not in headers
    assert letters.replay_target(headers, b"{}", None) == ("alpha-events", None)


def test_replay_headers__for_every_durable_carry_no_target() -> None:
    headers = letters.replay_headers(12, b"{}", target=None, key=b"k" * 32)
    assert set(headers) == {MSG_ID_HEADER, letters.REPLAY_OF}
    assert letters.replay_target(headers, b"{}", b"k" * 32) == (None, None)


def test_replay_target__binds_target_id_and_body_to_the_key() -> None:
    key = b"k" * 32
    headers = letters.replay_headers(3, b'{"a":1}', target="alpha-events", key=key)
    assert letters.replay_target(headers, b'{"a":1}', key) == ("alpha-events", None)
    changed = [
        (headers, b'{"a":2}', key),
        (headers, b'{"a":1}', b"x" * 32),
        ({**headers, letters.REPLAY_FOR: "alpha-audit"}, b'{"a":1}', key),
        ({**headers, MSG_ID_HEADER: f"replay:3:{'0' * 32}"}, b'{"a":1}', key),
    ]
    for forged, body, with_key in changed:
        target, why = letters.replay_target(forged, body, with_key)
        assert target is None
        assert why is not None
        assert letters.REPLAY_SIGNATURE in why


def test_replay_target__needs_the_replay_id_form() -> None:
    for msg_id in ("evt-1", "replay:3", f"replay:x:{'0' * 32}", f"replay:3:{'0' * 31}", None):
        headers = {letters.REPLAY_FOR: "alpha-events"}
        if msg_id is not None:
            headers[MSG_ID_HEADER] = msg_id
        target, why = letters.replay_target(headers, b"{}", None)
        assert target is None
        assert why is not None


def test_replay_headers__cannot_be_set_by_a_publisher() -> None:
    from jetstream_bridge.core.envelope import header_problem

    for name in (letters.REPLAY_FOR, letters.REPLAY_SIGNATURE, "jsb-replay-for"):
        problem = header_problem(name, "alpha-events")
        assert problem is not None
        assert "jetstream_dlq replay" in problem
    assert header_problem(letters.REPLAY_OF, "3") is None  # informative only
