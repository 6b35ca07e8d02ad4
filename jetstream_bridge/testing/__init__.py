"""Helpers for testing code that uses jetstream-bridge: an embedded server and a capture mode."""

from .server import NatsServer, find_nats_server

__all__ = ["NatsServer", "find_nats_server"]
