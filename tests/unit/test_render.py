"""Terminal output of dead letters: nothing a forged letter holds reaches the terminal raw."""

from __future__ import annotations

import pytest

from jetstream_bridge.management.render import printable


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, ünïcödé ✓", "plain text, ünïcödé ✓"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("ab\x08\x08cd\rxy", "ab\\x08\\x08cd\\rxy"),
        ("\x9b31m \x85 \x7f", "\\x9b31m \\x85 \\x7f"),
        ("evil\u202etxt.exe \u2066x\u2069", "evil\\u202etxt.exe \\u2066x\\u2069"),
        ("zero\u200bwidth \u2028 \ufeff", "zero\\u200bwidth \\u2028 \\ufeff"),
        ("tag\U000e0041", "tag\\U000e0041"),
        ("lone \ud800", "lone \\ud800"),
        ("a\tb\nc", "a\\tb\\nc"),
    ],
)
def test_printable__shows_control_and_format_characters_as_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_printable__keeps_line_breaks_only_when_asked() -> None:
    assert printable("one\ntwo\r\n\x1b", newlines=True) == "one\ntwo\\r\n\\x1b"
