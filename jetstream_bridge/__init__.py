"""jetstream-bridge: move domain events between Django services over NATS JetStream.

The public names are imported lazily so that ``import jetstream_bridge`` in settings or
``INSTALLED_APPS`` never touches the app registry, the database or the network.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Publisher": "jetstream_bridge.publisher",
    "PublishResult": "jetstream_bridge.publisher",
    "FanOutResult": "jetstream_bridge.publisher",
    "Consumer": "jetstream_bridge.consumer",
    "handler": "jetstream_bridge.handlers",
    "Registration": "jetstream_bridge.handlers",
    "MessageContext": "jetstream_bridge.context",
    "Invocation": "jetstream_bridge.context",
    "use": "jetstream_bridge.middleware",
    "InvalidPayload": "jetstream_bridge.core.errors",
    "ensure_topology": "jetstream_bridge.topology",
    "ensure_topology_async": "jetstream_bridge.topology",
    "get_config": "jetstream_bridge.conf",
    "RejectMessage": "jetstream_bridge.core.errors",
    "JetStreamBridgeError": "jetstream_bridge.core.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jetstream_bridge' has no attribute {name!r}")
    return getattr(import_module(module), name)
