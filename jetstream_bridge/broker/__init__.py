"""The broker adapter: the only package that imports nats-py.

Everything else in the bridge speaks to NATS through ``Connection`` (lifecycle, publishing,
pulling) and its ``jsm`` (JetStream management), and sees only our own exceptions
(``jetstream_bridge.core.errors``) and the typed views below.

- ``client``: ``Connection``, connecting, publishing, fetching, subscribing.
- ``options``: connect options (credentials, TLS) from the settings.
- ``tls``: ``GuardedClient``, which never sends ``CONNECT`` in plaintext when TLS is expected.
- ``errors``: JetStream API error codes and nats-py error translation.
- ``manager``: ``JetStreamManager``, one method per JetStream API call.
- ``publish``: reading publish acks; ``publish_many``'s ack window.
- ``pull``: the pull channel and ``Delivery`` with its ack verbs.
- ``types``: typed views of the server's answers (durations in seconds).
"""

from __future__ import annotations

from .client import Connection
from .manager import JetStreamManager
from .pull import Delivery
from .types import (
    AccountInfo,
    ConsumerConfig,
    ConsumerInfo,
    PubAck,
    SequenceInfo,
    ServerInfo,
    StoredMessage,
    StreamConfig,
    StreamInfo,
    StreamState,
)

__all__ = [
    "AccountInfo",
    "Connection",
    "ConsumerConfig",
    "ConsumerInfo",
    "Delivery",
    "JetStreamManager",
    "PubAck",
    "SequenceInfo",
    "ServerInfo",
    "StoredMessage",
    "StreamConfig",
    "StreamInfo",
    "StreamState",
]
