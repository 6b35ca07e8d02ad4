"""Credentials are hidden by reading the text, whatever characters the password holds."""

from __future__ import annotations

import pytest

from jetstream_bridge.core.redaction import redact_url, scrub
from jetstream_bridge.core.settings import parse_config

SECRET = "pa?ss#w/rd"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://user:pa?ss#w/rd@host:4222", "nats://user:***@host:4222"),
        ("tls://user:p@ss@host:4222", "tls://user:***@host:4222"),
        ("nats://pa?ss#w/rd@host", "nats://***@host"),  # a token
        ("nats://tok@host", "nats://***@host"),
        ("nats://user:pa?ss@[::1]:4222", "nats://user:***@[::1]:4222"),
        ("nats://user:pa?ss@[fe80::1%25eth0]:4222", "nats://user:***@[fe80::1%25eth0]:4222"),
        (
            "nats://a:pa?ss@h1:4222,nats://b:w/rd#x@h2:4222",
            "nats://a:***@h1:4222,nats://b:***@h2:4222",
        ),
        ("ws://user:x:ab://c@host", "ws://user:***@host"),
        ("nats://host:4222", "nats://host:4222"),
        ("tls://[::1]:4222", "tls://[::1]:4222"),
    ],
)
def test_redact_url__hides_any_password_or_token(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_scrub__hides_credentials_of_urls_embedded_in_text() -> None:
    text = (
        "could not connect to ['nats://user:pa?ss#w/rd@h1:4222', 'tls://tok#en@[::1]:4222'] "
        "(Connection refused); contact ops@example.com"
    )
    assert scrub(text) == (
        "could not connect to ['nats://user:***@h1:4222', 'tls://***@[::1]:4222'] "
        "(Connection refused); contact ops@example.com"
    )


def test_url_check__an_unparsable_url_with_a_password_is_reported_redacted() -> None:
    _, problems = parse_config(
        {"DESTINATION_APP": "b", "NATS_URLS": f"nats://bridge:{SECRET}@h:4222"}
    )
    [problem] = [p for p in problems if p.key == "NATS_URLS"]
    text = f"{problem.msg} {problem.hint}"
    for piece in (SECRET, "pa?ss", "w/rd"):
        assert piece not in text
    assert "nats://bridge:***@h:4222" in text
    assert "USER and PASSWORD" in text
