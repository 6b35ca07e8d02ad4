"""One benchmark scenario per process: ``python -m benchmarks.scenarios NAME [--count N] ...``.

The harness starts each run in a fresh process (so RSS, caches and connections start cold
and equal) and reads the JSON object printed on the last line of stdout. Everything talks to
the nats-server named by ``NATS_URLS`` and the database named by ``DATABASE_URL``; every run
starts from an empty stream and empty tables.

Producer-side runs are configured as app ``alpha`` sending to ``beta``; consumer-side runs as
``beta``, which consumes ``{env}.data.sync.alpha.beta``: the same subject either way.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import nats

from jetstream_bridge.broker import Connection
from jetstream_bridge.core.envelope import MSG_ID_HEADER, build_envelope, encode, new_event_id
from jetstream_bridge.core.settings import BridgeConfig, parse_config
from jetstream_bridge.topology import ensure_topology_async

T = TypeVar("T")

NATS_URL = os.environ.get("NATS_URLS", "nats://127.0.0.1:4222")
ENV = os.environ.get("NATS_ENV", "bench")
SUBJECT = f"{ENV}.data.sync.alpha.beta"
PAYLOAD_BYTES = 1024  # size of the whole envelope on the wire
MAX_IN_FLIGHT = 256  # the relay's default --max-in-flight; the pipelined baseline uses it too
_ID_PLACEHOLDER = "00000000-0000-7000-8000-000000000000"


# -- payloads -----------------------------------------------------------------------------------


def sample_payload(i: int, padding: int = 0) -> dict[str, Any]:
    """An order-like document; ``padding`` characters of note bring the envelope to ~1 KB."""
    return {
        "id": i,
        "number": f"SO-{i:08d}",
        "customer": {"id": 1000 + i % 97, "name": "Ada Lovelace", "tier": "gold"},
        "lines": [
            {"sku": f"SKU-{n:05d}", "qty": 1 + n, "price_cents": 1999 + 100 * n} for n in range(4)
        ],
        "currency": "EUR",
        "total_cents": 12345,
        "note": "x" * padding,
    }


def _envelope(i: int, padding: int, event_id: str | None = None) -> dict[str, Any]:
    return build_envelope(
        producer="alpha",
        resource_type="order",
        event_type="created",
        payload=sample_payload(i, padding),
        event_id=event_id,
    )


def _padding() -> int:
    return max(0, PAYLOAD_BYTES - len(encode(_envelope(0, 0, _ID_PLACEHOLDER))))


PADDING = _padding()


def payload(i: int) -> dict[str, Any]:
    """The ``payload`` argument of ``publish()``: its envelope is ~1 KB of JSON."""
    return sample_payload(i, PADDING)


def bodies(count: int) -> list[tuple[bytes, str]]:
    """``count`` distinct ~1 KB envelopes with their event ids (built before any timing)."""
    template = encode(_envelope(0, PADDING, _ID_PLACEHOLDER))
    marker = _ID_PLACEHOLDER.encode()
    out = []
    for _ in range(count):
        event_id = new_event_id()
        out.append((template.replace(marker, event_id.encode()), event_id))
    return out


# -- helpers ------------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def bridge_config(app: str = "alpha", destination: str = "beta") -> BridgeConfig:
    config, problems = parse_config(
        {"NATS_URLS": NATS_URL, "ENV": ENV, "APP_NAME": app, "DESTINATION_APP": destination}
    )
    if config is None:
        raise SystemExit(f"bad benchmark config: {problems}")
    return config


async def fresh_stream(config: BridgeConfig) -> str:
    """Delete the bridge's stream if present and create it again, empty, as the bridge would."""
    conn = Connection(config)
    try:
        await conn.connect()
        if await conn.jsm.stream_info(config.stream_name) is not None:
            await conn.jsm.delete_stream(config.stream_name)
        await ensure_topology_async(conn, config)
    finally:
        await conn.close()
    return config.stream_name


async def stream_messages(config: BridgeConfig) -> int:
    conn = Connection(config)
    try:
        info = await conn.jsm.stream_info(config.stream_name)
    finally:
        await conn.close()
    return info.state.messages if info else 0


