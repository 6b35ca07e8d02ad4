from __future__ import annotations

import sys
from argparse import ArgumentParser
from typing import Any

from ...dlq_stream import MoveResult, move_dlq
from ...topology import ensure_topology
from ..base import EXIT_FAILED, BridgeCommand


class Command(BridgeCommand):
    help = (
        "Create or update the JetStream stream (and with --durable the pull consumer) so "
        "they match JETSTREAM_BRIDGE. Safe to run from many processes at once."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--durable", help="also ensure this durable pull consumer")
        parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        parser.add_argument(
            "--check",
            action="store_true",
            help="change nothing; exit 1 if the server differs, 0 if in sync, "
            "2 if NATS is unreachable",
        )
        parser.add_argument(
            "--move-dlq",
            action="store_true",
            help="move the dead letters from the events' stream to DLQ_STREAM_NAME "
            "(with --dry-run: print the steps)",
        )

    def run(self, **options: Any) -> None:
        dry_run = options["dry_run"] or options["check"]
        if options["move_dlq"]:
            self._show_move(move_dlq(dry_run=dry_run), dry_run=dry_run)
        report = ensure_topology(durable=options["durable"], dry_run=dry_run)
        mode = "plan (nothing changed)" if dry_run else "applied"
        self.stdout.write(f"stream {report.stream}: {mode}")
        for action in report.actions:
            style = self.style.WARNING if action.change else self.style.SUCCESS
            self.stdout.write("  " + style(str(action)))
        if report.consumer_stream:
            self.stdout.write(f"consumer bound to stream {report.consumer_stream}")
        if options["check"]:
            self.stdout.write("in sync" if report.in_sync else "differs from the settings")
            if not report.in_sync:
                sys.exit(EXIT_FAILED)

    def _show_move(self, result: MoveResult, *, dry_run: bool) -> None:
        mode = "plan (nothing changed)" if dry_run else "done"
        self.stdout.write(f"move dead letters {result.source} -> {result.target}: {mode}")
        for step in result.steps:
            self.stdout.write("  " + self.style.WARNING(step))
        if not dry_run:
            self.stdout.write(
                f"  copied {result.copied} dead letter(s), purged {result.purged} from "
                f"{result.source}"
            )
