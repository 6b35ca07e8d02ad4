"""One peer's loop of a ``consumer.Consumer``: fetch a batch, hand it over, settle it.

Per batch: ``close_old_connections()``, then ``processing.BatchProcessor`` handles the batch in
one database transaction (the inbox rows with the handlers' writes; savepoints and redos are
described there) and returns an outcome per message. Acks, NAKs and dead letters are sent only
after that transaction commits. While the batch runs, its messages are kept alive; when the
database fails, the loop hands the batch back and waits for the database before fetching
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import DatabaseError, InterfaceError, close_old_connections, connections

from . import metrics
from .broker import Connection, Delivery
from .core import dead_letter
from .core.envelope import MSG_ID_HEADER
from .core.errors import ConsumerNotFound, NatsError, PublishFailed, TopologyError
from .processing import BatchProcessor, Outcome, ReceivedMessage, Verdict
from .runtime import get_runtime
from .topology import ensure_topology_async

logger = logging.getLogger("jetstream_bridge.consumer")

IDLE_CHECK_EVERY = 30.0  # seconds of idleness before re-checking the consumer exists
T = TypeVar("T")


@dataclass
class ConsumerStats:
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    skipped: int = 0  # replays meant for another durable, acked without handling
    batches: int = 0
    redone: int = 0  # batches rolled back after a handler failed and redone with savepoints
    started: float = field(default_factory=time.monotonic)

    @property
    def handled(self) -> int:
        return self.processed + self.duplicates + self.retried + self.dead_lettered + self.skipped


@dataclass(frozen=True)
class LoopOptions:
    """What every peer's loop of one ``Consumer`` shares."""

    base_durable: str  # the name given to the Consumer: the default peer's durable
    batch_size: int
    idle_timeout: float
    max_messages: int | None
    stop_when_idle: bool
    stop: threading.Event


