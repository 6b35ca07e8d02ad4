from __future__ import annotations

import sys
from argparse import ArgumentParser
from typing import Any

from ...dlq_stream import MoveResult, move_dlq
from ...topology import ensure_topology
from ..base import EXIT_FAILED, BridgeCommand
from ..render import printable


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
            help="change nothing; exit 1 if the server differs (subjects, stream limits, "
            "consumer, or a warning below), 0 if in sync, 2 if NATS is unreachable",
        )
        parser.add_argument(
            "--take-over",
            action="store_true",
            help="apply the stream limits this app sets even where another app enforces "
            "another value (recorded in the stream's metadata); this app becomes their owner",
        )
        parser.add_argument(
            "--allow-discard",
            action="store_true",
            help="apply a smaller STREAM_MAX_BYTES or STREAM_MAX_AGE even though the server "
            "then deletes the stored messages beyond it at once (held back otherwise)",
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
        report = ensure_topology(
            durable=options["durable"],
            dry_run=dry_run,
            take_over=options["take_over"],
            allow_discard=options["allow_discard"],
        )
        mode = "plan (nothing changed)" if dry_run else "applied"
        # Stream names and subjects come from the server, where anyone may have named them.
        self.stdout.write(f"stream {printable(report.stream)}: {mode}")
        for action in report.actions:
            style = self.style.WARNING if action.change else self.style.SUCCESS
            self.stdout.write("  " + style(printable(str(action))))
        if report.consumer_stream:
            self.stdout.write(f"consumer bound to stream {printable(report.consumer_stream)}")
        for warning in report.warnings:
            self.stdout.write(self.style.WARNING(f"warning: {printable(warning)}"))
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
