"""A user's project gets our pytest fixtures from the ``pytest11`` entry point alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SETTINGS = """
SECRET_KEY = "user-project"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "jetstream_bridge"]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
JETSTREAM_BRIDGE = {{"APP_NAME": "shop", "DESTINATION_APP": "billing", "ENV": "dev"}}
"""

TESTS = """
import pytest
from django.db import transaction

from jetstream_bridge import Publisher, ensure_topology
from jetstream_bridge.models import OutboxEvent
from jetstream_bridge.fast_path import fast_path


def place_order(number):
    with transaction.atomic():
        Publisher().publish(
            resource_type="order", event_type="created", payload={"id": number}
        )


@pytest.mark.django_db(transaction=True)
def test_placing_an_order_publishes_order_created(jetstream_capture):
    place_order(1)
    jetstream_capture.assert_published(resource_type="order", payload_contains={"id": 1})
    assert OutboxEvent.objects.get().status == "pending"


@pytest.mark.django_db(transaction=True)
def test_placing_an_order_reaches_a_real_stream(nats_server, jetstream_bridge):
    ensure_topology()
    place_order(2)
    assert fast_path().wait_idle()
    row = OutboxEvent.objects.get()
    assert (row.status, row.stream_seq) == ("sent", 1)
"""

# Our own suite's settings must not leak into the user's run.
OURS = (
    "DATABASE_URL",
    "DJANGO_SETTINGS_MODULE",
    "PYTHONPATH",
    "NATS_URLS",
    "NATS_ENV",
    "APP_NAME",
    "DESTINATION_APP",
    "JSB_TEST_OVERRIDES",
    "PYTEST_ADDOPTS",
)


@pytest.mark.nats
@pytest.mark.slow
def test_user_project__capture_and_real_server_fixtures_work_from_the_entry_point(
    tmp_path: Path,
) -> None:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "settings.py").write_text(SETTINGS.format(db=str(tmp_path / "db.sqlite3")))
    (tmp_path / "pytest.ini").write_text("[pytest]\nDJANGO_SETTINGS_MODULE = shop.settings\n")
    (tmp_path / "test_shop.py").write_text(textwrap.dedent(TESTS))
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
