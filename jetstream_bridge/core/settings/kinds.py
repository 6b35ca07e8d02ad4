"""The kinds of value a setting holds, each with its parser.

A kind turns what the user wrote into the value ``BridgeConfig`` holds. An invalid value is
reported as a ``Problem`` and replaced by a fallback (usually the default), so parsing goes on
and ``manage.py check`` can list every problem at once.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeGuard
from urllib.parse import urlsplit

from ..durations import parse_duration
from ..redaction import Secret, redact_url
from ..subjects import is_reserved, subject_problem, token_problem
from .problems import (
    BAD_BOOLEAN,
    BAD_CHOICE,
    BAD_DOTTED_PATH,
    BAD_DURATION,
    BAD_NUMBER,
    BAD_STREAM_OR_SUBJECT,
    BAD_TOKEN,
    BAD_URL,
    Problem,
)

_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_URL_SCHEMES = ("nats", "tls", "ws", "wss")


@dataclass(frozen=True)
class Field:
    """One setting as read: its key, the value written (the default when absent), the default."""

    key: str
    value: Any
    default: Any


class Kind(abc.ABC):
    """How one kind of setting is parsed."""

    # A secret is never shown: the install block tells users to read it from the environment.
    secret: ClassVar[bool] = False
    # An environment variable for a list kind holds comma-separated items.
    is_list: ClassVar[bool] = False

    @abc.abstractmethod
    def parse(self, field: Field, problems: list[Problem]) -> Any:
        """Return the parsed value; on a bad value append a problem and return a fallback."""


class Token(Kind):
    """A subject token such as ``orders``: no dots, wildcards, whitespace or control chars."""

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value = field.key, field.value
        if value is None:
            return ""
        problem = token_problem(value)
        if problem:
            problems.append(
                BAD_TOKEN.problem(
                    key,
                    f"JETSTREAM_BRIDGE[{key!r}] = {value!r} {problem}.",
                    f"Use a plain name such as 'orders' or 'billing-service', for example "
                    f"JETSTREAM_BRIDGE = {{..., {key!r}: 'orders'}}.",
                )
            )
            return ""
        return str(value)


def _items(value: Any) -> list[Any]:
    """What a list setting holds: a comma-separated string split and stripped, a list or tuple
    as is, anything else as its one item (for the caller to report)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class Tokens(Kind):
    """One or several subject tokens, written as a string, a comma-separated string or a list.

    Parses to a tuple in the order written; duplicates are reported (each peer once).
    """

    is_list = True

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value = field.key, field.value
        if value is None or value == "":
            return ()
        good: list[str] = []
        for item in _items(value):
            problem = token_problem(item)
            if problem is None and item in good:
                problem = "is listed twice"
            if problem:
                problems.append(
                    BAD_TOKEN.problem(
                        key,
                        f"JETSTREAM_BRIDGE[{key!r}] has {item!r}, which {problem}.",
                        f"Use plain names such as 'billing' or ['billing', 'shipping'] (each "
                        f"once), or set {key}=billing,shipping in the environment.",
                    )
                )
                continue
            good.append(str(item))
        return tuple(good)


class Duration(Kind):
    """Seconds as a float, written ``'30s'`` or as a number; ``None`` when the default is."""

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value, default = field.key, field.value, field.default
        if value is None:  # only reached when the default is None: the setting is optional
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            problems.append(
                BAD_DURATION.problem(
                    key,
                    f"JETSTREAM_BRIDGE[{key!r}]: {exc}.",
                    f"Write {key!r}: '30s' (units: ms, s, m, h, d) or a number of seconds.",
                )
            )
            return parse_duration(default) if default is not None else None


class Durations(Kind):
    """A tuple of durations, written as a list or a comma-separated string."""

    is_list = True

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value = field.key, field.value
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(
                BAD_DURATION.problem(
                    key,
                    f"JETSTREAM_BRIDGE[{key!r}] must be a list of durations, got {value!r}.",
                    f"Write {key!r}: ['1s', '5s', '15s'].",
                )
            )
            return tuple(parse_duration(v) for v in field.default)
        result = []
        for item in value:
            try:
                result.append(parse_duration(item))
            except ValueError as exc:
                problems.append(
                    BAD_DURATION.problem(
                        key,
                        f"JETSTREAM_BRIDGE[{key!r}]: {exc}.",
                        f"Write {key!r}: ['1s', '5s', '15s'] (units: ms, s, m, h, d).",
                    )
                )
        return tuple(result)


@dataclass(frozen=True)
class Integer(Kind):
    """An integer within bounds (digit strings accepted); ``None`` when the default is."""

    minimum: int
    maximum: int | None = None

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value, default = field.key, field.value, field.default
        if value is None:  # only reached when the default is None: the setting is optional
            return None
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, str) and value.strip().isdigit():
            value, ok = int(value), True
        if ok and self.minimum <= value and (self.maximum is None or value <= self.maximum):
            return int(value)
        problems.append(
            BAD_NUMBER.problem(
                key,
                f"JETSTREAM_BRIDGE[{key!r}] must be an integer {self.bounds}, got {value!r}.",
                f"Write {key!r}: {default if default is not None else self.minimum}.",
            )
        )
        return default

    @property
    def bounds(self) -> str:
        if self.maximum is None:
            return f">= {self.minimum}"
        return f"between {self.minimum} and {self.maximum}"