class PeerLoop:
    """Fetch, hand over and settle the events one peer sends us, on that peer's durable.

    ``executor`` (one thread) runs the batch transactions, so a slow handler of this peer
    never holds up another peer's loop; without it they run in Django's sync thread.
    ``stats`` may be shared by the loops of one consumer (its limits count every peer).
    """

    def __init__(
        self,
        peer: str,
        durable: str,
        processor: BatchProcessor,
        options: LoopOptions,
        stats: ConsumerStats,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.peer = peer
        self.durable = durable
        self.processor = processor
        self.config = processor.config
        self.using = processor.using
        self.options = options
        self.batch_size = options.batch_size
        self.stop = options.stop
        self.stats = stats
        self.stream = ""
        self._executor = executor
        self._keepalive_every = self.config.ack_wait / 3
        self._database_down = False

    # -- the loop -----------------------------------------------------------------------------

    async def run_async(self) -> None:
        """Run until ``stop`` is set (or the limits are reached); close this loop's thread."""
        try:
            await self._run()
        finally:
            if self._executor is not None:
                await self._in_db_thread(connections.close_all)
                self._executor.shutdown(wait=False)

    async def _in_db_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` where this loop's database work runs (its connection lives there)."""
        if self._executor is None:
            return await sync_to_async(fn, thread_sensitive=True)(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _run(self) -> None:
        runtime = get_runtime()
        warnings = await self._ensure(runtime)
        logger.info(
            "consumer started",
            extra={
                "durable": self.durable,
                "peer": self.peer,
                "stream": self.stream,
                "batch_size": self.batch_size,
            },
        )
        for warning in warnings:  # foreign retention, a short duplicate window (stream_audit)
            logger.warning("consumer: %s", warning, extra={"durable": self.durable})
        failures = 0
        idle_since: float | None = None
        while not self.stop.is_set() and not self._limit_reached():
            if self._database_down:
                # Every failed batch costs its messages a delivery, and the server drops a
                # message whose deliveries run out: during an outage, fetching again would
                # burn through MAX_DELIVER and lose events. Wait for the database instead.
                if not await self._in_db_thread(self._database_answers):
                    await self._pause(failures := failures + 1)
                    continue
                self._database_down = False
                logger.info("database answers again; resuming", extra={"durable": self.durable})
            try:
                deliveries = await runtime.run(self._fetch)
            except ConsumerNotFound:
                logger.warning(
                    "consumer vanished; ensuring it again", extra={"durable": self.durable}
                )
                await self._pause(failures := failures + 1)
                await self._ensure_quietly(runtime)
                continue
            except NatsError as exc:
                logger.warning("fetch failed: %s", exc, extra={"durable": self.durable})
                await self._pause(failures := failures + 1)
                continue
            failures = 0
            if not deliveries:
                if self.options.stop_when_idle:
                    break
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > IDLE_CHECK_EVERY:
                    # A deleted consumer just looks idle to a pull; check it still exists.
                    idle_since = None
                    await self._ensure_quietly(runtime)
                continue
            idle_since = None
            await self._handle_batch(runtime, deliveries)
        logger.info("consumer stopped", extra={"durable": self.durable, "peer": self.peer})

    def _limit_reached(self) -> bool:
        limit = self.options.max_messages
        return limit is not None and self.stats.handled >= limit

    async def _fetch(self, conn: Connection) -> list[Delivery]:
        limit, most = self.batch_size, self.options.max_messages
        if most is not None:
            limit = max(1, min(limit, most - self.stats.handled))
        return await conn.fetch(self.stream, self.durable, limit, timeout=self.options.idle_timeout)

    async def _ensure(self, runtime: Any) -> list[str]:
        base, peers = self.options.base_durable, (self.peer,)
        report = await runtime.run(
            lambda conn: ensure_topology_async(
                conn, self.config, durable=base, limits=False, peers=peers
            )
        )
        self.stream = report.consumer_streams.get(self.durable) or self.config.stream_name
        info = await runtime.run(lambda conn: conn.jsm.consumer_info(self.stream, self.durable))
        if info:
            # The server may replace ack_wait (with backoff[0]); keep messages alive within it.
            self._keepalive_every = max(0.2, (info.config.ack_wait or 0.0) / 3)
        return list(report.warnings)

    async def _ensure_quietly(self, runtime: Any) -> None:
        try:
            await self._ensure(runtime)
        except (NatsError, TopologyError) as exc:
            logger.warning("could not ensure the consumer: %s", exc)

    async def _pause(self, failures: int) -> None:
        delay = min(0.5 * 2 ** min(failures, 5), 10.0)
        await asyncio.get_running_loop().run_in_executor(None, self.stop.wait, delay)

    async def _handle_batch(self, runtime: Any, deliveries: list[Delivery]) -> None:
        messages = [self._received(delivery) for delivery in deliveries]
        keepalive = asyncio.ensure_future(self._keep_alive(runtime, deliveries))
        try:
            outcomes = await self._in_db_thread(self._process_batch, messages)
        except (DatabaseError, InterfaceError) as exc:
            # Nothing committed: hand every message back and let the database recover. (Django's
            # InterfaceError, a closed connection, is no DatabaseError.)
            logger.error(
                "batch transaction failed; retrying the batch: %s",
                exc,
                extra={"durable": self.durable, "messages": len(deliveries)},
            )
            outcomes = self.processor.after_database_error(messages, exc)
            await self._in_db_thread(connections.close_all)
            self._database_down = True
        except Exception as exc:
            # The processor isolates the message behind an error it did not expect; whatever
            # escapes it anyway fails the batch (retried, dead-lettered on the last delivery)
            # rather than end the process, which would leave the batch to fail again in the
            # next consumer until MAX_DELIVER drops it unrecorded.
            logger.exception(
                "batch failed unexpectedly; retrying its messages: %s",
                exc,
                extra={"durable": self.durable, "messages": len(deliveries)},
            )
            outcomes = [self.processor.decisions.unexpected(m, exc) for m in messages]
        finally:
            keepalive.cancel()
        settled = list(zip(deliveries, outcomes, strict=True))
        await runtime.run(lambda conn: self._settle(conn, settled))
        self.stats.batches += 1

    def _received(self, delivery: Delivery) -> ReceivedMessage:
        """Return what the processor needs of ``delivery`` (the ack verbs stay here)."""
        return ReceivedMessage(
            subject=delivery.subject,
            data=delivery.data,
            headers=delivery.headers,
            stream=delivery.stream,
            stream_seq=delivery.stream_seq,
            deliveries=delivery.deliveries,
            consumer=self.durable,
        )

    def _process_batch(self, messages: list[ReceivedMessage]) -> list[Outcome]:
        """Handle the batch in Django's sync thread, on connections fit for use."""
        close_old_connections()
        return self.processor.process(messages)

    def _database_answers(self) -> bool:
        try:
            with connections[self.using].cursor() as cursor:
                cursor.execute("SELECT 1")
        except DatabaseError:
            with contextlib.suppress(DatabaseError):
                connections[self.using].close()
            return False
        return True

    async def _keep_alive(self, runtime: Any, deliveries: Sequence[Delivery]) -> None:
        while True:
            await asyncio.sleep(self._keepalive_every)

            async def touch(conn: Connection) -> None:
                for delivery in deliveries:
                    await delivery.in_progress()

            try:
                await runtime.run(touch)
            except NatsError:
                logger.debug("keep-alive failed", exc_info=True)

    # -- settling (on the runtime loop) ---------------------------------------------------

    async def _settle(self, conn: Connection, settled: Sequence[tuple[Delivery, Outcome]]) -> None:
        observed: list[tuple[ReceivedMessage, str]] = []
        for delivery, outcome in settled:
            try:
                observed.append((outcome.message, await self._settle_one(conn, delivery, outcome)))
            except NatsError as exc:
                # The message comes back after ack_wait; the inbox recognises it.
                logger.warning(
                    "could not settle message: %s", exc, extra={"stream_seq": delivery.stream_seq}
                )
                observed.append((outcome.message, outcome.settled_as))
        chain = self.processor.chain
        if chain.observes:
            # Off the shared NATS loop: an observer may be slow (an exporter, an HTTP call).
            await asyncio.get_running_loop().run_in_executor(None, self._observe, observed)

    def _observe(self, observed: Sequence[tuple[ReceivedMessage, str]]) -> None:
        for message, how in observed:
            self.processor.chain.settled(message, how, self.config)

    async def _settle_one(self, conn: Connection, delivery: Delivery, outcome: Outcome) -> str:
        if outcome.verdict is Verdict.ACK:
            await delivery.ack()
            settled = outcome.settled_as  # processed, duplicate or skipped
            self._count(settled)
            if outcome.skipped:
                logger.info(
                    "acked a replay for another durable",
                    extra={"stream_seq": delivery.stream_seq},
                )
            return settled
        if outcome.verdict is Verdict.RETRY:
            return await self._retry(delivery, outcome.delay)
        return await self._dead_letter(conn, delivery, outcome)

    def _count(self, settled: str) -> None:
        """Count an acked or retried message in the stats and the ``consumed`` metric."""
        field_name = "duplicates" if settled == "duplicate" else settled
        setattr(self.stats, field_name, getattr(self.stats, field_name) + 1)
        metrics.consumed(self.durable, settled)

    async def _retry(self, delivery: Delivery, delay: float) -> str:
        await delivery.nak(delay)
        self._count("retried")
        return "retried"

    async def _dead_letter(self, conn: Connection, delivery: Delivery, outcome: Outcome) -> str:
        message, dead = outcome.message, outcome.dead
        assert dead is not None
        if not self.config.use_dlq:
            logger.error(
                "message failed for good and USE_DLQ is off; leaving it to the "
                "server's max_deliver",
                extra=_fields(message, dead),
            )
            return await self._retry(delivery, self.processor.decisions.retry_delay(message))
        key = dead_letter.signing_key(self.config.dlq_signing_key)
        headers = dead.headers(message.data, key=key)
        try:
            ack = await conn.publish(self.config.subjects.dlq, message.data, headers)
        except (NatsError, PublishFailed) as exc:
            logger.error(
                "DLQ publish failed; retrying the message later: %s",
                exc,
                extra=_fields(message, dead),
            )
            return await self._retry(delivery, self.processor.decisions.retry_delay(message))
        if ack.duplicate:
            # The stream dropped the letter as a copy of one it already holds: with a random
            # message id that means someone else wrote under it. Terminating now would lose
            # the message; it comes back and is dead-lettered under a fresh id.
            logger.error(
                "DLQ publish dropped as a duplicate of %s; retrying the message later",
                headers[MSG_ID_HEADER],
                extra=_fields(message, dead),
            )
            return await self._retry(delivery, self.processor.decisions.retry_delay(message))
        await delivery.term(f"dead-lettered: {dead.reason}")
        self.stats.dead_lettered += 1
        metrics.dead_lettered(self.durable, dead.reason)
        logger.warning("message dead-lettered: %s", dead.reason, extra=_fields(message, dead))
        return "dead_lettered"


def _fields(message: ReceivedMessage, dead: dead_letter.DeadLetter) -> dict[str, Any]:
    return {
        "reason": dead.reason,
        "error_class": dead.error_class,
        "subject": message.subject,
        "stream_seq": message.stream_seq,
        "deliveries": message.deliveries,
        "consumer": dead.consumer,
        "event_id": dead.event_id,
    }
