"""Keep credentials out of output: ``Secret`` values, URLs with their passwords hidden, and
credentials scrubbed from text that reaches logs, health reports and the admin."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_CREDENTIALS_IN_TEXT = re.compile(r"(\w+://)[^/@\s]+@")


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


def redact_url(url: str) -> str:
    """Return ``url`` with any password or token replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if not parts.username and not parts.password:
        return url
    try:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # a port out of range: show the host part as written
        host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    # A lone "user" in nats://token@host is a token; hide it too.
    cred = f"{user}:***" if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{cred}@{host}", parts.path, parts.query, parts.fragment))


def scrub(text: str) -> str:
    """Remove credentials that an underlying error message may have copied from a URL."""
    return _CREDENTIALS_IN_TEXT.sub(r"\1***@", text)
