"""TEMPORARY: the old home of the broker adapter, kept while other branches still import it.

Import from ``jetstream_bridge.broker`` (and ``scrub`` from ``jetstream_bridge.core.redaction``)
instead; this module goes away once every branch has moved.
"""

from __future__ import annotations

from .broker import Connection, Delivery, PubAck, ServerInfo, StoredMessage
from .core.redaction import scrub

__all__ = ["Connection", "Delivery", "PubAck", "ServerInfo", "StoredMessage", "scrub"]