class Boolean(Kind):
    """``True``/``False``, or a string such as ``'yes'`` or ``'off'``."""

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value = field.key, field.value
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        problems.append(
            BAD_BOOLEAN.problem(
                key,
                f"JETSTREAM_BRIDGE[{key!r}] must be True or False, got {value!r}.",
                f"Write {key!r}: {field.default}.",
            )
        )
        return field.default


@dataclass(frozen=True)
class Choice(Kind):
    """One of a few lowercase words; the case the user wrote does not matter."""

    choices: Sequence[str]

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value = field.key, field.value
        if isinstance(value, str) and value.lower() in self.choices:
            return value.lower()
        problems.append(
            BAD_CHOICE.problem(
                key,
                f"JETSTREAM_BRIDGE[{key!r}] must be one of {', '.join(self.choices)}; "
                f"got {value!r}.",
                f"Write {key!r}: {field.default!r}.",
            )
        )
        return field.default


class Text(Kind):
    """An optional string; empty means not set."""

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        return self.optional_string(field, problems, f"Write {field.key!r}: '...'.")

    @staticmethod
    def optional_string(field: Field, problems: list[Problem], hint: str) -> str | None:
        """Return the value as a string, ``None`` when unset; report anything else."""
        key, value = field.key, field.value
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            problems.append(
                BAD_NUMBER.problem(key, f"JETSTREAM_BRIDGE[{key!r}] must be a string.", hint)
            )
            return None
        return value


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


class DottedPaths(Kind):
    """Python dotted paths (``myapp.middleware.report_errors``), a list or comma-separated.

    Only their shape is checked here; the code is imported when a consumer starts.
    """

    is_list = True

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value = field.key, field.value
        if value is None or value == "":
            return ()
        good: list[str] = []
        for item in _items(value):
            if isinstance(item, str) and _DOTTED.fullmatch(item):
                good.append(item)
                continue
            problems.append(
                BAD_DOTTED_PATH.problem(
                    key,
                    f"JETSTREAM_BRIDGE[{key!r}] has {item!r}, which is not a dotted path.",
                    f"Name importable callables, e.g. {key!r}: ['myapp.middleware.report_errors'].",
                )
            )
        return tuple(good)


class SecretText(Kind):
    """An optional string kept in a ``Secret`` so it never shows in logs or ``repr``."""

    secret = True

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        if isinstance(field.value, Secret):
            return field.value
        hint = f"Read it from the environment, e.g. {field.key!r}: env('NATS_{field.key}')."
        value = Text.optional_string(field, problems, hint)
        return None if value is None else Secret(value)


def _is_server_url(url: object) -> TypeGuard[str]:
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        ok = bool(parts and parts.scheme in _URL_SCHEMES and parts.hostname)
        if ok and parts is not None:
            _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        return False
    return ok


class Urls(Kind):
    """NATS server URLs, written as a list or a comma-separated string."""

    is_list = True

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value = field.key, field.value
        good: list[str] = []
        for url in _items(value) or [value]:  # an empty list is reported, not accepted
            if _is_server_url(url):
                good.append(url)
                continue
            shown = redact_url(url) if isinstance(url, str) else repr(url)
            problems.append(
                BAD_URL.problem(
                    key,
                    f"JETSTREAM_BRIDGE[{key!r}] has an invalid URL: {shown}.",
                    f"Write {key!r}: ['nats://host:4222'] or set NATS_URLS="
                    "nats://host1:4222,nats://host2:4222 in the environment. A password "
                    "holding ?, #, / or @ cannot be written in a URL: set USER and PASSWORD.",
                )
            )
        return tuple(good)


class Subject(Kind):
    """A literal subject (no wildcards) outside JetStream's own ``$JS.API`` space."""

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value, default = field.key, field.value, field.default
        problem = subject_problem(value, allow_wildcards=False)
        if problem is None and is_reserved(value):
            problem = "must not overlap JetStream's own $JS.API subjects"
        if problem:
            problems.append(
                BAD_STREAM_OR_SUBJECT.problem(
                    key,
                    f"JETSTREAM_BRIDGE[{key!r}] = {value!r} {problem}.",
                    f"Leave it out to use {default!r}, or write a dotted subject with no "
                    "wildcards.",
                )
            )
            return default
        return str(value)


class StreamName(Kind):
    """A JetStream stream name: letters, digits, ``-`` and ``_``, at most 255 characters."""

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        key, value, default = field.key, field.value, field.default
        if isinstance(value, str) and _STREAM_NAME.match(value) and len(value) <= 255:
            return value
        problems.append(
            BAD_STREAM_OR_SUBJECT.problem(
                key,
                f"JETSTREAM_BRIDGE[{key!r}] = {value!r} is not a valid stream name.",
                f"Use letters, digits, '-' and '_' only, e.g. {default!r}.",
            )
        )
        return default


class ModelPath(Kind):
    """An ``app_label.ModelName`` path, taken as written.

    Its shape is checked by ``validators.model_paths_are_dotted`` and whether it names an
    installed model by the Django system checks, which can look the model up.
    """

    def parse(self, field: Field, problems: list[Problem]) -> Any:
        return field.value
