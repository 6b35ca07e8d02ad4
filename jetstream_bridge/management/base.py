"""What every jetstream-bridge command shares: error -> exit code mapping."""

from __future__ import annotations

import signal
import threading
from argparse import ArgumentParser, ArgumentTypeError
from collections.abc import Sequence
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from ..core.durations import parse_duration
from ..core.errors import AuthenticationFailed, JetStreamBridgeError, NatsUnavailable
from ..exceptions import ConfigurationError
from ..runtime import connect_or_wait

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


class WorkerCommand(BridgeCommand):
    """A long-running worker: waits for NATS at start-up unless ``--no-wait``."""

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--no-wait",
            action="store_true",
            help="exit 2 at once when NATS is unreachable at start-up instead of waiting "
            "for it (retrying with backoff from 1s to 30s)",
        )

    def nats_ready(self, stop: threading.Event, options: dict[str, Any]) -> bool:
        """Connect (waiting unless ``--no-wait``); ``False``: stopped by a signal meanwhile."""
        stop_on_signals(stop)
        if connect_or_wait(stop, wait=not options["no_wait"]):
            return True
        self.stdout.write("stopped while waiting for NATS")
        return False


def stop_on_signals(stop: threading.Event) -> None:
    """Make SIGTERM and SIGINT set ``stop`` (a clean exit) instead of interrupting."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def render_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Align ``rows`` (the first is the header) in columns; the last column is not padded."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in rows
    ]


def duration_arg(value: str) -> float:
    """Parse a command-line duration (``90``, ``30s``, ``10m``, ``2h``, ``7d``) into seconds."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ArgumentTypeError(str(exc)) from None