async def prefill(count: int) -> None:
    """Fill the stream with ``count`` envelopes, pipelined (not timed)."""
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream(publish_async_max_pending=MAX_IN_FLIGHT)
        futures = [
            await js.publish_async(SUBJECT, body, headers={MSG_ID_HEADER: event_id})
            for body, event_id in bodies(count)
        ]
        await asyncio.gather(*futures)
    finally:
        await nc.close()


def setup_django(app: str, destination: str, **env: str) -> None:
    os.environ.update(APP_NAME=app, DESTINATION_APP=destination, NATS_URLS=NATS_URL, **env)
    os.environ["NATS_ENV"] = ENV
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()


def reset_tables() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE jetstream_outbox_events, jetstream_inbox_events, "
            "benchmarks_handledevent, benchmarks_order RESTART IDENTITY"
        )


HISTORY = 20_000  # rows already in the inbox and the handler's table when a consumer starts


def add_history(consumer: str, rows: int = HISTORY) -> None:
    """Give the consumer's tables a past, as in production, with current statistics.

    Without it every run started from empty tables whose statistics said so, and the planner's
    choices drifted as the run filled them (the inbox lookup got slower batch by batch).
    """
    from django.db import connection

    body = encode(_envelope(0, PADDING)).decode()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO jetstream_inbox_events (consumer, event_id, subject, payload, headers, "
            "event_type, resource_type, stream, stream_seq, deliveries, status, received_at, "
            "processed_at, created_at, updated_at) SELECT %s, 'history-' || g, %s, %s::jsonb, "
            "'{}'::jsonb, 'created', 'order', 'history', g, 1, 'processed', now(), now(), now(), "
            "now() FROM generate_series(1, %s) AS g",
            [consumer, SUBJECT, body, rows],
        )
        cursor.execute(
            "INSERT INTO benchmarks_handledevent (event_id, source, started_at) "
            "SELECT 'history-' || g, 'history', 0 FROM generate_series(1, %s) AS g",
            [rows],
        )
        cursor.execute("ANALYZE jetstream_inbox_events, benchmarks_handledevent")


ROWS_SQL = "SELECT count(*) FROM benchmarks_handledevent WHERE source <> 'history'"
INBOX_SQL = (
    "SELECT count(*) FROM jetstream_inbox_events WHERE status = 'processed' AND stream <> 'history'"
)


def table_count(sql: str) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql)
        return int(cursor.fetchone()[0])


