"""Durable pull consumer: fetch a batch, handle it in one database transaction, then settle.

Per batch: ``close_old_connections()``, one ``transaction.atomic()``, the inbox rows written
in that transaction with the handlers' writes, and acks sent only after it commits. A crash
before the commit applies nothing; a crash after it leaves unacked messages that the inbox
recognises when they come back.

Savepoints (``HANDLER_SAVEPOINTS``):

* ``"on_failure"`` (the default): the batch's handlers run one after the other with no
  savepoint between them (a savepoint pair costs two round trips per message). If every handler
  succeeds, the batch commits. If one raises (anything: ``RejectMessage``, a database error),
  or returns after a database error it caught without a savepoint of its own (which may have
  left the transaction unusable), the whole transaction rolls back and the batch is redone with
  a savepoint per message, as ``"always"`` does. A handler that raised is not run again: its
  failure (retry or dead-letter, by the usual rules) is recorded from the first exception; one
  that returned runs again, in its own savepoint. **So a batch with a failing handler runs its
  other handlers' code twice; their database writes are applied exactly once** (the first run
  was rolled back).
  Side effects outside the database must tolerate reruns anyway: delivery is at-least-once.
* ``"always"``: a savepoint per message in every batch; a failing handler rolls back only its
  own writes, and no handler runs twice in a batch.

In both modes a handler that returns with Django's transaction marked for rollback (an ORM
error it caught outside ``atomic()``, ``transaction.set_rollback(True)``) has failed: its writes
cannot commit, so its message is retried rather than acked.

Messages that need no handler (duplicates, malformed envelopes, events without a handler) are
recorded in their own savepoint in either mode and never cause a redo.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from asgiref.sync import async_to_sync, iscoroutinefunction, sync_to_async
from django.db import (
    DatabaseError,
    IntegrityError,
    close_old_connections,
    connections,
    router,
    transaction,
)
from django.db.transaction import TransactionManagementError

from . import metrics
from .broker import Connection, Delivery
from .conf import get_config
from .core import dlq
from .core.config import BridgeConfig
from .core.envelope import decode
from .core.errors import ConsumerNotFound, MalformedEnvelope, NatsError, RejectMessage
from .core.retry import RetryPolicy
from .handlers import Handler, HandlerRegistry, autodiscover, registry
from .inbox import Inbox, Seen, inbox_model
from .models import InboxStatus
from .runtime import get_runtime
from .topology import ensure_topology_async

logger = logging.getLogger(__name__)

IDLE_CHECK_EVERY = 30.0  # seconds of idleness before re-checking the consumer exists


class Verdict(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Outcome:
    delivery: Delivery
    verdict: Verdict
    delay: float = 0.0
    dead: dlq.DeadLetter | None = None
    duplicate: bool = False


@dataclass
class ConsumerStats:
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    batches: int = 0
    redone: int = 0  # batches rolled back after a handler failed and redone with savepoints
    started: float = field(default_factory=time.monotonic)

    @property
    def handled(self) -> int:
        return self.processed + self.duplicates + self.retried + self.dead_lettered


class Consumer:
    """Consume ``{env}.data.sync.{dest}.{app}`` with a durable pull consumer.

    ``handler`` (sync or ``async def``, called as ``handler(event, subject, deliveries)``)
    handles every event; without it the registry decides per resource/event type.
    """

    def __init__(
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
        self.using = using or router.db_for_write(inbox_model(self.config))
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self.stop_when_idle = stop_when_idle
        self.policy = RetryPolicy(self.config.max_deliver, self.config.backoff)
        self.stop = threading.Event()
        self.stats = ConsumerStats()
        self.stream = ""
        self._keepalive_every = self.config.ack_wait / 3
        self._database_down = False
        self._query_errors: list[BaseException] = []

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
        if self.handler is None:
            autodiscover()
            if not len(self.registry):
                logger.warning("no handlers registered; every event will be dead-lettered")
        runtime = get_runtime()
        await self._ensure(runtime)
        logger.info(
            "consumer started",
            extra={"durable": self.durable, "stream": self.stream, "batch_size": self.batch_size},
        )
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

    def _limit_reached(self) -> bool:
        return self.max_messages is not None and self.stats.handled >= self.max_messages

    async def _fetch(self, conn: Connection) -> list[Delivery]:
        limit = self.batch_size
        if self.max_messages is not None:
            limit = max(1, min(limit, self.max_messages - self.stats.handled))
        return await conn.fetch(self.stream, self.durable, limit, timeout=self.idle_timeout)

    async def _ensure(self, runtime: Any) -> None:
        report = await runtime.run(
            lambda conn: ensure_topology_async(conn, self.config, durable=self.durable)
        )
        self.stream = report.consumer_stream or self.config.stream_name
        info = await runtime.run(lambda conn: conn.jsm.consumer_info(self.stream, self.durable))
        if info:
            # The server may replace ack_wait (with backoff[0]); keep messages alive within it.
            self._keepalive_every = max(0.2, (info.config.ack_wait or 0.0) / 3)

    async def _ensure_quietly(self, runtime: Any) -> None:
        try:
            await self._ensure(runtime)
        except NatsError as exc:
            logger.warning("could not ensure the consumer: %s", exc)

    async def _pause(self, failures: int) -> None:
        delay = min(0.5 * 2 ** min(failures, 5), 10.0)
        await asyncio.get_running_loop().run_in_executor(None, self.stop.wait, delay)

    async def _handle_batch(self, runtime: Any, deliveries: list[Delivery]) -> None:
        keepalive = asyncio.ensure_future(self._keep_alive(runtime, deliveries))
        try:
            outcomes = await sync_to_async(self._process_batch, thread_sensitive=True)(deliveries)
        except DatabaseError as exc:
            # Nothing committed: hand every message back and let the database recover.
            logger.error(
                "batch transaction failed; retrying the batch: %s",
                exc,
                extra={"durable": self.durable, "messages": len(deliveries)},
            )
            outcomes = [self._after_database_error(d, exc) for d in deliveries]
            await sync_to_async(connections.close_all, thread_sensitive=True)()
            self._database_down = True
        finally:
            keepalive.cancel()
        await runtime.run(lambda conn: self._settle(conn, outcomes))
        self.stats.batches += 1

    def _after_database_error(self, delivery: Delivery, error: DatabaseError) -> Outcome:
        if not self.policy.is_last(delivery.deliveries):
            return Outcome(delivery, Verdict.RETRY, delay=1.0)
        # The server will not deliver it again, so a NAK would drop it silently; the DLQ
        # (which needs no database) keeps it for a replay.
        try:
            event_id = decode(delivery.data)["event_id"]
        except MalformedEnvelope:
            event_id = None
        dead = dlq.DeadLetter(
            reason=dlq.MAX_DELIVER,
            error_class=type(error).__name__,
            error_message=str(error),
            original_subject=delivery.subject,
            stream=delivery.stream,
            stream_seq=delivery.stream_seq,
            deliveries=delivery.deliveries,
            consumer=self.durable,
            event_id=event_id,
        )
        return Outcome(delivery, Verdict.DEAD, dead=dead)

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

    async def _settle(self, conn: Connection, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            delivery = outcome.delivery
            try:
                if outcome.verdict is Verdict.ACK:
                    await delivery.ack()
                    if outcome.duplicate:
                        self.stats.duplicates += 1
                        metrics.consumed(self.durable, "duplicate")
                    else:
                        self.stats.processed += 1
                        metrics.consumed(self.durable, "processed")
                elif outcome.verdict is Verdict.RETRY:
                    await delivery.nak(outcome.delay)
                    self.stats.retried += 1
                    metrics.consumed(self.durable, "retried")
                else:
                    await self._dead_letter(conn, outcome)
            except NatsError as exc:
                # The message comes back after ack_wait; the inbox recognises it.
                logger.warning(
                    "could not settle message: %s", exc, extra={"stream_seq": delivery.stream_seq}
                )

    async def _dead_letter(self, conn: Connection, outcome: Outcome) -> None:
        delivery, dead = outcome.delivery, outcome.dead
        assert dead is not None
        if not self.config.use_dlq:
            logger.error(
                "message failed for good and USE_DLQ is off; leaving it to the "
                "server's max_deliver",
                extra=_fields(delivery, dead),
            )
            await delivery.nak(self.policy.delay_for(delivery.deliveries))
            self.stats.retried += 1
            metrics.consumed(self.durable, "retried")
            return
        try:
            await conn.publish(self.config.subjects.dlq, delivery.data, dead.headers())
        except NatsError as exc:
            logger.error(
                "DLQ publish failed; retrying the message later: %s",
                exc,
                extra=_fields(delivery, dead),
            )
            await delivery.nak(self.policy.delay_for(delivery.deliveries))
            self.stats.retried += 1
            metrics.consumed(self.durable, "retried")
            return
        await delivery.term(f"dead-lettered: {dead.reason}")
        self.stats.dead_lettered += 1
        metrics.dead_lettered(self.durable, dead.reason)
        logger.warning("message dead-lettered: %s", dead.reason, extra=_fields(delivery, dead))

    # -- processing (in Django's sync thread) ---------------------------------------------

    def _process_batch(self, deliveries: list[Delivery]) -> list[Outcome]:
        close_old_connections()
        savepoints = self.config.handler_savepoints == "always"
        defer = True
        runs = _Runs()
        while True:
            try:
                return self._process_deliveries(
                    deliveries, savepoints=savepoints, defer=defer, runs=runs
                )
            except _RedoWithSavepoints as redo:
                # The batch ran without a savepoint per message and one handler failed (or
                # left the transaction unusable): everything rolled back. Redo the batch with
                # a savepoint per message; the failed handler is not run again, its failure
                # is recorded from this exception.
                if redo.error is not None:
                    runs.failed[redo.index] = redo.error
                savepoints = True
                self.stats.redone += 1
                logger.info(
                    "handler failed in a batch without savepoints; redoing the batch with a "
                    "savepoint per message",
                    extra={
                        "durable": self.durable,
                        "messages": len(deliveries),
                        "stream_seq": deliveries[redo.index].stream_seq,
                    },
                )
            except IntegrityError:
                if not defer:
                    raise
                # The batch's one inbox INSERT met a row another worker committed meanwhile:
                # the whole batch rolled back, handler writes included. Redo it with an INSERT
                # per message inside each savepoint, so only the events handled elsewhere fail
                # (and come back to be acked as duplicates) instead of the batch counting as an
                # outage.
                logger.info(
                    "inbox conflict in a batch; redoing it message by message",
                    extra={"durable": self.durable, "messages": len(deliveries)},
                )
                defer = False
                savepoints = True

    def _process_deliveries(
        self,
        deliveries: list[Delivery],
        *,
        savepoints: bool = True,
        defer: bool = True,
        runs: _Runs | None = None,
    ) -> list[Outcome]:
        """Handle deliveries in one transaction and decide each; settle nothing.

        Without ``savepoints`` a failing handler raises ``_RedoWithSavepoints`` (rolling the
        whole transaction back). ``runs`` says what earlier passes over the batch did.
        """
        runs = runs or _Runs()
        decoded: list[tuple[Delivery, dict[str, Any] | None, Exception | None]] = []
        for delivery in deliveries:
            try:
                decoded.append((delivery, decode(delivery.data), None))
            except MalformedEnvelope as exc:
                decoded.append((delivery, None, exc))
        inbox = Inbox(self.config, self.durable, self.using) if self.config.use_inbox else None
        watch = contextlib.nullcontext() if savepoints else self._watch_queries()
        with transaction.atomic(using=self.using), watch:
            seen_ids: dict[str, Seen] = {}
            seen_seqs: dict[tuple[str, int], Seen] = {}
            if inbox is not None:
                seen_ids, seen_seqs = inbox.seen(
                    [event["event_id"] for _, event, _ in decoded if event],
                    [(d.stream, d.stream_seq) for d in deliveries],
                )
            outcomes = []
            for index, (delivery, event, error) in enumerate(decoded):
                seen = None
                if event is not None:
                    seen = seen_ids.get(event["event_id"])
                seen = seen or seen_seqs.get((delivery.stream, delivery.stream_seq))
                outcomes.append(
                    self._process_one(
                        inbox,
                        delivery,
                        event,
                        error,
                        seen,
                        savepoint=savepoints,
                        defer=defer,
                        index=index,
                        runs=runs,
                    )
                )
                if event is not None and inbox is not None and outcomes[-1].verdict is Verdict.ACK:
                    # The same event twice in one batch: the second is a duplicate, whether
                    # the first created the inbox row or turned an earlier failure around.
                    seen_ids[event["event_id"]] = Seen(
                        seen.pk if seen is not None else None, InboxStatus.PROCESSED
                    )
            if inbox is not None:
                inbox.flush()
        return outcomes

    @contextlib.contextmanager
    def _watch_queries(self) -> Iterator[None]:
        """Note every failed query while the batch runs without savepoints.

        A handler may catch a database error itself. Inside its own savepoint that is harmless,
        but without one it can leave the batch transaction aborted (PostgreSQL) or, on MySQL, a
        deadlock may have rolled it back: the next handler would then fail for an error that
        is not its own. ``_run_unprotected`` checks these notes after each handler.

        Not on PostgreSQL, where ``_transaction_spoiled`` reads the transaction's state from
        libpq instead: a wrapper around every query of the batch would be work for nothing.
        """
        self._query_errors = []
        if connections[self.using].vendor == "postgresql":
            yield
            return

        def note(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
            try:
                return execute(sql, params, many, context)
            except Exception as exc:
                self._query_errors.append(exc)
                raise

        with connections[self.using].execute_wrapper(note):
            yield

    def process_stored(self, pk: Any) -> Outcome:
        """Run the handler once more for the stored inbox row ``pk`` (the admin's re-run).

        The stored envelope takes the path a delivery takes: the handler's writes and the row's
        new status (processed, or failed with the error) commit together, and a row already
        processed is left alone. There is no message in hand, so nothing is acked, retried or
        dead-lettered, and ``deliveries`` stays the count the server made.
        """
        if self.handler is None:
            autodiscover()
        inbox = Inbox(self.config, self.durable, self.using)
        with transaction.atomic(using=self.using):
            row = inbox.manager.select_for_update().get(pk=pk)
            delivery = Delivery.stored(
                subject=row.subject,
                data=json.dumps(row.payload).encode(),
                headers=dict(getattr(row, "headers", None) or {}),
                stream=getattr(row, "stream", None) or "",
                consumer=self.durable,
                stream_seq=getattr(row, "stream_seq", None) or 0,
                deliveries=getattr(row, "deliveries", None) or 1,
            )
            event: dict[str, Any] | None = None
            error: Exception | None = None
            try:
                event = decode(delivery.data)
            except MalformedEnvelope as exc:
                error = exc
            outcome = self._process_one(inbox, delivery, event, error, Seen(row.pk, row.status))
            inbox.flush()
            return outcome

    def _process_one(
        self,
        inbox: Inbox | None,
        delivery: Delivery,
        event: dict[str, Any] | None,
        error: Exception | None,
        seen: Seen | None,
        *,
        savepoint: bool = True,
        defer: bool = True,
        index: int = 0,
        runs: _Runs | None = None,
    ) -> Outcome:
        if seen is not None and seen.status == InboxStatus.PROCESSED:
            return Outcome(delivery, Verdict.ACK, duplicate=True)
        if event is None:
            assert error is not None
            return self._fail(inbox, delivery, None, error, seen, reason=dlq.MALFORMED)
        fn = self.handler or self.registry.resolve(event["resource_type"], event["event_type"])
        if fn is None:
            missing = LookupError(
                f"no handler registered for {event['resource_type']}/{event['event_type']}"
            )
            return self._fail(inbox, delivery, event, missing, seen, reason=dlq.NO_HANDLER)
        runs = runs or _Runs()
        if index in runs.failed:
            # It failed in this batch's first pass, which was rolled back: record that.
            return self._handler_failed(inbox, delivery, event, runs.failed[index], seen)
        if index not in runs.timed:
            # One duration per message and batch: a rerun in a redo is not observed again.
            runs.timed.add(index)
            fn = metrics.timed(fn, self.durable)
        if not savepoint:
            return self._run_unprotected(fn, inbox, delivery, event, seen, defer, index)
        deferred = inbox.deferred() if inbox is not None else 0
        try:
            with transaction.atomic(using=self.using):  # a savepoint inside the batch
                self._run_handler(fn, inbox, delivery, event, seen, defer)
        except Exception as exc:
            if inbox is not None:
                # The savepoint rolled back: so does the row waiting for this message (its
                # release may fail after the handler returned and the row was deferred).
                inbox.forget_deferred(deferred)
            return self._handler_failed(inbox, delivery, event, exc, seen)
        return Outcome(delivery, Verdict.ACK)

    def _run_handler(
        self,
        fn: Handler,
        inbox: Inbox | None,
        delivery: Delivery,
        event: dict[str, Any],
        seen: Seen | None,
        defer: bool,
    ) -> None:
        if iscoroutinefunction(fn):
            async_to_sync(fn)(event, delivery.subject, delivery.deliveries)
        else:
            fn(event, delivery.subject, delivery.deliveries)
        if connections[self.using].needs_rollback:
            # It caught an error Django marked for rollback (or called set_rollback): its
            # writes will not commit, so it did not succeed. Without this, its savepoint would
            # roll back quietly and a deferred inbox row would ack the message unapplied.
            raise TransactionManagementError(
                "the handler returned with the transaction marked for rollback"
            )
        if inbox is not None:
            self._record(inbox, delivery, event, seen, InboxStatus.PROCESSED, defer=defer)

    def _run_unprotected(
        self,
        fn: Handler,
        inbox: Inbox | None,
        delivery: Delivery,
        event: dict[str, Any],
        seen: Seen | None,
        defer: bool,
        index: int,
    ) -> Outcome:
        """Run the handler straight in the batch transaction; on any trouble, stop the pass."""
        self._query_errors.clear()
        try:
            self._run_handler(fn, inbox, delivery, event, seen, defer)
        except Exception as exc:
            raise _RedoWithSavepoints(index, exc) from exc
        if self._transaction_spoiled():
            # The handler returned, but after a database error it caught: the transaction
            # may be unusable. It runs again in the redo, in its own savepoint.
            raise _RedoWithSavepoints(index, None)
        return Outcome(delivery, Verdict.ACK)

    def _transaction_spoiled(self) -> bool:
        connection = connections[self.using]
        if connection.vendor == "postgresql":
            # Exact and free (libpq keeps it): an error aborts the transaction, nothing else
            # does. A database error the handler caught inside its own savepoint is harmless.
            raw = connection.connection
            if raw is None:
                return True
            return int(raw.info.transaction_status) >= _PG_TRANSACTION_INERROR
        # SQLite and MySQL keep a transaction going after most failed statements, but not
        # after all (a MySQL deadlock rolls it back): any failed query makes the batch redo.
        return bool(self._query_errors)

    def _handler_failed(
        self,
        inbox: Inbox | None,
        delivery: Delivery,
        event: dict[str, Any],
        exc: Exception,
        seen: Seen | None,
    ) -> Outcome:
        if isinstance(exc, RejectMessage):
            return self._fail(inbox, delivery, event, exc, seen, reason=dlq.REJECTED)
        if isinstance(exc, DatabaseError) and (
            connections[self.using].needs_rollback or not _connection_usable(self.using)
        ):
            raise exc  # the batch transaction is broken: retry the whole batch
        return self._fail(inbox, delivery, event, exc, seen, reason=None)

    def _fail(
        self,
        inbox: Inbox | None,
        delivery: Delivery,
        event: dict[str, Any] | None,
        error: BaseException,
        seen: Seen | None,
        *,
        reason: str | None,
    ) -> Outcome:
        """Record a failure and decide: retry later, or dead-letter now."""
        if reason is None and self.policy.is_last(delivery.deliveries):
            reason = dlq.MAX_DELIVER
        message = f"{type(error).__name__}: {error}"
        if inbox is not None:
            try:
                with transaction.atomic(using=self.using):
                    self._record(inbox, delivery, event, seen, InboxStatus.FAILED, message)
            except IntegrityError:
                # Another worker recorded this event meanwhile; its row is the truth.
                logger.info("inbox row recorded concurrently", extra={"durable": self.durable})
            except DatabaseError as exc:
                if connections[self.using].needs_rollback or not _connection_usable(self.using):
                    raise  # the batch transaction is broken: retry the whole batch
                # This message's own row cannot be stored (PostgreSQL refuses \u0000 in JSON,
                # for one). Its savepoint is rolled back; letting the error escape would fail
                # every other message of the batch with it, delivery after delivery.
                logger.warning(
                    "could not record the failure in the inbox: %s",
                    exc,
                    extra={"durable": self.durable, "stream_seq": delivery.stream_seq},
                )
        if reason is None:
            delay = self.policy.delay_for(delivery.deliveries)
            logger.warning(
                "handler failed (delivery %d); retrying in %.1fs: %s",
                delivery.deliveries,
                delay,
                message,
                extra={"durable": self.durable, "stream_seq": delivery.stream_seq},
            )
            return Outcome(delivery, Verdict.RETRY, delay=delay)
        dead = dlq.DeadLetter(
            reason=reason,
            error_class=type(error).__name__,
            error_message=str(error),
            original_subject=delivery.subject,
            stream=delivery.stream,
            stream_seq=delivery.stream_seq,
            deliveries=delivery.deliveries,
            consumer=self.durable,
            event_id=(event or {}).get("event_id"),
        )
        return Outcome(delivery, Verdict.DEAD, dead=dead)

    def _record(
        self,
        inbox: Inbox,
        delivery: Delivery,
        event: dict[str, Any] | None,
        seen: Seen | None,
        status: str,
        error: str | None = None,
        *,
        defer: bool = False,
    ) -> None:
        inbox.record(
            existing=seen if seen is not None and seen.pk is not None else None,
            status=status,
            subject=delivery.subject,
            stream=delivery.stream,
            stream_seq=delivery.stream_seq,
            deliveries=delivery.deliveries,
            event=event,
            headers=delivery.headers,
            error=error,
            defer=defer,
            body=delivery.data,
        )


@dataclass
class _Runs:
    """What earlier passes over the same batch did, by the message's index in the batch."""

    # Handlers that raised in a pass without savepoints (rolled back): not run again.
    failed: dict[int, Exception] = field(default_factory=dict)
    # Handlers whose duration the metrics have observed.
    timed: set[int] = field(default_factory=set)


class _RedoWithSavepoints(Exception):
    """A handler failed in a batch run without savepoints: roll back, redo with savepoints.

    ``error`` is what the handler raised (``None`` when it returned but left the transaction
    unusable, and so must run again).
    """

    def __init__(self, index: int, error: Exception | None) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


_PG_TRANSACTION_INERROR = 3  # libpq PQTRANS_INERROR; PQTRANS_UNKNOWN (4) is worse


def _connection_usable(alias: str) -> bool:
    try:
        return bool(connections[alias].is_usable())
    except Exception:
        return False


def _fields(delivery: Delivery, dead: dlq.DeadLetter) -> dict[str, Any]:
    return {
        "reason": dead.reason,
        "error_class": dead.error_class,
        "subject": delivery.subject,
        "stream_seq": delivery.stream_seq,
        "deliveries": delivery.deliveries,
        "consumer": dead.consumer,
        "event_id": dead.event_id,
    }
