"""Translate what the server and nats-py report into the bridge's own exceptions.

The rest of the bridge catches only ``jetstream_bridge.core.errors``; this module is where a
JetStream API error code or a nats-py exception becomes one of those.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import nats.errors

from ..core.errors import (
    AuthenticationFailed,
    ConsumerNotFound,
    JetStreamApiError,
    JetStreamBridgeError,
    NatsError,
    NatsUnavailable,
    NoStreamForSubject,
    PublishFailed,
    StreamNotFound,
)
from ..core.redaction import scrub

# JetStream API error codes (``err_code``) the adapter branches on.
ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
ERR_NO_MESSAGE_FOUND = 10037

# What the server says, in the text of a plain nats.errors.Error, when it refuses a login.
_REFUSED_LOGIN = ("authorization violation", "authentication expired", "authentication revoked")

# nats-py and socket errors that mean "the connection is not usable right now".
_CONNECTION_LOST = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    OSError,
)


def api_error(error: Mapping[str, Any]) -> JetStreamApiError:
    """Return the exception for the ``error`` object of a JetStream API answer."""
    err_code = int(error.get("err_code") or 0)
    kind: type[JetStreamApiError] = JetStreamApiError
    if err_code == ERR_STREAM_NOT_FOUND:
        kind = StreamNotFound
    elif err_code == ERR_CONSUMER_NOT_FOUND:
        kind = ConsumerNotFound
    return kind(
        str(error.get("description", "unknown error")),
        code=int(error.get("code") or 0),
        err_code=err_code,
    )


def is_refused_login(exc: BaseException) -> bool:
    """Tell whether an error reported while connecting means the server refused our login.

    During the first connect nats-py reports the server's "-ERR 'Authorization Violation'" as
    a plain nats.errors.Error, not AuthorizationError, and then retries forever: without the
    text check, wrong credentials looked like a dead server.
    """
    if isinstance(exc, (nats.errors.AuthorizationError, ssl.SSLError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, nats.errors.Error) and any(m in text for m in _REFUSED_LOGIN)


def translate(exc: BaseException, what: str, servers: str) -> JetStreamBridgeError | None:
    """Return our error for a nats-py (or socket) error during ``what``; None for others."""
    if isinstance(exc, nats.errors.NoRespondersError):
        return NatsError(f"{what}: no responders; is JetStream enabled on {servers}?")
    if isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError)):
        return NatsUnavailable(f"{what}: timed out talking to {servers}")
    if isinstance(exc, nats.errors.AuthorizationError):
        return AuthenticationFailed(f"{what}: authorization violation")
    if isinstance(exc, _CONNECTION_LOST):
        return NatsUnavailable(
            f"{what}: connection to {servers} unavailable ({type(exc).__name__})"
        )
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PublishFailed(f"{what}: message larger than the server's max payload")
    if isinstance(exc, nats.errors.Error):
        return NatsError(f"{what}: {scrub(str(exc))}")
    return None


def no_stream_for(subject: str) -> NoStreamForSubject:
    """Return the error for a publish that no stream captured."""
    return NoStreamForSubject(
        f"no stream captures subject {subject!r}; run `manage.py jetstream_ensure_topology`",
        subject=subject,
    )


@asynccontextmanager
async def translated(what: str, servers: str) -> AsyncIterator[None]:
    """Re-raise a nats-py error from the block as ours (``raise ... from exc``)."""
    try:
        yield
    except (JetStreamApiError, NatsError):
        raise
    except Exception as exc:
        ours = translate(exc, what, servers)
        if ours is None:
            raise
        raise ours from exc