def django_env(app: str, destination: str) -> dict[str, str]:
    """Environment of a Django worker subprocess (``python -m django ...``)."""
    env = dict(os.environ)
    env.update(APP_NAME=app, DESTINATION_APP=destination, NATS_URLS=NATS_URL, NATS_ENV=ENV)
    env["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    return env


# -- baselines: raw nats-py ---------------------------------------------------------------------


def raw_publish_serial(count: int) -> dict[str, Any]:
    """nats-py ``js.publish`` awaited one by one (a request/ack round trip each)."""
    run(fresh_stream(bridge_config()))
    items = bodies(count)

    async def main() -> dict[str, Any]:
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            latencies = []
            started = time.perf_counter()
            for body, event_id in items:
                sent = time.perf_counter()
                await js.publish(SUBJECT, body, headers={MSG_ID_HEADER: event_id})
                latencies.append(time.perf_counter() - sent)
            elapsed = time.perf_counter() - started
        finally:
            await nc.close()
        return {"rate": count / elapsed, "p50_ms": percentile(latencies, 50) * 1e3}

    result = run(main())
    result["stored"] = run(stream_messages(bridge_config()))
    return result


def raw_publish_pipelined(count: int) -> dict[str, Any]:
    """nats-py ``js.publish_async`` with at most ``MAX_IN_FLIGHT`` acks outstanding."""
    run(fresh_stream(bridge_config()))
    items = bodies(count)

    async def main() -> float:
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream(publish_async_max_pending=MAX_IN_FLIGHT)
            started = time.perf_counter()
            futures = [
                await js.publish_async(SUBJECT, body, headers={MSG_ID_HEADER: event_id})
                for body, event_id in items
            ]
            await js.publish_async_completed()
            elapsed = time.perf_counter() - started
            await asyncio.gather(*futures)  # raise if any publish was refused
        finally:
            await nc.close()
        return elapsed

    elapsed = run(main())
    return {"rate": count / elapsed, "stored": run(stream_messages(bridge_config()))}


def raw_fetch_ack(count: int, batch: int = 100) -> dict[str, Any]:
    """nats-py durable pull consumer: ``fetch(batch)`` then ``ack()`` each message."""
    config = bridge_config("beta", "alpha")
    stream = run(fresh_stream(config))
    run(prefill(count))

    async def main() -> float:
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            sub = await js.pull_subscribe(SUBJECT, durable="bench-raw", stream=stream)
            done = 0
            started = time.perf_counter()
            while done < count:
                msgs = await sub.fetch(min(batch, count - done), timeout=5)
                for msg in msgs:
                    await msg.ack()
                done += len(msgs)
            await nc.flush()
            return time.perf_counter() - started
        finally:
            await nc.close()

    elapsed = run(main())
    return {"rate": count / elapsed}


# -- baseline: FastStream -----------------------------------------------------------------------


def faststream_consume(count: int, batch: int) -> dict[str, Any]:
    """FastStream's JetStream pull subscriber writing one row per event in its own transaction.

    Written as a FastStream user would: the handler takes the decoded JSON body and calls a
    Django ORM function through ``sync_to_async``; FastStream acks after the handler returns.
    """
    setup_django("beta", "alpha")
    import logging

    from asgiref.sync import sync_to_async
    from faststream import AckPolicy
    from faststream.nats import JStream, NatsBroker, PullSub

    from .handlers import write_row_once

    config = bridge_config("beta", "alpha")
    stream = run(fresh_stream(config))
    reset_tables()
    add_history(f"bench-fs-{batch}")
    run(prefill(count))
    write = sync_to_async(write_row_once)

    async def main() -> float:
        # Per-message log lines at DEBUG (filtered), like the bridge, which logs none.
        broker = NatsBroker(NATS_URL, log_level=logging.DEBUG)
        done = asyncio.Event()
        handled = 0

        @broker.subscriber(
            SUBJECT,
            stream=JStream(stream, declare=False),
            durable=f"bench-fs-{batch}",
            pull_sub=PullSub(batch_size=batch, timeout=1.0),
            ack_policy=AckPolicy.NACK_ON_ERROR,
        )
        async def handle(event: dict[str, Any]) -> None:
            nonlocal handled
            await write(event["event_id"])
            handled += 1
            if handled >= count:
                done.set()

        started = time.perf_counter()
        await broker.start()
        try:
            await asyncio.wait_for(done.wait(), timeout=600)
            return time.perf_counter() - started
        finally:
            await broker.stop()

    elapsed = run(main())
    rows = table_count(ROWS_SQL)
    return {"rate": count / elapsed, "rows": rows}


# -- the bridge: publishing ---------------------------------------------------------------------


def publish_direct(count: int) -> dict[str, Any]:
    """``Publisher().publish()`` from sync code, outbox off, outside a transaction."""
    setup_django("alpha", "beta", BENCH_USE_OUTBOX="0")
    from jetstream_bridge.publisher import Publisher

    run(fresh_stream(bridge_config()))
    publisher = Publisher()
    for i in range(50):  # connect and warm up outside the timing
        publisher.publish(resource_type="order", event_type="created", payload=payload(i))
    latencies = []
    started = time.perf_counter()
    for i in range(count):
        sent = time.perf_counter()
        publisher.publish(resource_type="order", event_type="created", payload=payload(i))
        latencies.append(time.perf_counter() - sent)
    elapsed = time.perf_counter() - started
    return {
        "rate": count / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "stored": run(stream_messages(bridge_config())) - 50,
    }


def publish_outbox_txn(count: int, interval: float = 0.004) -> dict[str, Any]:
    """A request-like transaction (one business INSERT) with and without ``publish()``.

    Outbox on, fast path on. The two kinds alternate, ``interval`` apart, so both see the
    same database and background load; the time covers BEGIN to the end of the commit hooks.
    """
    setup_django("alpha", "beta")
    from django.db import transaction

    from jetstream_bridge.fast_path import fast_path
    from jetstream_bridge.publisher import Publisher

    from .models import Order

    run(fresh_stream(bridge_config()))
    reset_tables()
    publisher = Publisher()
    timings: dict[bool, list[float]] = {True: [], False: []}
    warmup = 50
    next_at = time.perf_counter()
    for i in range(warmup + 2 * count):
        with_publish = i % 2 == 0
        started = time.perf_counter()
        with transaction.atomic():
            Order.objects.create(number=f"SO-{i:08d}", total_cents=12345)
            if with_publish:
                publisher.publish(resource_type="order", event_type="created", payload=payload(i))
        took = time.perf_counter() - started
        if i >= warmup:
            timings[with_publish].append(took)
        next_at += interval
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    idle = fast_path().wait_idle(30)
    orm_ms, raw_ms = _outbox_insert_costs(300)
    with_p50 = percentile(timings[True], 50) * 1e3
    without_p50 = percentile(timings[False], 50) * 1e3
    return {
        "with_p50_ms": with_p50,
        "without_p50_ms": without_p50,
        "added_p50_ms": with_p50 - without_p50,
        "with_p99_ms": percentile(timings[True], 99) * 1e3,
        "without_p99_ms": percentile(timings[False], 99) * 1e3,
        "outbox_orm_ms": orm_ms,
        "outbox_raw_ms": raw_ms,
        "fast_path_idle": idle,
        "unsent": table_count(
            "SELECT count(*) FROM jetstream_outbox_events WHERE status <> 'sent'"
        ),
    }


def _outbox_insert_costs(count: int) -> tuple[float, float]:
    """Median ms of the outbox row written by ``OutboxStore.write`` (as ``publish()`` does),
    and of the same row written by a hand-written INSERT (the floor); rolled back."""
    from django.db import connection, transaction
    from django.utils import timezone

    from jetstream_bridge.conf import get_config
    from jetstream_bridge.outbox import NewEvent, OutboxStore

    store = OutboxStore(get_config())
    base = _envelope(0, PADDING)
    sql = (
        "INSERT INTO jetstream_outbox_events (event_id, subject, payload, headers, "
        "resource_type, resource_id, event_type, status, attempts, enqueued_at, available_at, "
        "created_at, updated_at) VALUES (%s, %s, %s::jsonb, '{}'::jsonb, %s, %s, %s, "
        "'pending', 0, %s, %s, %s, %s) RETURNING id"
    )
    orm, raw = [], []
    with transaction.atomic(), connection.cursor() as cursor:
        for _ in range(count):
            envelope = {**base, "event_id": new_event_id()}
            started = time.perf_counter()
            store.write(NewEvent(envelope["event_id"], SUBJECT, envelope, {}, explicit_id=False))
            orm.append(time.perf_counter() - started)
            envelope = {**base, "event_id": new_event_id()}
            started = time.perf_counter()
            now = timezone.now()
            values = [envelope["event_id"], SUBJECT, json.dumps(envelope), "order", "0"]
            cursor.execute(sql, [*values, "created", now, now, now, now])
            raw.append(time.perf_counter() - started)
        transaction.set_rollback(True)
    return percentile(orm, 50) * 1e3, percentile(raw, 50) * 1e3


def _fill_outbox(count: int) -> None:
    """Write ``count`` pending rows as ``publish()`` would, in bulk (not timed)."""
    from django.db import connection

    from jetstream_bridge.models import OutboxEvent, OutboxStatus

    base = _envelope(0, PADDING)
    rows = []
    for i in range(count):
        envelope = {**base, "event_id": new_event_id(), "resource_id": str(i)}
        rows.append(
            OutboxEvent(
                event_id=envelope["event_id"],
                subject=SUBJECT,
                payload=envelope,
                headers={},
                resource_type="order",
                resource_id=str(i),
                event_type="created",
                status=OutboxStatus.PENDING,
            )
        )
    OutboxEvent.objects.bulk_create(rows, batch_size=5000)
    with connection.cursor() as cursor:
        # A real backlog builds up over minutes and autovacuum keeps its statistics current.
        cursor.execute("ANALYZE jetstream_outbox_events")


def _relay_process(barrier: Any, results: Any, workers: int) -> None:
    from django.core.management import call_command

    from jetstream_bridge.outbox import OutboxStore

    # Where the relay's time goes: leasing rows and recording results; the rest is waiting
    # for publishes and the Python around them.
    from jetstream_bridge.relay import Relay

    timer = _Timer()
    timer.wrap_sync(OutboxStore, "claim", "claim")  # SQLite: a lease per batch
    timer.wrap_sync(OutboxStore, "lock", "claim")  # PostgreSQL: row locks, one transaction
    timer.wrap_sync(OutboxStore, "mark_sent", "record")
    # Threads, each spending its own wall time in the phases.
    workers = Relay(workers=workers).workers
    barrier.wait()
    started = time.monotonic()
    out = io.StringIO()
    call_command("jetstream_relay", "--once", "--workers", str(workers), stdout=out)
    ended = time.monotonic()
    share = {label: spent / (ended - started) / workers for label, spent in timer.spent.items()}
    results.put((started, ended, out.getvalue().strip(), share))


def relay(count: int, relays: int, workers: int = 2) -> dict[str, Any]:
    """``jetstream_relay --once`` in ``relays`` processes draining a ``count``-row backlog."""
    setup_django("alpha", "beta", BENCH_FAST_PATH="0")
    from django.db import connections

    config = bridge_config()
    run(fresh_stream(config))
    reset_tables()
    _fill_outbox(count)
    connections.close_all()  # forked relays open their own
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(relays + 1)
    results = context.Queue()
    processes = [
        context.Process(target=_relay_process, args=(barrier, results, workers))
        for _ in range(relays)
    ]
    for process in processes:
        process.start()
    barrier.wait()
    finished = [results.get(timeout=900) for _ in processes]
    for process in processes:
        process.join(60)
    window = max(end for _, end, _, _ in finished) - min(start for start, _, _, _ in finished)
    shares = [share for _, _, _, share in finished]
    return {
        "rate": count / window,
        "seconds": window,
        "unsent": table_count(
            "SELECT count(*) FROM jetstream_outbox_events WHERE status <> 'sent'"
        ),
        "stored": run(stream_messages(config)),
        "outputs": [text for _, _, text, _ in finished],
        # Each relay's share of its own wall time, averaged over the relays.
        "share": {
            label: sum(share.get(label, 0.0) for share in shares) / len(shares)
            for label in ("claim", "record")
        },
    }


# -- the bridge: consuming ----------------------------------------------------------------------


class _Timer:
    """Accumulate the wall time spent in wrapped methods (sync or async)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap_sync(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)  # keeps a handler's registered style (its __dict__)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)

    def wrap_async(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)


def consume(count: int, batch: int, handler: str = "write_row") -> dict[str, Any]:
    """``jetstream_consume`` with the inbox on PostgreSQL and a one-row handler.

    ``handler="write_rows"``: the same rows written by a batch handler, one ``bulk_create``
    per consumer batch.
    """
    setup_django("beta", "alpha")
    from django.core.management import call_command

    from jetstream_bridge.consumer_loop import PeerLoop

    config = bridge_config("beta", "alpha")
    run(fresh_stream(config))
    reset_tables()
    durable = f"bench-{batch}" if handler == "write_row" else f"bench-{handler}-{batch}"
    add_history(durable)
    run(prefill(count))
    # Where the time goes: fetch (NATS), the batch transaction (database), settling (acks);
    # inside the transaction, the inbox lookup, the inbox rows and the handler's own rows.
    from jetstream_bridge.inbox import Inbox

    from . import handlers

    timer = _Timer()
    timer.wrap_async(PeerLoop, "_fetch", "fetch")  # one loop per peer since multipeer
    timer.wrap_sync(PeerLoop, "_process_batch", "transaction")
    timer.wrap_async(PeerLoop, "_settle", "settle")
    timer.wrap_sync(Inbox, "seen", "inbox_lookup")
    timer.wrap_sync(Inbox, "record", "inbox_row")
    if hasattr(Inbox, "flush"):  # rows deferred to one INSERT per batch
        timer.wrap_sync(Inbox, "flush", "inbox_row")
    timer.wrap_sync(handlers, handler, "handler")  # before --handler imports it
    started = time.perf_counter()
    call_command(*_consume_args(count, batch, durable, handler), stdout=io.StringIO())
    elapsed = time.perf_counter() - started
    return {
        "rate": count / elapsed,
        "rows": table_count(ROWS_SQL),
        "inbox": table_count(INBOX_SQL),
        "share": {label: spent / elapsed for label, spent in timer.spent.items()},
    }


def _consume_args(count: int, batch: int, durable: str, handler: str = "write_row") -> list[str]:
    """``jetstream_consume`` with the benchmark's handler, until ``count`` are handled."""
    return [
        "jetstream_consume",
        "--durable",
        durable,
        "--batch-size",
        str(batch),
        "--handler",
        f"benchmarks.handlers.{handler}",
        "--max-messages",
        str(count),
    ]


def _start_consumer(count: int, batch: int, durable: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "django", *_consume_args(count, batch, durable)]
    return subprocess.Popen(command, env=django_env("beta", "alpha"), stdout=subprocess.DEVNULL)


async def _wait_for_consumer(config: BridgeConfig, durable: str, timeout: float = 60) -> None:
    conn = Connection(config)
    try:
        deadline = time.monotonic() + timeout
        while await conn.jsm.consumer_info(config.stream_name, durable) is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"consumer {durable} did not start")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def _stamp(into: list[float]) -> None:
    into.append(time.time())


