"""Configuration problems and the check ids that classify them, all in one registry.

The settings parser, the Django system checks and the README's list of ids read the same
``Check`` objects, so an id cannot mean two things or go undocumented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CHECK_ID_PREFIX = "jetstream_bridge"


@dataclass(frozen=True)
class Problem:
    """One configuration problem; ``id`` is the Django check id suffix (``E003``)."""

    id: str
    msg: str
    hint: str
    key: str | None = None
    deploy: bool = False  # see ``Check.deploy``

    @property
    def is_error(self) -> bool:
        return self.id.startswith("E")


@dataclass(frozen=True)
class Check:
    """A check id and the short title the README lists it under.

    A ``deploy`` check is about the run-time environment rather than the code: image builds
    run ``migrate`` and ``collectstatic`` without it, so Django reports it only under
    ``check --deploy``; using the bridge still raises ``ConfigurationError`` for it.
    """

    id: str
    title: str
    deploy: bool = False

    @property
    def qualified_id(self) -> str:
        """Return the id Django shows, e.g. ``jetstream_bridge.E003``."""
        return f"{CHECK_ID_PREFIX}.{self.id}"

    def problem(self, key: str | None, msg: str, hint: str) -> Problem:
        """Return a ``Problem`` of this check about the setting ``key``."""
        return Problem(id=self.id, msg=msg, hint=hint, key=key, deploy=self.deploy)


NOT_A_DICT = Check("E001", "not a dict")
UNKNOWN_KEY = Check("E002", 'unknown key (with "did you mean")')
MISSING_DESTINATION = Check(
    "E003", "missing `DESTINATION_APP` (under `check --deploy`)", deploy=True
)
BAD_TOKEN = Check(
    "E004", "bad subject token (`.`, `*`, `>`, whitespace, control characters, empty)"
)
BAD_DURATION = Check("E005", "bad duration")
BACKOFF_TOO_LONG = Check("E006", "`BACKOFF` longer than `MAX_DELIVER`")
# E007 also covers a non-string where text is expected, as it always has.
BAD_NUMBER = Check("E007", "bad number")
BAD_URL = Check("E008", "bad URL")
BAD_CHOICE = Check("E009", "bad choice")
BAD_BOOLEAN = Check("E010", "bad boolean")
BAD_STREAM_OR_SUBJECT = Check("E011", "bad stream name or DLQ subject")
# The parser reports a malformed model path and checks.py an uninstalled one, both as E012.
BAD_MODEL = Check("E012", "model not installed")
MODEL_MISSING_FIELDS = Check("E013", "custom model missing required fields")
# E014 also covers a TLS certificate without its key.
AUTH_CONFLICT = Check("E014", "conflicting authentication")
DUPLICATE_WINDOW_TOO_SHORT = Check("E015", "duplicate window not longer than the relay lease")
BAD_DOTTED_PATH = Check("E016", "`MIDDLEWARE` entry not a dotted path")
SAME_APP_AND_DESTINATION = Check("W001", "`APP_NAME` equals `DESTINATION_APP`")
DLQ_LIMITS_UNUSED = Check("W002", "DLQ limits set while the DLQ shares the events' stream")

CHECKS: tuple[Check, ...] = (
    NOT_A_DICT,
    UNKNOWN_KEY,
    MISSING_DESTINATION,
    BAD_TOKEN,
    BAD_DURATION,
    BACKOFF_TOO_LONG,
    BAD_NUMBER,
    BAD_URL,
    BAD_CHOICE,
    BAD_BOOLEAN,
    BAD_STREAM_OR_SUBJECT,
    BAD_MODEL,
    MODEL_MISSING_FIELDS,
    AUTH_CONFLICT,
    DUPLICATE_WINDOW_TOO_SHORT,
    BAD_DOTTED_PATH,
    SAME_APP_AND_DESTINATION,
    DLQ_LIMITS_UNUSED,
)


def check_list() -> str:
    """Render the README's list of check ids: ``E001 not a dict · E002 ... .``."""
    return " · ".join(f"{check.id} {check.title}" for check in CHECKS) + "."


def first_error(problems: Sequence[Problem]) -> Problem | None:
    return next((p for p in problems if p.is_error), None)
