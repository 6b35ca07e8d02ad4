"""``manage.py jetstream_install``: settings block, idempotent write, migrations, app check."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.db import connection

from jetstream_bridge.core.settings import parse_config
from jetstream_bridge.core.settings.schema import KNOWN_KEYS
from jetstream_bridge.install import pending_migrations, settings_block
from tests.helpers import manage


def run_install(*args: str) -> str:
    out = io.StringIO()
    call_command("jetstream_install", *args, stdout=out)
    return out.getvalue()


def uncommented(block: str) -> dict[str, Any]:
    """Execute the block with every commented-out key switched on."""
    lines = [
        line.replace('# "', '"', 1) if line.lstrip().startswith('# "') else line
        for line in block.splitlines()
    ]
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), namespace)
    return dict(namespace["JETSTREAM_BRIDGE"])


def test_install__settings_block_documents_every_key_with_its_real_default() -> None:
    block = settings_block()
    for key in KNOWN_KEYS:
        assert f'"{key}":' in block, key
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    assert namespace["JETSTREAM_BRIDGE"] == {"DESTINATION_APP": ""}
    everything = uncommented(block)
    assert set(everything) == set(KNOWN_KEYS)
    everything["DESTINATION_APP"] = "billing"
    config, problems = parse_config(everything)
    defaults, _ = parse_config({"DESTINATION_APP": "billing"})
    assert problems == []
    assert config is not None
    # Same values; only which keys were written differs (every one, here).
    assert dataclasses.replace(config, explicit=frozenset()) == dataclasses.replace(
        defaults, explicit=frozenset()
    )


@pytest.mark.django_db(transaction=True)
def test_install__prints_the_block_from_the_command_line(subprocess_env: dict[str, str]) -> None:
    result = manage("jetstream_install", env=subprocess_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == settings_block()


def test_install__write_is_idempotent_and_never_clobbers_a_changed_file(tmp_path: Path) -> None:
    target = tmp_path / "jetstream.py"
    assert run_install("--write", str(target)).startswith(f"settings: wrote {target}")
    assert target.read_text() == settings_block()
    written = target.stat().st_mtime_ns

    again = run_install("--write", str(target))
    assert again == f"settings: {target} is up to date; unchanged\n"
    assert target.stat().st_mtime_ns == written

    edited = settings_block().replace('"DESTINATION_APP": ""', '"DESTINATION_APP": "billing"')
    target.write_text(edited)
    with pytest.raises(CommandError, match="exists and differs"):
        run_install("--write", str(target))
    assert target.read_text() == edited

    assert run_install("--write", str(target), "--force").startswith("settings: overwrote")
    assert target.read_text() == settings_block()


@pytest.mark.django_db(transaction=True)
def test_install__migrate_applies_what_is_missing_then_says_up_to_date(tmp_path: Path) -> None:
    call_command("migrate", "jetstream_bridge", "zero", verbosity=0)
    try:
        assert "jetstream_outbox_events" not in connection.introspection.table_names()
        pending = pending_migrations()
        assert pending
        assert all(name.startswith("jetstream_bridge.") for name in pending)

        first = run_install("--migrate", "--write", str(tmp_path / "jetstream.py"))
        assert f"migrations: applied {', '.join(pending)}" in first
        assert "jetstream_outbox_events" in connection.introspection.table_names()
        assert pending_migrations() == []

        second = run_install("--migrate", "--write", str(tmp_path / "jetstream.py"))
        assert "migrations: jetstream_bridge is up to date; nothing applied" in second
        assert "is up to date; unchanged" in second
    finally:
        call_command("migrate", "jetstream_bridge", verbosity=0)


def test_install__refuses_when_the_app_is_not_installed(settings: Any) -> None:
    # Django lists a command only for installed apps, so load the class directly, as a
    # project that imports it (or a stale INSTALLED_APPS) would.
    command = load_command_class("jetstream_bridge", "jetstream_install")
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app != "jetstream_bridge"]
    with pytest.raises(CommandError, match="'jetstream_bridge' is not in INSTALLED_APPS"):
        call_command(command, stdout=io.StringIO())
