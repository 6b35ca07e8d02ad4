"""Helpers for testing code that uses jetstream-bridge.

An embedded server (``server``), an in-memory capture of what is published (``capture``),
broker-free delivery to handlers (``deliver``) and the pytest fixtures around them
(``pytest_plugin``, loaded through the ``pytest11`` entry point).
"""

from .server import NatsServer, find_nats_server

__all__ = ["NatsServer", "find_nats_server"]
