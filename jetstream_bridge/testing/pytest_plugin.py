"""pytest plugin shipped with jetstream-bridge (registered through the ``pytest11`` entry point).

Fixtures:

``nats_server``
    A real JetStream server for the test session: the embedded ``nats-server`` binary on a free
    port with a temporary store (default), a Docker container through testcontainers
    (``JSB_NATS_PROVIDER=docker``, or automatically when no binary is installed but a Docker
    engine answers), or an external server (``JSB_NATS_URL=nats://host:4222``).
``jetstream_bridge``
    Points ``settings.JETSTREAM_BRIDGE`` at that server with a unique ``ENV`` token per test,
    so streams never leak between tests. Needs pytest-django's ``settings`` fixture.
``jetstream_capture``
    Captures what ``Publisher`` publishes instead of sending it (no broker needed); see
    ``jetstream_bridge.testing.capture``. Events are captured on commit: combine it with
    ``django_db(transaction=True)`` or ``django_capture_on_commit_callbacks(execute=True)``.
``jetstream_deliver``
    ``deliver(envelope, handler=None, *, deliveries=1)``: run a handler the way the consumer
    would, inbox row included, without a broker; see ``jetstream_bridge.testing.deliver``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .capture import Capture
    from .deliver import DeliveryResult


@dataclass
class ExternalServer:
    url: str

    def stop(self, **_: Any) -> None:
        raise RuntimeError("an external nats-server cannot be stopped by the tests")

    start = restart = stop


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def nats_server() -> Iterator[Any]:
    external = os.environ.get("JSB_NATS_URL")
    if external:
        yield ExternalServer(external)
        return
    from .server import NatsServer, ServerNotFound, find_nats_server

    provider = os.environ.get("JSB_NATS_PROVIDER", "")
    if not provider:
        try:
            find_nats_server()
            provider = "embedded"
        except ServerNotFound:
            provider = "docker" if _docker_available() else "embedded"
    if provider == "docker":
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = DockerContainer("nats:2.11-alpine").with_command("-js").with_exposed_ports(4222)
        with container:
            wait_for_logs(container, "Server is ready", timeout=30)
            host = container.get_container_host_ip()
            yield ExternalServer(f"nats://{host}:{container.get_exposed_port(4222)}")
        return
    server = NatsServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def jetstream_bridge(nats_server: Any, settings: Any) -> Iterator[Any]:
    """Configure the bridge for this test against ``nats_server``; yield the config."""
    from jetstream_bridge.conf import get_config

    base = dict(getattr(settings, "JETSTREAM_BRIDGE", {}) or {})
    base["NATS_URLS"] = [nats_server.url]
    base["ENV"] = f"t{uuid.uuid4().hex[:10]}"
    settings.JETSTREAM_BRIDGE = base
    yield get_config()
    from jetstream_bridge.runtime import reset_runtime

    reset_runtime()


@pytest.fixture
def jetstream_capture() -> Iterator[Capture]:
    """Capture published events in memory for this test; yield the ``Capture``."""
    from .capture import capture_published

    with capture_published() as capture:
        yield capture


@pytest.fixture
def jetstream_deliver() -> Callable[..., DeliveryResult]:
    """Return ``deliver(envelope, handler=None, **options)`` (the database fixture is yours)."""
    from .deliver import deliver

    return deliver
