"""jetstream-bridge: move domain events between Django services over NATS JetStream."""

from __future__ import annotations

__version__ = "0.1.0"
