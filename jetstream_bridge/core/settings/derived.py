"""Defaults that follow other settings: the stream name follows ``ENV``, the DLQ's stream
follows ``STREAM_NAME``. ``schema.py`` declares which settings use them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..subjects import stream_name

DEFAULT_ENV = "development"


@dataclass(frozen=True)
class FollowsEnv:
    """A default computed from the parsed ``ENV``, such as the stream name."""

    derive: Callable[[str], str]

    def resolve(self, values: Mapping[str, Any]) -> str:
        # An invalid ENV parses to "": fall back to the default env, as the subjects do not
        # matter then (the config is rejected) but the messages should still read well.
        return self.derive(values.get("env") or DEFAULT_ENV)

    @property
    def shown(self) -> str:
        """Return the default as the README writes it, e.g. ``{ENV}.data.sync.dlq``."""
        return self.derive("{ENV}")


@dataclass(frozen=True)
class FollowsStreamName(FollowsEnv):
    """A default computed from the parsed ``STREAM_NAME`` (which itself follows ``ENV``)."""

    def resolve(self, values: Mapping[str, Any]) -> str:
        base = values.get("stream_name") or stream_name(values.get("env") or DEFAULT_ENV)
        return self.derive(base)

    @property
    def shown(self) -> str:
        return self.derive("{STREAM_NAME}")


def dlq_stream_name(stream: str) -> str:
    return f"{stream}-dlq"
