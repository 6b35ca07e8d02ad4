"""Keep credentials out of output: ``Secret`` values, URLs with their passwords hidden, and
credentials scrubbed from text that reaches logs, health reports and the admin."""

from __future__ import annotations

import re

# Where a URL starts: a scheme and "://", not glued to a word before it (so the "ab://" inside
# a password "x:ab://c" does not start a new URL and leave "x:ab" in the clear).
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.\-:/@%])[A-Za-z][A-Za-z0-9+.\-]*://")
_SPACE = re.compile(r"\s")


class Secret:
    """A string that never shows itself in ``repr``/``str``; call ``reveal()`` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _redact_authority(rest: str) -> str:
    """Hide the credentials of one URL's text after ``scheme://``.

    The credentials run to the *last* ``@``: a password may hold ``?``, ``#``, ``/`` or even
    ``@``, which a URL parser reads as the start of the query, fragment or path (and then sees
    no password at all). Hiding too much is harmless; hiding too little is a leak.
    """
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return rest
    user, colon, _ = userinfo.partition(":")
    # A lone "user" in nats://token@host is a token; hide it too.
    shown = f"{user}:***" if colon and user and not _looks_secret(user) else "***"
    return f"{shown}@{host}"


def _looks_secret(user: str) -> bool:
    # A user name with URL delimiters is most likely the start of a mangled secret.
    return any(char in user for char in "/?#@")


def _redact(text: str, *, stop_at_space: bool) -> str:
    pieces: list[str] = []
    position = 0
    starts = list(_SCHEME.finditer(text))
    for index, match in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        if stop_at_space:
            space = _SPACE.search(text, match.end(), end)
            if space is not None:
                end = space.start()
        pieces.append(text[position : match.end()])
        pieces.append(_redact_authority(text[match.end() : end]))
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def redact_url(url: str) -> str:
    """Return ``url`` with any password or token replaced by ``***``.

    Works by reading the text, not by parsing it as a URL, so a password that holds ``?``,
    ``#``, ``/`` or ``@`` is hidden too; several comma-separated URLs, IPv6 hosts
    (``[::1]:4222``) and ``nats://token@host`` are handled alike.
    """
    return _redact(url, stop_at_space=False)


def scrub(text: str) -> str:
    """Remove credentials that an underlying error message may have copied from a URL.

    In free text a URL ends at whitespace or where the next ``scheme://`` begins.
    """
    return _redact(text, stop_at_space=True)
