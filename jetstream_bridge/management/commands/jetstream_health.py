from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from typing import Any

from ...health import HEALTHY, UNREACHABLE, check
from ..base import EXIT_FAILED, EXIT_UNREACHABLE, BridgeCommand, duration_arg
from ..render import health_lines


class Command(BridgeCommand):
    help = (
        "Check NATS, JetStream, the stream, consumer lag, the outbox backlog and the DLQ. "
        "Exit 0 when healthy, 1 when unhealthy, 2 when NATS is unreachable."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument(
            "--durable",
            action="append",
            default=[],
            metavar="NAME",
            help="report this durable (repeatable; each must exist). Default: every durable "
            "reading this app's subject",
        )
        parser.add_argument(
            "--max-lag", type=int, help="unhealthy when a consumer has more unacked messages"
        )
        parser.add_argument(
            "--max-outbox-age",
            metavar="AGE",
            type=duration_arg,
            help="unhealthy when the oldest unsent outbox row is older (e.g. 10m)",
        )
        parser.add_argument(
            "--max-dlq", type=int, help="unhealthy when the DLQ holds more messages"
        )
        parser.add_argument(
            "--timeout", type=duration_arg, help="how long to wait for NATS (e.g. 5s)"
        )
        parser.add_argument("--database", help="database alias of the outbox")

    def run(self, **options: Any) -> None:
        report = check(
            options["durable"],
            max_consumer_lag=options["max_lag"],
            max_outbox_age=options["max_outbox_age"],
            max_dlq_depth=options["max_dlq"],
            timeout=options["timeout"],
            using=options["database"],
        )
        if options["json"]:
            self.stdout.write(json.dumps(report.to_dict(), indent=2))
        else:
            for line in health_lines(report):
                self.stdout.write(line)
        if report.status != HEALTHY:
            sys.exit(EXIT_UNREACHABLE if report.status == UNREACHABLE else EXIT_FAILED)
