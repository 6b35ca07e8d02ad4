"""Subject naming and matching by NATS token rules.

Tokens are separated by ``.``; ``*`` matches exactly one token and ``>`` (only as the last
token) matches one or more trailing tokens, never zero: ``a.>`` does not match ``a``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FORBIDDEN_IN_TOKEN = re.compile(r"[.*>\s\x00-\x1f\x7f]")


def token_problem(value: object) -> str | None:
    """Return why ``value`` cannot be a subject token, or ``None`` when it can."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if value == "":
        return "must not be empty"
    bad = _FORBIDDEN_IN_TOKEN.search(value)
    if bad:
        char = bad.group()
        shown = {" ": "a space", "\t": "a tab", "\n": "a newline"}.get(char, repr(char))
        return f"must not contain {shown} (no '.', '*', '>', whitespace or control characters)"
    return None


def subject_problem(subject: object, *, allow_wildcards: bool = True) -> str | None:
    """Return why ``subject`` is not a valid NATS subject (or filter), or ``None``."""
    if not isinstance(subject, str) or subject == "":
        return "must be a non-empty string"
    tokens = subject.split(".")
    for index, token in enumerate(tokens):
        if token in ("*", ">"):
            if not allow_wildcards:
                return "must not contain wildcards"
            if token == ">" and index != len(tokens) - 1:  # noqa: S105 - a wildcard
                return "'>' is only allowed as the last token"
            continue
        problem = token_problem(token)
        if problem:
            return f"token {index + 1} ({token!r}) {problem}"
    return None


def _tokens(subject: str) -> list[str]:
    return subject.split(".")


def covers(pattern: str, subject: str) -> bool:
    """Tell whether every subject matched by ``subject`` is also matched by ``pattern``.

    ``subject`` may itself contain wildcards; ``covers("a.>", "a.*")`` is true,
    ``covers("a.*", "a.>")`` is false, ``covers("a.>", "a")`` is false.
    """
    p, s = _tokens(pattern), _tokens(subject)
    for i, ptok in enumerate(p):
        if ptok == ">":
            return len(s) > i
        if i >= len(s):
            return False
        stok = s[i]
        if ptok == "*":
            if stok == ">":
                return False
            continue
        if stok != ptok:  # a literal covers only the same literal
            return False
    return len(s) == len(p)


def collide(a: str, b: str) -> bool:
    """Tell whether some concrete subject is matched by both ``a`` and ``b``."""
    x, y = _tokens(a), _tokens(b)
    for i in range(max(len(x), len(y))):
        xt = x[i] if i < len(x) else None
        yt = y[i] if i < len(y) else None
        if xt == ">":
            return yt is not None
        if yt == ">":
            return xt is not None
        if xt is None or yt is None:
            return False
        if xt != yt and xt != "*" and yt != "*":
            return False
    return True


def is_reserved(subject: str) -> bool:
    """Tell whether ``subject`` could capture JetStream's own ``$JS.API`` traffic or is ``>``."""
    return subject == ">" or collide(subject, "$JS.API.>")


@dataclass(frozen=True)
class Subjects:
    """The three subjects one service uses, derived from env, app and destination tokens."""

    env: str
    app: str
    destination: str
    dlq: str

    @classmethod
    def build(cls, env: str, app: str, destination: str, dlq: str | None = None) -> Subjects:
        return cls(env=env, app=app, destination=destination, dlq=dlq or dlq_subject(env))

    @property
    def publish(self) -> str:
        """Where this app publishes events for the destination."""
        return f"{self.env}.data.sync.{self.app}.{self.destination}"

    @property
    def subscribe(self) -> str:
        """Where the destination publishes events for this app."""
        return f"{self.env}.data.sync.{self.destination}.{self.app}"


def producer_of(subject: str, env: str, app: str) -> str | None:
    """Return the peer that published ``subject`` to ``app``, or ``None`` for any other subject.

    ``{env}.data.sync.{producer}.{app}`` names its producer; the server sets a message's subject,
    so unlike a header a sender cannot claim to be another peer on a subject it cannot write.
    """
    tokens = subject.split(".")
    if len(tokens) != 5 or tokens[:3] != [env, "data", "sync"] or tokens[4] != app:
        return None
    producer = tokens[3]
    return None if token_problem(producer) else producer


def dlq_subject(env: str) -> str:
    return f"{env}.data.sync.dlq"


def stream_name(env: str) -> str:
    return f"{env}-jetstream-bridge-stream"
