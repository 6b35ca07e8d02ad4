from __future__ import annotations

from django.apps import AppConfig


class JetStreamBridgeConfig(AppConfig):
    name = "jetstream_bridge"
    verbose_name = "JetStream bridge"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers checks and the setting_changed receiver; never connects or queries.
        from . import checks, conf  # noqa: F401
