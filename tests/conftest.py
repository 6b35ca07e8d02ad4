from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_config() -> Iterator[None]:
    from jetstream_bridge.conf import reload_config

    reload_config()
    yield
    reload_config()


@pytest.fixture(autouse=True)
def _close_async_view_connections() -> Iterator[None]:
    """Close the DB connection Django's test client leaves open in asgiref's sync thread."""
    yield
    import asyncio

    from asgiref.sync import sync_to_async
    from django.db import connections

    asyncio.run(sync_to_async(connections.close_all)())


@pytest.fixture
def is_postgres() -> bool:
    return connection.vendor == "postgresql"


@pytest.fixture
def subprocess_env(nats_server, jetstream_bridge) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Environment for worker subprocesses: same settings, test database, NATS and ENV."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["PYTHONPATH"] = str(ROOT)
    env["NATS_URLS"] = ",".join(settings.JETSTREAM_BRIDGE.get("NATS_URLS") or [nats_server.url])
    env["NATS_ENV"] = jetstream_bridge.env
    # Whatever the test set in settings.JETSTREAM_BRIDGE before requesting this fixture.
    # NATS_URLS and ENV travel as environment variables so a test can point one
    # subprocess elsewhere (an unreachable server, another env).
    overrides = {
        k: v for k, v in settings.JETSTREAM_BRIDGE.items() if k not in ("NATS_URLS", "ENV")
    }
    env["JSB_TEST_OVERRIDES"] = json.dumps(overrides)
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        scheme = "mysql" if db["ENGINE"].endswith("mysql") else "postgres"
        user = db.get("USER") or ""
        host = db.get("HOST") or "127.0.0.1"
        port = db.get("PORT") or (3306 if scheme == "mysql" else 5432)
        env["DATABASE_URL"] = f"{scheme}://{user}@{host}:{port}/{db['NAME']}"
    env.pop("PYTHONDEVMODE", None)
    return env


def manage_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "django", *args]
