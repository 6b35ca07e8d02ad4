from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import CommandError

from ...conf import get_config
from ...consumer import Consumer
from ...core.retention import inbox_horizon_warning
from ...core.topology_plan import peer_durables
from ...handlers import load_handler
from ...inbox import InboxStore
from ..base import WorkerCommand, duration_arg
from ..render import purged_line


class Command(WorkerCommand):
    help = (
        "Consume events sent to this app by every peer in DESTINATION_APP (or those named "
        "with --from), one durable per peer: the first peer's is --durable, every other "
        "peer's --durable-PEER. SIGTERM/SIGINT finish the batches in hand, settle them and "
        "exit 0. Waits for NATS at start-up unless --no-wait."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--durable", required=True, help="durable consumer name")
        parser.add_argument(
            "--from",
            dest="peers",
            action="append",
            metavar="PEER",
            help="consume only what PEER sends (repeatable; default: every DESTINATION_APP)",
        )
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
        parser.add_argument(
            "--purge-processed-after",
            type=duration_arg,
            metavar="AGE",
            help="delete this durable's inbox rows processed more than AGE ago (e.g. 30d), "
            "then consume",
        )
        parser.add_argument(
            "--purge-failed",
            action="store_true",
            help="with --purge-processed-after, also its failed rows received more than AGE ago",
        )

    def run(self, **options: Any) -> None:
        age = options["purge_processed_after"]
        if options["purge_failed"] and age is None:
            raise CommandError("--purge-failed needs --purge-processed-after AGE")
        if age is not None:
            self._purge(age, options)
        handler = load_handler(options["handler"]) if options["handler"] else None
        consumer = Consumer(
            durable_name=options["durable"],
            batch_size=options["batch_size"],
            handler=handler,
            using=options["database"],
            idle_timeout=options["idle_timeout"],
            max_messages=options["max_messages"],
            stop_when_idle=options["stop_when_idle"],
            peers=options["peers"],
        )
        if not self.nats_ready(consumer.stop, options):
            return
        stats = consumer.run()
        self.stdout.write(
            f"processed {stats.processed}, duplicates {stats.duplicates}, retried "
            f"{stats.retried}, dead-lettered {stats.dead_lettered}"
        )

    def _purge(self, age: float, options: dict[str, Any]) -> None:
        config = get_config()
        warning = inbox_horizon_warning(age, config.stream_max_age)
        if warning:
            self.stderr.write(f"warning: {warning}")
        store = InboxStore(config, using=options["database"])
        what = "processed or failed" if options["purge_failed"] else "processed"
        durables = peer_durables(config, options["durable"], options["peers"]).values()
        for durable in durables:
            purged = store.purge_processed(
                age, include_failed=options["purge_failed"], consumer=durable
            )
            table = "inbox" if len(durables) == 1 else f"inbox ({durable})"
            self.stdout.write(purged_line(table, what, purged, age))
