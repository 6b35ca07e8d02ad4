"""Publish numbered events through the outbox, in transactions, for the chaos tests.

Event ids are ``{tag}-{n:06d}`` so a test knows the exact set it must find at the far end.
A transaction that fails on a database error is retried with the same ids: a commit whose
answer was lost shows up as duplicates the outbox ignores, never as a second event.
"""

from __future__ import annotations

import time
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand
from django.db import DatabaseError, close_old_connections, connection, transaction

from jetstream_bridge import Publisher
from jetstream_bridge.fast_path import fast_path


class Command(BaseCommand):
    help = "Publish --count events through the outbox in transactions of --batch events."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--count", type=int, required=True)
        parser.add_argument("--tag", required=True, help="event id prefix, unique per producer")
        parser.add_argument("--batch", type=int, default=50, help="events per transaction")
        parser.add_argument("--start", type=int, default=0)

    def handle(self, *args: Any, **options: Any) -> None:
        publisher = Publisher()
        tag, count, batch = options["tag"], options["count"], options["batch"]
        retries = 0
        for first in range(options["start"], options["start"] + count, batch):
            numbers = range(first, min(first + batch, options["start"] + count))
            while True:
                try:
                    with transaction.atomic():
                        for n in numbers:
                            publisher.publish(
                                resource_type="chaos",
                                event_type="created",
                                payload={"id": f"{tag}-{n}", "n": n},
                                event_id=f"{tag}-{n:06d}",
                            )
                    break
                except DatabaseError as exc:
                    retries += 1
                    self.stderr.write(f"transaction failed, retrying: {exc}")
                    connection.close()
                    close_old_connections()
                    time.sleep(min(0.1 * retries, 2.0))
        # Let the fast path record what it sent; whatever it could not is the relay's job.
        idle = fast_path().wait_idle(timeout=120)
        self.stdout.write(f"produced {count} event(s) as {tag}; retries {retries}; idle {idle}")
