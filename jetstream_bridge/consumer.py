"""Durable pull consumer: fetch a batch, hand it to the batch processor, then settle.

Per batch: ``close_old_connections()``, then ``processing.BatchProcessor`` handles the batch in
one database transaction (the inbox rows with the handlers' writes; savepoints and redos are
described there) and returns an outcome per message. Acks, NAKs and dead letters are sent only
after that transaction commits. While the batch runs, its messages are kept alive; when the
database fails, the consumer hands the batch back and waits for the database before fetching
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from asgiref.sync import sync_to_async
from django.db import DatabaseError, InterfaceError, close_old_connections, connections

from . import metrics
from .broker import Connection, Delivery
from .conf import get_config
from .core import dead_letter
from .core.envelope import MSG_ID_HEADER
from .core.errors import ConsumerNotFound, NatsError, PublishFailed, TopologyError
from .core.settings import BridgeConfig
from .handlers import Handler, HandlerRegistry, autodiscover, registry
from .processing import BatchProcessor, Outcome, ReceivedMessage, Verdict
from .runtime import get_runtime
from .topology import ensure_topology_async

logger = logging.getLogger(__name__)

IDLE_CHECK_EVERY = 30.0  # seconds of idleness before re-checking the consumer exists


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


class Consumer:
    """Consume ``{env}.data.sync.{dest}.{app}`` with a durable pull consumer.

    ``handler`` (sync or ``async def``, called as ``handler(event, subject, deliveries)``)
    handles every event; without it the registry decides per resource/event type.
    """

    def __init__(  # noqa: PLR0913 (public keyword-only constructor)
        self,
        *,
        durable_name: str,
        batch_size: int = 25,
        handler: Handler | None = None,
        registry: HandlerRegistry = registry,
        using: str | None = None,
        idle_timeout: float = 1.0,
        max_messages: int | None = None,
        stop_when_idle: bool = False,
        config: BridgeConfig | None = None,
    ) -> None:
        self.config = config or get_config()
        self.durable = durable_name
        self.batch_size = batch_size
        self.handler = handler
        self.registry = registry
        self.processor = BatchProcessor(
            durable=durable_name,
            handler=handler,
            registry=registry,
            using=using,
            config=self.config,
        )
        self.using = self.processor.using
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self.stop_when_idle = stop_when_idle
        self.stop = threading.Event()
        self.stats = ConsumerStats()
        self.stream = ""
        self._keepalive_every = self.config.ack_wait / 3
        self._database_down = False

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> ConsumerStats:
        """Run until SIGTERM/SIGINT (or the configured limits); return the counts."""
        if threading.current_thread() is threading.main_thread():

            def stop(signum: int, frame: FrameType | None) -> None:
                logger.info("stopping after the batch in hand", extra={"signal": signum})
                self.stop.set()

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        return asyncio.run(self.run_async())

    async def run_async(self) -> ConsumerStats:
        """Async twin of ``run`` (signals are the caller's business; set ``stop`` to end)."""
        self._discover_handlers()
        runtime = get_runtime()
        warnings = await self._ensure(runtime)
        logger.info(
            "consumer started",
            extra={"durable": self.durable, "stream": self.stream, "batch_size": self.batch_size},
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
                if not await sync_to_async(self._database_answers, thread_sensitive=True)():
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
                if self.stop_when_idle:
                    break
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > IDLE_CHECK_EVERY:
                    # A deleted consumer just looks idle to a pull; check it still exists.
                    idle_since = None
                    await self._ensure_quietly(runtime)
                continue
            idle_since = None
            await self._handle_batch(runtime, deliveries)
        logger.info(
            "consumer stopped",
            extra={
                "durable": self.durable,
                "processed": self.stats.processed,
                "dead_lettered": self.stats.dead_lettered,
            },
        )
        return self.stats

    def _discover_handlers(self) -> None:
        if self.handler is None:
            autodiscover()
            if not len(self.registry):
                logger.warning("no handlers registered; every event will be dead-lettered")

    def _limit_reached(self) -> bool:
        return self.max_messages is not None and self.stats.handled >= self.max_messages

    async def _fetch(self, conn: Connection) -> list[Delivery]:
        limit = self.batch_size
        if self.max_messages is not None:
            limit = max(1, min(limit, self.max_messages - self.stats.handled))
        return await conn.fetch(self.stream, self.durable, limit, timeout=self.idle_timeout)

    async def _ensure(self, runtime: Any) -> list[str]:
        report = await runtime.run(
            lambda conn: ensure_topology_async(
                conn, self.config, durable=self.durable, limits=False
            )
        )
        self.stream = report.consumer_stream or self.config.stream_name
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
            outcomes = await sync_to_async(self._process_batch, thread_sensitive=True)(messages)
        except (DatabaseError, InterfaceError) as exc:
            # Nothing committed: hand every message back and let the database recover. (Django's
            # InterfaceError, a closed connection, is no DatabaseError.)
            logger.error(
                "batch transaction failed; retrying the batch: %s",
                exc,
                extra={"durable": self.durable, "messages": len(deliveries)},
            )
            outcomes = self.processor.after_database_error(messages, exc)
            await sync_to_async(connections.close_all, thread_sensitive=True)()
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
            self.stats.redone = self.processor.redone
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
        for delivery, outcome in settled:
            try:
                await self._settle_one(conn, delivery, outcome)
            except NatsError as exc:
                # The message comes back after ack_wait; the inbox recognises it.
                logger.warning(
                    "could not settle message: %s", exc, extra={"stream_seq": delivery.stream_seq}
                )

    async def _settle_one(self, conn: Connection, delivery: Delivery, outcome: Outcome) -> None:
        if outcome.verdict is Verdict.ACK:
            await delivery.ack()
            if outcome.skipped:
                self.stats.skipped += 1
                metrics.consumed(self.durable, "skipped")
                logger.info("acked a replay for another durable", extra=_seq(delivery))
            elif outcome.duplicate:
                self.stats.duplicates += 1
                metrics.consumed(self.durable, "duplicate")
            else:
                self.stats.processed += 1
                metrics.consumed(self.durable, "processed")
        elif outcome.verdict is Verdict.RETRY:
            await self._retry(delivery, outcome.delay)
        else:
            await self._dead_letter(conn, delivery, outcome)

    async def _retry(self, delivery: Delivery, delay: float) -> None:
        await delivery.nak(delay)
        self.stats.retried += 1
        metrics.consumed(self.durable, "retried")

    async def _dead_letter(self, conn: Connection, delivery: Delivery, outcome: Outcome) -> None:
        message, dead = outcome.message, outcome.dead
        assert dead is not None
        if not self.config.use_dlq:
            logger.error(
                "message failed for good and USE_DLQ is off; leaving it to the "
                "server's max_deliver",
                extra=_fields(message, dead),
            )
            await self._retry(delivery, self.processor.decisions.retry_delay(message))
            return
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
            await self._retry(delivery, self.processor.decisions.retry_delay(message))
            return
        if ack.duplicate:
            # The stream dropped the letter as a copy of one it already holds: with a random
            # message id that means someone else wrote under it. Terminating now would lose
            # the message; it comes back and is dead-lettered under a fresh id.
            logger.error(
                "DLQ publish dropped as a duplicate of %s; retrying the message later",
                headers[MSG_ID_HEADER],
                extra=_fields(message, dead),
            )
            await self._retry(delivery, self.processor.decisions.retry_delay(message))
            return
        await delivery.term(f"dead-lettered: {dead.reason}")
        self.stats.dead_lettered += 1
        metrics.dead_lettered(self.durable, dead.reason)
        logger.warning("message dead-lettered: %s", dead.reason, extra=_fields(message, dead))


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


def _seq(delivery: Delivery) -> dict[str, Any]:
    return {"stream_seq": delivery.stream_seq}
