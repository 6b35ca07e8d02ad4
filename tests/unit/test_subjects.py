from __future__ import annotations

import pytest

from jetstream_bridge.core.subjects import (
    Subjects,
    collide,
    covers,
    is_reserved,
    subject_problem,
    token_problem,
)

COVERS = [
    # pattern, subject, expected
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
    ("a.*", "a.b.c", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "a", False),  # '>' needs at least one token
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.>", "a.*", True),
    ("a.>", "a.>", True),
    ("a.*", "a.>", False),  # a.> also matches a.b.c, which a.* does not
    ("a.*", "a.*", True),
    ("a.b", "a.*", False),  # a literal never covers a wildcard
    ("*.data.sync.>", "prod.data.sync.dlq", True),
    ("prod.data.sync.>", "staging.data.sync.dlq", False),
    ("*", "a.b", False),
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), COVERS)
def test_covers__follows_nats_token_rules(pattern: str, subject: str, expected: bool) -> None:
    assert covers(pattern, subject) is expected


COLLIDE = [
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("a.>", "a", False),
    ("a.>", "a.b.c", True),
    ("a.>", "*.x", True),
    ("a.*.c", "a.b.*", True),
    ("a.*.c", "a.b.d", False),
    (">", "x", True),
    ("a.b.>", "a.*", False),
    ("a.b.>", "a.*.c", True),
    ("*", "a.b", False),
    ("*.*", "a.>", True),
]


@pytest.mark.parametrize(("a", "b", "expected"), COLLIDE)
def test_collide__is_symmetric_and_follows_token_rules(a: str, b: str, expected: bool) -> None:
    assert collide(a, b) is expected
    assert collide(b, a) is expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "must not be empty"),
        ("a.b", "'.'"),
        ("a*", "'*'"),
        ("a>", "'>'"),
        ("a b", "a space"),
        ("a\tb", "a tab"),
        ("a\x01", "'\\x01'"),
        (3, "must be a string"),
    ],
)
def test_token_problem__names_the_offending_character(value: object, fragment: str) -> None:
    problem = token_problem(value)
    assert problem is not None
    assert fragment in problem


def test_token_problem__accepts_plain_names() -> None:
    assert token_problem("billing-service_2") is None


def test_subject_problem__allows_trailing_gt_only() -> None:
    assert subject_problem("a.>.b") == "'>' is only allowed as the last token"
    assert subject_problem("a.*.>") is None
    assert subject_problem("a.*", allow_wildcards=False) == "must not contain wildcards"
    assert subject_problem("a..b") is not None


def test_is_reserved__rejects_full_wildcard_and_js_api() -> None:
    assert is_reserved(">")
    assert is_reserved("$JS.API.STREAM.INFO.x")
    assert is_reserved("$JS.>")
    assert not is_reserved("prod.data.sync.dlq")


def test_subjects__are_mirror_images_for_two_apps() -> None:
    orders = Subjects.build("prod", "orders", "billing")
    billing = Subjects.build("prod", "billing", "orders")
    assert orders.publish == "prod.data.sync.orders.billing"
    assert orders.subscribe == "prod.data.sync.billing.orders"
    assert orders.publish == billing.subscribe
    assert orders.dlq == "prod.data.sync.dlq"
