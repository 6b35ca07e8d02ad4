from __future__ import annotations

from argparse import ArgumentParser, ArgumentTypeError
from typing import Any

from django.core.management.base import CommandError

from ...conf import get_config
from ...core.retention import inbox_horizon_warning
from ...inbox import InboxStore
from ...outbox import OutboxStore
from ...purge import DEFAULT_BATCH_SIZE
from ..base import BridgeCommand, duration_arg
from ..render import purged_line

MAX_BATCH_SIZE = 10_000


def batch_size_arg(value: str) -> int:
    """A ``--batch-size``: a whole number of rows from 1 to ``MAX_BATCH_SIZE``."""
    try:
        size = int(value)
    except ValueError:
        size = 0
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise ArgumentTypeError(f"{value!r}: give a number of rows from 1 to {MAX_BATCH_SIZE}")
    return size


class Command(BridgeCommand):
    help = (
        "Delete old rows from the outbox (sent) and the inbox (processed; failed ones too with "
        "--include-failed), in batches of short transactions: for a cron job. See the "
        "README's Retention for how long to keep inbox rows."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--outbox-sent-after",
            type=duration_arg,
            metavar="AGE",
            help="delete outbox rows sent more than AGE ago (e.g. 7d)",
        )
        parser.add_argument(
            "--inbox-processed-after",
            type=duration_arg,
            metavar="AGE",
            help="delete inbox rows processed more than AGE ago (e.g. 30d)",
        )
        parser.add_argument(
            "--include-failed",
            action="store_true",
            help="also delete failed inbox rows received more than that AGE ago",
        )
        parser.add_argument("--consumer", help="only this durable's inbox rows")
        parser.add_argument(
            "--batch-size",
            type=batch_size_arg,
            default=DEFAULT_BATCH_SIZE,
            help=f"rows per DELETE, each its own transaction (default {DEFAULT_BATCH_SIZE})",
        )
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
        parser.add_argument(
            "--force",
            action="store_true",
            help="purge the inbox even with an age shorter than the bridge's own redelivery "
            "window (handlers of events that come back within it run again)",
        )
        parser.add_argument("--database", help="database alias of the tables")

    def run(self, **options: Any) -> None:
        sent_age, processed_age = options["outbox_sent_after"], options["inbox_processed_after"]
        if sent_age is None and processed_age is None:
            raise CommandError(
                "nothing to purge: give --outbox-sent-after AGE and/or --inbox-processed-after AGE"
            )
        if processed_age is None and (options["include_failed"] or options["consumer"]):
            raise CommandError("--include-failed and --consumer need --inbox-processed-after AGE")
        config = get_config()
        batch_size, dry_run = options["batch_size"], options["dry_run"]
        if sent_age is not None:
            store = OutboxStore(config, using=options["database"])
            purged = store.purge_sent(sent_age, batch_size=batch_size, dry_run=dry_run)
            self.stdout.write(purged_line("outbox", "sent", purged, sent_age))
        if processed_age is not None:
            warning = inbox_horizon_warning(processed_age, config.stream_max_age)
            if warning:
                self.stderr.write(f"warning: {warning}")
            inbox = InboxStore(config, using=options["database"])
            purged = inbox.purge_processed(
                processed_age,
                include_failed=options["include_failed"],
                consumer=options["consumer"],
                batch_size=batch_size,
                dry_run=dry_run,
                force=options["force"],
            )
            what = "processed or failed" if options["include_failed"] else "processed"
            self.stdout.write(purged_line("inbox", what, purged, processed_age))
