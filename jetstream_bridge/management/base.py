"""What every jetstream-bridge command shares: error -> exit code mapping."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from ..core.errors import AuthenticationFailed, JetStreamBridgeError, NatsUnavailable
from ..exceptions import ConfigurationError

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2


class BridgeCommand(BaseCommand):
    """Run ``run()`` and turn the bridge's exceptions into one-line errors with exit codes."""

    requires_system_checks: list[str] = []  # checks run in run() only when they matter

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            self.run(**options)
        except (NatsUnavailable, AuthenticationFailed) as exc:
            raise CommandError(str(exc), returncode=EXIT_UNREACHABLE) from exc
        except ConfigurationError as exc:
            raise CommandError(str(exc), returncode=EXIT_FAILED) from exc
        except JetStreamBridgeError as exc:
            raise CommandError(f"{type(exc).__name__}: {exc}", returncode=EXIT_FAILED) from exc

    def run(self, **options: Any) -> None:
        raise NotImplementedError
