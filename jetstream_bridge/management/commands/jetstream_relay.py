from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from ...core.durations import parse_duration
from ...outbox import OutboxStore
from ...relay import Relay
from ..base import WorkerCommand


class Command(WorkerCommand):
    help = (
        "Publish outbox rows the fast path did not send. Several relays may run at once; "
        "SIGTERM finishes the batch in hand and exits. Waits for NATS at start-up unless "
        "--no-wait."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--once", action="store_true", help="drain what is due, then exit")
        parser.add_argument("--batch-size", type=int, help="rows per claim (RELAY_BATCH_SIZE)")
        parser.add_argument(
            "--max-in-flight", type=int, default=256, help="publishes awaiting their ack at once"
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=2,
            help="batches in hand at once, each in its own transaction (PostgreSQL, MySQL); "
            "SQLite always uses 1",
        )
        parser.add_argument("--database", help="database alias of the outbox")
        parser.add_argument(
            "--purge-sent-after",
            metavar="AGE",
            help="delete sent rows older than AGE (e.g. 7d), then continue",
        )

    def run(self, **options: Any) -> None:
        if options["purge_sent_after"]:
            from ...conf import get_config

            age = parse_duration(options["purge_sent_after"])
            store = OutboxStore(get_config(), using=options["database"])
            purged = store.purge_sent(age)
            self.stdout.write(
                f"purged {purged.rows} sent row(s) older than {options['purge_sent_after']}"
            )
        relay = Relay(
            using=options["database"],
            batch_size=options["batch_size"],
            max_in_flight=options["max_in_flight"],
            workers=options["workers"],
        )
        if not self.nats_ready(relay.stop, options):
            return
        stats = relay.run(once=options["once"])
        self.stdout.write(
            f"relayed {stats.sent} event(s), {stats.failed} failed, {stats.rate:.0f}/s"
        )
