"""The exception tree of jetstream-bridge.

JetStreamBridgeError                 root: catch this to catch everything the bridge raises
├── InvalidEvent                     publisher input that cannot become an envelope
│   ├── PayloadTooLarge              encoded event exceeds the server's max payload
│   └── UnknownDestination           publish(destination=...) names a peer not in DESTINATION_APP
├── MalformedEnvelope                a received message that is not a valid envelope
├── RejectMessage                    raised by a handler: dead-letter this message now
├── NatsError                        anything that went wrong talking to NATS
│   ├── NatsUnavailable              could not connect / connection lost / timed out
│   ├── AuthenticationFailed         server refused our credentials or certificate
│   └── JetStreamApiError            the JetStream API answered with an error code
│       └── StreamNotFound / ConsumerNotFound
├── PublishFailed                    a publish was not acknowledged by the stream
│   └── NoStreamForSubject           no stream captures the subject (the server said 503)
└── TopologyError                    stream/consumer provisioning could not converge

``jetstream_bridge.exceptions.ConfigurationError`` (Django's ``ImproperlyConfigured``) lives in
the Django layer because this package imports nothing from Django.
"""

from __future__ import annotations


class JetStreamBridgeError(Exception):
    """Root of every exception raised by jetstream-bridge."""


class InvalidEvent(JetStreamBridgeError, ValueError):
    """Publisher input cannot be turned into an envelope; nothing was written or sent."""


class PayloadTooLarge(InvalidEvent):
    """The encoded event is larger than the server accepts."""


class UnknownDestination(InvalidEvent):
    """``publish(destination=...)`` names a peer that is not in ``DESTINATION_APP``."""


class MalformedEnvelope(JetStreamBridgeError, ValueError):
    """A received message is not a valid envelope; it is dead-lettered, never retried."""


class RejectMessage(JetStreamBridgeError):
    """Raise from a handler to dead-letter the message at once instead of retrying it."""


class InvalidPayload(JetStreamBridgeError):
    """A payload does not validate against its handler's schema: dead-lettered as ``invalid``.

    ``errors`` lists ``{"loc": field, "msg": why}``; they quote hostile input.
    """

    def __init__(self, schema: str, errors: list[dict[str, str]]) -> None:
        summary = "; ".join(f"{e['loc'] or '(payload)'}: {e['msg']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"payload does not validate as {schema}: {summary}{more}")
        self.schema = schema
        self.errors = errors


class NatsError(JetStreamBridgeError):
    """Talking to NATS failed."""


class NatsUnavailable(NatsError):
    """NATS could not be reached in time, or the connection is gone."""


class AuthenticationFailed(NatsError):
    """The server refused the credentials or the TLS certificate."""


class JetStreamApiError(NatsError):
    """The JetStream API answered with an error.

    ``code`` is the HTTP-like status, ``err_code`` the JetStream error code (for example 10065
    for overlapping subjects), which is what callers should branch on.
    """

    def __init__(self, description: str, *, code: int = 0, err_code: int = 0) -> None:
        super().__init__(f"{description} (code={code}, err_code={err_code})")
        self.description = description
        self.code = code
        self.err_code = err_code


class StreamNotFound(JetStreamApiError):
    """The named stream does not exist."""


class ConsumerNotFound(JetStreamApiError):
    """The named consumer does not exist."""


class PublishFailed(JetStreamBridgeError):
    """A publish was not acknowledged by any stream."""


class NoStreamForSubject(PublishFailed):
    """No stream captures ``subject``: the server answered the publish with "no responders"."""

    def __init__(self, message: str, *, subject: str) -> None:
        super().__init__(message)
        self.subject = subject


class TopologyError(JetStreamBridgeError):
    """Stream or consumer provisioning failed."""


class UnknownPeer(JetStreamBridgeError, ValueError):
    """A peer was named (``--from``, ``Consumer(peers=...)``) that ``DESTINATION_APP`` lacks."""
