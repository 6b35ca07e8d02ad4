"""Public exceptions: the core tree plus ``ConfigurationError`` for Django."""

from __future__ import annotations

from collections.abc import Sequence

from django.core.exceptions import ImproperlyConfigured

from .core.errors import (
    AuthenticationFailed,
    ConsumerNotFound,
    InvalidEvent,
    JetStreamApiError,
    JetStreamBridgeError,
    MalformedEnvelope,
    NatsError,
    NatsUnavailable,
    PayloadTooLarge,
    PublishFailed,
    RejectMessage,
    StreamNotFound,
    TopologyError,
    UnknownDestination,
    UnknownPeer,
)
from .core.settings import Problem


class ConfigurationError(JetStreamBridgeError, ImproperlyConfigured):
    """The ``JETSTREAM_BRIDGE`` settings are invalid; the message says what to write."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = [f"[jetstream_bridge.{p.id}] {p.msg} HINT: {p.hint}" for p in self.problems]
        super().__init__("Invalid JETSTREAM_BRIDGE settings:\n" + "\n".join(lines))


__all__ = [
    "AuthenticationFailed",
    "ConfigurationError",
    "ConsumerNotFound",
    "InvalidEvent",
    "JetStreamApiError",
    "JetStreamBridgeError",
    "MalformedEnvelope",
    "NatsError",
    "NatsUnavailable",
    "PayloadTooLarge",
    "PublishFailed",
    "RejectMessage",
    "StreamNotFound",
    "TopologyError",
    "UnknownDestination",
    "UnknownPeer",
]
