"""Read ``settings.JETSTREAM_BRIDGE`` (with environment fallbacks) into a ``BridgeConfig``."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import environ
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .core.settings import BridgeConfig, Problem, parse_config
from .core.settings.schema import SETTINGS
from .exceptions import ConfigurationError

SETTING_NAME = "JETSTREAM_BRIDGE"


def raw_settings() -> object:
    """Return the settings dict merged with the environment fallbacks (``Setting.env``)."""
    value = getattr(settings, SETTING_NAME, {})
    if not isinstance(value, Mapping):
        return value
    merged: dict[str, Any] = dict(value)
    env = environ.Env()
    for setting in SETTINGS:
        variable = setting.env
        if variable is None or merged.get(setting.key) not in (None, ""):
            continue
        if env.str(variable, default=""):
            merged[setting.key] = env.list(variable) if setting.kind.is_list else env.str(variable)
    return merged


@functools.lru_cache(maxsize=1)
def parsed() -> tuple[BridgeConfig | None, list[Problem]]:
    """Parse once; cleared when the setting changes (``override_settings``)."""
    return parse_config(raw_settings())


def get_config() -> BridgeConfig:
    """Return the validated config or raise ``ConfigurationError`` listing every error."""
    config, problems = parsed()
    if config is None:
        raise ConfigurationError([p for p in problems if p.is_error])
    return config


def reload_config() -> None:
    """Forget the parsed settings (for example after changing environment variables)."""
    parsed.cache_clear()


@receiver(setting_changed)
def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        reload_config()
        from .runtime import retire_runtime

        # Publishes in flight finish on the old connection; new ones use the new settings.
        retire_runtime()
