from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from ...consumer import Consumer
from ...handlers import load_handler
from ..base import WorkerCommand


class Command(WorkerCommand):
    help = (
        "Consume events sent to this app with a durable pull consumer. SIGTERM/SIGINT "
        "finish the batch in hand, settle it and exit 0. Waits for NATS at start-up "
        "unless --no-wait."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--durable", required=True, help="durable consumer name")
        parser.add_argument("--batch-size", type=int, default=25, help="messages per fetch")
        parser.add_argument(
            "--handler",
            help="dotted path of one handler for every event "
            "(default: handlers registered in <app>.jetstream_handlers)",
        )
        parser.add_argument("--max-messages", type=int, help="exit after this many messages")
        parser.add_argument(
            "--stop-when-idle",
            action="store_true",
            help="exit when no message arrives within --idle-timeout",
        )
        parser.add_argument(
            "--idle-timeout", type=float, default=1.0, help="seconds one fetch waits for messages"
        )
        parser.add_argument("--database", help="database alias of the inbox")

    def run(self, **options: Any) -> None:
        handler = load_handler(options["handler"]) if options["handler"] else None
        consumer = Consumer(
            durable_name=options["durable"],
            batch_size=options["batch_size"],
            handler=handler,
            using=options["database"],
            idle_timeout=options["idle_timeout"],
            max_messages=options["max_messages"],
            stop_when_idle=options["stop_when_idle"],
        )
        if not self.nats_ready(consumer.stop, options):
            return
        stats = consumer.run()
        self.stdout.write(
            f"processed {stats.processed}, duplicates {stats.duplicates}, retried "
            f"{stats.retried}, dead-lettered {stats.dead_lettered}"
        )
