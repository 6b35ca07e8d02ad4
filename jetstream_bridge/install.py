"""What ``manage.py jetstream_install`` does: the Django counterpart of the gem's generators.

It checks that the app is installed, renders a commented ``JETSTREAM_BRIDGE`` settings block
(every key of the settings schema with the default its parser gives, so the two cannot drift),
writes it without clobbering a file the user changed, and applies the bridge's migrations.
Every step is idempotent and says whether it changed anything.
"""

from __future__ import annotations

import enum
import json
import logging
from pathlib import Path
from typing import Any

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

from .core.durations import format_duration
from .core.settings import BridgeConfig, parse_config
from .core.settings.schema import SETTINGS, Setting

logger = logging.getLogger(__name__)

APP_LABEL = "jetstream_bridge"


def is_installed() -> bool:
    """Tell whether ``jetstream_bridge`` is in ``INSTALLED_APPS`` (under any AppConfig path)."""
    return apps.is_installed(APP_LABEL)


def _literal(value: Any) -> str:
    """Render a default as Python source, durations the way a user writes them."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, float):
        return json.dumps(format_duration(value))
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _defaults() -> BridgeConfig:
    config, problems = parse_config({"DESTINATION_APP": "peer"})
    assert config is not None, problems
    return config


def settings_block() -> str:
    """Return a settings module defining ``JETSTREAM_BRIDGE`` with every key documented."""
    config = _defaults()
    lines = [
        '"""jetstream-bridge settings, written by `manage.py jetstream_install`.',
        "",
        "Import it from your settings module (`from .jetstream import JETSTREAM_BRIDGE`) or",
        "paste the dict there. Commented-out keys show their defaults; only DESTINATION_APP",
        "is required. Durations take '500ms', '30s', '5m', '1h', '7d' or seconds.",
        '"""',
        "",
        "JETSTREAM_BRIDGE = {",
    ]
    for setting in SETTINGS:
        lines.append(f"    # {_note(setting)}.")
        if setting.required:
            lines.append(f'    "{setting.key}": "",')
        else:
            value = getattr(config, setting.field)
            lines.append(f'    # "{setting.key}": {_literal(value)},')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _note(setting: Setting) -> str:
    """Return the comment above a key: its doc line and where else its value may come from."""
    note = setting.doc
    if setting.env:
        note += f"; ${setting.env} when left out"
    if setting.follows_env:
        note += "; the default follows ENV"
    if setting.secret:
        note += f"; read it from the environment, e.g. os.environ['NATS_{setting.key}']"
    return note


class WriteResult(enum.Enum):
    CREATED = "created"
    UNCHANGED = "unchanged"
    OVERWRITTEN = "overwritten"
    DIFFERS = "differs"  # left alone: it exists with other content and force was not given


def write_settings(path: Path, *, force: bool = False) -> WriteResult:
    """Write ``settings_block()`` to ``path``; never replace a different file without ``force``."""
    text = settings_block()
    if path.exists():
        if path.read_text(encoding="utf-8") == text:
            return WriteResult.UNCHANGED
        if not force:
            return WriteResult.DIFFERS
        path.write_text(text, encoding="utf-8")
        logger.info("overwrote %s", path, extra={"path": str(path)})
        return WriteResult.OVERWRITTEN
    path.write_text(text, encoding="utf-8")
    logger.info("wrote %s", path, extra={"path": str(path)})
    return WriteResult.CREATED


def pending_migrations(using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Return the bridge's migrations (and their dependencies) not yet applied on ``using``."""
    executor = MigrationExecutor(connections[using])
    targets = [node for node in executor.loader.graph.leaf_nodes() if node[0] == APP_LABEL]
    plan = executor.migration_plan(targets)
    return [f"{migration.app_label}.{migration.name}" for migration, _ in plan]