def _produce(rate: float, total: int, warmup: int, index: int, barrier: Any, results: Any) -> None:
    """One producer process: ``total`` request-like transactions, ``rate`` per second."""
    from django.db import transaction

    from jetstream_bridge.fast_path import fast_path
    from jetstream_bridge.publisher import Publisher

    from .models import Order

    publisher = Publisher()
    committed: dict[str, float] = {}
    interval = 1.0 / rate
    barrier.wait()
    first = next_at = time.perf_counter() + index * interval / 2  # producers interleave
    for i in range(total):
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        next_at += interval
        stamp: list[float] = []
        with transaction.atomic():
            Order.objects.create(number=f"SO-{index}-{i:08d}", total_cents=12345)
            # Registered before publish(), so it runs first among the commit hooks.
            transaction.on_commit(functools.partial(_stamp, stamp))
            result = publisher.publish(
                resource_type="order", event_type="created", payload=payload(i)
            )
        if i >= warmup:
            committed[result.event_id] = stamp[0]
    achieved = total / (time.perf_counter() - first)
    fast_path().wait_idle(30)
    results.put((committed, achieved))


def latency(
    rate: int, seconds: float, batch: int = 25, producers: int = 2, dump: str = ""
) -> dict[str, Any]:
    """Commit-to-handler-start latency at a steady ``rate`` of request-like transactions.

    ``producers`` processes (web workers; outbox, fast path) share the rate. Each stamps
    ``time.time()`` in an on_commit hook registered before ``publish()``; ``jetstream_consume``
    runs in its own process and its handler stores ``time.time()`` when it starts. The first
    half second is a warm-up.
    """
    setup_django("alpha", "beta")
    from django.db import connections

    from .models import HandledEvent

    config = bridge_config()
    run(fresh_stream(config))
    reset_tables()
    add_history("bench-latency")
    each = round(rate * seconds / producers)
    warmup = max(1, rate // producers // 2)
    total = producers * (warmup + each)
    durable = "bench-latency"
    consumer = _start_consumer(total, batch, durable)
    committed: dict[str, float] = {}
    achieved = 0.0
    try:
        run(_wait_for_consumer(bridge_config("beta", "alpha"), durable))
        time.sleep(0.5)  # the consumer's first long pull is in place
        connections.close_all()  # forked producers open their own
        context = multiprocessing.get_context("fork")
        barrier = context.Barrier(producers + 1)
        results = context.Queue()
        workers = [
            context.Process(
                target=_produce,
                args=(rate / producers, warmup + each, warmup, index, barrier, results),
            )
            for index in range(producers)
        ]
        for worker in workers:
            worker.start()
        barrier.wait()
        before = _cpu_times()
        for _ in workers:
            stamps, rate_achieved = results.get(timeout=seconds * 10 + 60)
            committed.update(stamps)
            achieved += rate_achieved
        busy = _busy_cores(before, _cpu_times())
        for worker in workers:
            worker.join(60)
        consumer.wait(timeout=300)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    started = dict(HandledEvent.objects.values_list("event_id", "started_at"))
    latencies = [started[e] - t for e, t in committed.items() if e in started]
    if dump:  # (commit time, latency) per event, to look for patterns in the tail
        with open(dump, "w") as handle:
            json.dump(
                sorted((t, started[e] - t) for e, t in committed.items() if e in started), handle
            )
    return {
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "achieved_rate": achieved,
        # Whole machine while producing: producers, consumer, PostgreSQL and nats-server.
        "busy_cores": busy,
        "events": len(latencies),
        "missing": len(committed) - len(latencies),
        "consumer_exit": consumer.returncode,
    }


def _cpu_times() -> tuple[float, float]:
    """Return (busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [float(value) for value in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_cores(before: tuple[float, float], after: tuple[float, float]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total * len(os.sched_getaffinity(0)) if total else 0.0


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def rss(count: int, batch: int = 25, warm: int = 2000) -> dict[str, Any]:
    """RSS of a ``jetstream_consume`` process over ``count`` messages.

    Growth is the RSS at the end minus the RSS once ``warm`` messages were acked (imports,
    caches and connections are in place by then).
    """
    setup_django("beta", "alpha")
    config = bridge_config("beta", "alpha")
    run(fresh_stream(config))
    reset_tables()
    add_history("bench-rss")
    run(prefill(count))
    durable = "bench-rss"
    consumer = _start_consumer(count, batch, durable)
    samples: list[tuple[int, float]] = []

    async def watch() -> None:
        conn = Connection(config)
        try:
            while consumer.poll() is None:
                info = await conn.jsm.consumer_info(config.stream_name, durable)
                acked = info.ack_floor.stream_seq if info else 0
                memory = _rss_mb(consumer.pid)
                if memory is not None and consumer.poll() is None:
                    samples.append((acked, memory))
                await asyncio.sleep(0.25)
        finally:
            await conn.close()

    started = time.perf_counter()
    try:
        run(watch())
        consumer.wait(timeout=60)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    elapsed = time.perf_counter() - started
    warm_rss = next((memory for acked, memory in samples if acked >= warm), samples[-1][1])
    return {
        "growth_mb": samples[-1][1] - warm_rss,
        "warm_mb": warm_rss,
        "end_mb": samples[-1][1],
        "peak_mb": max(memory for _, memory in samples),
        "rate": count / elapsed,
        "rows": table_count(ROWS_SQL),
        "consumer_exit": consumer.returncode,
    }


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "raw_publish_serial": raw_publish_serial,
    "raw_publish_pipelined": raw_publish_pipelined,
    "raw_fetch_ack": raw_fetch_ack,
    "faststream_consume": faststream_consume,
    "publish_direct": publish_direct,
    "publish_outbox_txn": publish_outbox_txn,
    "relay": relay,
    "consume": consume,
    "latency": latency,
    "rss": rss,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--params", default="{}", help="JSON object of keyword arguments")
    args = parser.parse_args(argv)
    result = SCENARIOS[args.scenario](**json.loads(args.params))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
