"""The example project and the README's commands, run as a new user would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "example_project"


def run(
    args: list[str], *, env: dict[str, str] | None = None, cwd: Path = EXAMPLE, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "DATABASE_URL",
            "DJANGO_SETTINGS_MODULE",
            "DESTINATION_APP",
            "APP_NAME",
            "NATS_URLS",
            "NATS_ENV",
            "PYTHONDEVMODE",
        )
    }
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        args, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def test_demo__three_services_each_direction_exactly_once_and_one_in_the_dlq() -> None:
    result = run([sys.executable, "example_project/demo.py"], cwd=ROOT, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # (published from the sender's outbox, handled once by the receiver's inbox) per direction:
    # billing rejects the zero-total order, shipping ships it.
    assert "| orders -> billing  |                       6 |                    5 |" in out
    assert "| orders -> shipping |                       6 |                    6 |" in out
    assert "| billing -> orders  |                       5 |                    5 |" in out
    assert "| shipping -> orders |                       6 |                    6 |" in out
    # The one dead letter is the poison order's event, the id both peers received.
    poison = re.findall(r"placed order \w+ \(0\.00\) -> event (\S+)", out)
    letters = re.findall(r"^DLQ: event (\S+) reason=(\w+)", out, flags=re.M)
    assert len(poison) == 1, out
    assert letters == [(poison[0], "rejected")], out
    assert "OK: every event crossed exactly once" in out


def test_demo_requirements__are_the_bridge_dependencies_and_the_server_extra() -> None:
    # make demo installs example_project/requirements.txt instead of building the package.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {*project["dependencies"], *project["optional-dependencies"]["server"]}
    lines = (EXAMPLE / "requirements.txt").read_text().splitlines()
    listed = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert listed == wanted


def test_check_deploy__without_destination_app_reports_E003_and_fails(tmp_path: Path) -> None:
    env = {"DEMO_DATA_DIR": str(tmp_path)}
    result = run([sys.executable, "manage.py", "check", "--deploy"], env=env)
    assert result.returncode != 0
    assert "jetstream_bridge.E003" in result.stderr
    assert "HINT: Add 'DESTINATION_APP': 'billing'" in result.stderr
    # What an image build runs (migrate runs these checks) does not need the key.
    plain = run([sys.executable, "manage.py", "check"], env=env)
    assert plain.returncode == 0, plain.stderr
    assert "E003" not in plain.stdout + plain.stderr


def test_check__bad_token_reports_E004(tmp_path: Path) -> None:
    result = run(
        [sys.executable, "manage.py", "check"],
        env={"DEMO_DATA_DIR": str(tmp_path), "DESTINATION_APP": "bill.ing"},
    )
    assert result.returncode != 0
    assert "jetstream_bridge.E004" in result.stderr


def test_migrate__needs_no_nats_server(tmp_path: Path) -> None:
    env = {
        "DEMO_DATA_DIR": str(tmp_path),
        "DESTINATION_APP": "billing",
        "NATS_URLS": "nats://user:secret@127.0.0.1:1",
    }
    result = run([sys.executable, "manage.py", "migrate", "--no-input"], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Applying jetstream_bridge.0001" in result.stdout
    assert "secret" not in result.stdout + result.stderr


@pytest.mark.parametrize("settings_module", ["tests.settings"])
def test_migrations__models_and_migrations_agree(settings_module: str) -> None:
    result = run(
        [sys.executable, "-m", "django", "makemigrations", "--check", "--dry-run"],
        env={"DJANGO_SETTINGS_MODULE": settings_module},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("service", ["orders", "billing", "shipping"])
def test_migrations__example_project_has_none_missing(service: str, tmp_path: Path) -> None:
    result = run(
        [sys.executable, "manage.py", "makemigrations", "--check", "--dry-run"],
        env={"DEMO_DATA_DIR": str(tmp_path), "APP_NAME": service, "DESTINATION_APP": "peer"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_settings__unknown_service_says_which_ones_exist(tmp_path: Path) -> None:
    result = run(
        [sys.executable, "manage.py", "check"],
        env={"DEMO_DATA_DIR": str(tmp_path), "APP_NAME": "invoicing", "DESTINATION_APP": "orders"},
    )
    assert result.returncode != 0
    assert "APP_NAME must be one of orders, billing, shipping, not 'invoicing'" in result.stderr
