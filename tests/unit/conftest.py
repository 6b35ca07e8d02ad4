"""Fixtures for unit tests that publish with no broker: settings aimed at a closed port."""

from __future__ import annotations

from typing import Any

import pytest

UNREACHABLE = "nats://127.0.0.1:9"  # nothing listens there: any connect attempt fails fast


@pytest.fixture
def bridge(settings: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "NATS_URLS": [UNREACHABLE],
        "ENV": "unit",
        "CONNECT_TIMEOUT": "200ms",
    }
    from jetstream_bridge.conf import get_config

    return get_config()


@pytest.fixture
def no_outbox(bridge: Any, settings: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_OUTBOX": False}
    from jetstream_bridge.conf import get_config

    return get_config()
