"""Reading the Ruby gem's dead letters (x-dlq-* headers) as claims, hostile ones included."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.core import gem_dead_letter as gem
from jetstream_bridge.core.dead_letter import ClaimedLetter
from jetstream_bridge.core.subjects import Subjects

SUBJECTS = Subjects.build("prod", "alpha", "beta")


def gem_headers(**context_overrides: object) -> dict[str, str]:
    context = {
        "event_id": "7c0e4bd2-0000-4000-8000-000000000001",
        "reason": "max_deliver_exceeded",
        "error_class": "ActiveRecord::RecordNotFound",
        "error_message": "Couldn't find Customer with 'id'=42",
        "deliveries": 5,
        "original_subject": SUBJECTS.subscribe,
        "sequence": "#<struct NATS::JetStream::Msg::Ack::SequencePair stream=17, consumer=9>",
        "consumer": "prod-alpha-workers",
        "stream": "prod-jetstream-bridge-stream",
        "published_at": "2026-11-30T10:00:00Z",
        **context_overrides,
    }
    return {
        "Nats-Msg-Id": "evt-1",
        "x-dead-letter": "true",
        "x-dlq-reason": "max_deliver_exceeded",
        "x-deliveries": "5",
        "x-dlq-context": json.dumps(context),
    }


def test_gem_letter__every_claim_is_read_from_the_context_and_headers() -> None:
    letter = ClaimedLetter.from_headers(gem_headers())
    assert letter.format == letters.GEM_FORMAT
    assert letter.reason == "max_deliver_exceeded"
    assert letter.original_subject == SUBJECTS.subscribe
    assert letter.deliveries == 5
    assert letter.consumer == "prod-alpha-workers"
    assert letter.stream == "prod-jetstream-bridge-stream"
    assert letter.stream_seq == 17  # from the Ruby client's pair struct text
    assert letter.error_class == "ActiveRecord::RecordNotFound"
    assert letter.error_message == "Couldn't find Customer with 'id'=42"
    assert letter.failed_at == datetime(2026, 11, 30, 10, tzinfo=timezone.utc)
    assert letter.invalid == {}


def test_gem_letter__copied_message_id_is_the_event_id_not_the_contexts_random_one() -> None:
    assert ClaimedLetter.from_headers(gem_headers()).event_id == "evt-1"
    without = {k: v for k, v in gem_headers().items() if k != "Nats-Msg-Id"}
    assert ClaimedLetter.from_headers(without).event_id == "7c0e4bd2-0000-4000-8000-000000000001"


def test_gem_letter__header_names_are_matched_in_any_case() -> None:
    headers = {k.upper() if k.startswith("x-") else k: v for k, v in gem_headers().items()}
    letter = ClaimedLetter.from_headers(headers)
    assert (letter.format, letter.reason, letter.deliveries) == (
        letters.GEM_FORMAT,
        "max_deliver_exceeded",
        5,
    )


def test_gem_letter__our_own_headers_win_when_both_sets_are_present() -> None:
    headers = {**gem_headers(), letters.REASON: "rejected", letters.CONSUMER: "alpha-events"}
    letter = ClaimedLetter.from_headers(headers)
    assert (letter.format, letter.reason, letter.consumer) == (
        letters.BRIDGE_FORMAT,
        "rejected",
        "alpha-events",
    )


def test_gem_letter__a_plain_copy_without_marks_is_of_unknown_format() -> None:
    letter = ClaimedLetter.from_headers({"Nats-Msg-Id": "evt-1"})  # what gem v2.0.0 writes
    assert (letter.format, letter.reason, letter.original_subject) == ("", "", "")


@pytest.mark.parametrize(
    "context",
    [
        "{not json",
        "[1, 2]",
        '"a string"',
        "NaN",
        "[" * 100_000,
        "x" * (gem.MAX_CONTEXT_LENGTH + 1),
        '{"deliveries": {"$gt": 1}}{',
    ],
)
def test_gem_letter__a_garbled_context_is_reported_and_never_raises(context: str) -> None:
    headers = {**gem_headers(), "x-dlq-context": context}
    letter = ClaimedLetter.from_headers(headers)
    assert "x-dlq-context" in letter.invalid
    assert len(letter.invalid["x-dlq-context"]) < 300
    assert letter.reason == "max_deliver_exceeded"  # the plain headers still count
    assert letter.deliveries == 5
    assert letter.original_subject == ""


def test_gem_letter__wrong_types_inside_the_context_are_ignored_and_reported() -> None:
    headers = gem_headers(
        deliveries=-3,
        sequence=True,
        original_subject={"$JS": "API"},
        consumer=["a"],
        published_at="yesterday",
        error_message=None,
    )
    headers["x-deliveries"] = "five"
    letter = ClaimedLetter.from_headers(headers)
    assert letter.deliveries is None
    assert letter.stream_seq is None
    assert letter.original_subject == ""
    assert letter.consumer == ""
    assert letter.failed_at is None
    assert set(letter.invalid) == {
        "x-deliveries",
        "x-dlq-context.deliveries",
        "x-dlq-context.sequence",
        "x-dlq-context.original_subject",
        "x-dlq-context.consumer",
        "x-dlq-context.published_at",
    }


def test_gem_letter__replay_rules_apply_to_the_claimed_subject() -> None:
    policy = letters.ReplayPolicy()
    ours = ClaimedLetter.from_headers(gem_headers())
    assert policy.problem(SUBJECTS, ours.original_subject, letters.UNVERIFIABLE) is None
    for hostile in ("$JS.API.STREAM.DELETE.x", SUBJECTS.dlq, SUBJECTS.publish, "prod.data.>"):
        letter = ClaimedLetter.from_headers(gem_headers(original_subject=hostile))
        assert policy.problem(SUBJECTS, letter.original_subject, letters.UNVERIFIABLE)
    # Unsigned: with a signing key configured it is unverified, so replay needs consent.
    assert letters.verification(gem_headers(), b"{}", b"key") == letters.UNVERIFIED
