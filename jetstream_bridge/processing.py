"""The batch processor: received messages in, one outcome each, from one database transaction.

``BatchProcessor.process`` decodes a batch, looks its messages up in the inbox, runs the
handlers and writes the inbox rows in ONE transaction, and returns what to do with each message
(``Outcome``: ack, retry after a delay, or dead-letter). It settles nothing: the consumer acks
only after the transaction has committed. A crash before the commit applies nothing; a crash
after it leaves unacked messages that the inbox recognises when they come back.

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

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from asgiref.sync import async_to_sync, iscoroutinefunction
from django.db import DatabaseError, IntegrityError, connections, router, transaction
from django.db.transaction import TransactionManagementError

from . import metrics
from .conf import get_config
from .core import dead_letter
from .core.envelope import decode
from .core.errors import MalformedEnvelope, RejectMessage
from .core.settings import BridgeConfig
from .handlers import Handler, HandlerRegistry, autodiscover, registry
from .inbox import Inbox, Seen, inbox_model
from .models import InboxStatus
from .outcomes import Decisions, Outcome, ReceivedMessage, Verdict, describe

__all__ = ["BatchProcessor", "Outcome", "ReceivedMessage", "Verdict"]

logger = logging.getLogger(__name__)


class BatchProcessor:
    """Handle received messages for the durable ``durable`` on the database ``using``.

    ``handler`` (sync or ``async def``, called as ``handler(event, subject, deliveries)``)
    handles every event; without it ``registry`` decides per resource/event type. The caller
    runs it in Django's sync world (``sync_to_async(thread_sensitive=True)`` from async code).
    """

    def __init__(
        self,
        *,
        durable: str,
        handler: Handler | None = None,
        registry: HandlerRegistry = registry,
        using: str | None = None,
        config: BridgeConfig | None = None,
    ) -> None:
        self.config = config or get_config()
        self.durable = durable
        self.handler = handler
        self.registry = registry
        self.using = using or router.db_for_write(inbox_model(self.config))
        self.decisions = Decisions(self.config)
        # Batches rolled back after a handler failed and redone with a savepoint per message.
        self.redone = 0
        self._health = _TransactionHealth(self.using)

    def process(self, messages: Sequence[ReceivedMessage]) -> list[Outcome]:
        """Handle ``messages`` in one transaction; return an outcome each, in their order.

        Nothing is settled. A ``DatabaseError`` escapes when the transaction itself failed
        (nothing committed): ``after_database_error`` then says what to do with the messages.
        """
        runs = _Runs()
        savepoints = self.config.handler_savepoints == "always"
        defer = True
        while True:
            try:
                return self._run_pass(messages, _Pass(self._inbox(), savepoints, defer, runs))
            except _RedoWithSavepoints as redo:
                # The batch ran without a savepoint per message and one handler failed (or
                # left the transaction unusable): everything rolled back. Redo the batch with
                # a savepoint per message; the failed handler is not run again, its failure
                # is recorded from this exception.
                if redo.error is not None:
                    runs.failed[redo.index] = redo.error
                savepoints = True
                self.redone += 1
                logger.info(
                    "handler failed in a batch without savepoints; redoing the batch with a "
                    "savepoint per message",
                    extra={
                        "durable": self.durable,
                        "messages": len(messages),
                        "stream_seq": messages[redo.index].stream_seq,
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
                    extra={"durable": self.durable, "messages": len(messages)},
                )
                defer = False
                savepoints = True

    def process_message(self, message: ReceivedMessage) -> Outcome:
        """Handle one message outside a consumer, exactly as a batch of one (``testing.deliver``).

        The handler's writes and the inbox row commit together (in a savepoint when a
        transaction is already open, as in a test); nothing is settled.
        """
        [outcome] = self.process([message])
        return outcome

    def process_stored(self, pk: Any) -> Outcome:
        """Run the handler once more for the stored inbox row ``pk`` (the admin's re-run).

        The stored envelope takes the path a delivery takes: the handler's writes and the row's
        new status (processed, or failed with the error) commit together, and a row already
        processed is left alone (a duplicate ack). There is no message in hand, so nothing is
        acked, retried or dead-lettered, and ``deliveries`` stays the count the server made.
        Raises the inbox model's ``DoesNotExist`` when the row is gone.
        """
        if self.handler is None:
            autodiscover()
        inbox = Inbox(self.config, self.durable, self.using)
        with transaction.atomic(using=self.using):
            row = inbox.manager.select_for_update().get(pk=pk)
            message = ReceivedMessage(
                subject=row.subject,
                data=json.dumps(row.payload).encode(),
                headers=dict(getattr(row, "headers", None) or {}),
                stream=getattr(row, "stream", None) or "",
                stream_seq=getattr(row, "stream_seq", None) or 0,
                deliveries=getattr(row, "deliveries", None) or 1,
                consumer=self.durable,
            )
            item = replace(_decoded(0, message), seen=Seen(row.pk, row.status))
            outcome = self._process_item(_Pass(inbox, savepoints=True, defer=True), item)
            inbox.flush()
            return outcome

    def after_database_error(
        self, messages: Sequence[ReceivedMessage], error: DatabaseError
    ) -> list[Outcome]:
        """Return the outcomes for a batch whose transaction failed on the database.

        Nothing committed: every message is retried, except on its last delivery, when it is
        dead-lettered (the server would not deliver it again).
        """
        return [self.decisions.database_unavailable(message, error) for message in messages]

    # -- one pass over a batch ------------------------------------------------------------

    def _inbox(self) -> Inbox | None:
        return Inbox(self.config, self.durable, self.using) if self.config.use_inbox else None

    def _run_pass(self, messages: Sequence[ReceivedMessage], batch: _Pass) -> list[Outcome]:
        """Handle the batch in one transaction and decide each message.

        Without savepoints a failing handler raises ``_RedoWithSavepoints`` (rolling the whole
        transaction back).
        """
        items = [_decoded(index, message) for index, message in enumerate(messages)]
        inbox = batch.inbox
        with transaction.atomic(using=self.using), self._health.watching(not batch.savepoints):
            seen_ids: dict[str, Seen] = {}
            seen_seqs: dict[tuple[str, int], Seen] = {}
            if inbox is not None:
                seen_ids, seen_seqs = inbox.seen(
                    [item.event["event_id"] for item in items if item.event],
                    [(message.stream, message.stream_seq) for message in messages],
                )
            outcomes = []
            for item in items:
                seen = seen_ids.get(item.event["event_id"]) if item.event is not None else None
                seen = seen or seen_seqs.get((item.message.stream, item.message.stream_seq))
                outcome = self._process_item(batch, replace(item, seen=seen))
                outcomes.append(outcome)
                if item.event is not None and inbox is not None and outcome.verdict is Verdict.ACK:
                    # The same event twice in one batch: the second is a duplicate, whether
                    # the first created the inbox row or turned an earlier failure around.
                    seen_ids[item.event["event_id"]] = Seen(
                        seen.pk if seen is not None else None, InboxStatus.PROCESSED
                    )
            if inbox is not None:
                inbox.flush()
        return outcomes

    def _process_item(self, batch: _Pass, item: _Item) -> Outcome:
        if item.seen is not None and item.seen.status == InboxStatus.PROCESSED:
            return Outcome(item.message, Verdict.ACK, duplicate=True)
        if item.event is None:
            assert item.error is not None
            return self._fail(batch, item, item.error, reason=dead_letter.MALFORMED)
        fn = self.handler or self.registry.resolve(
            item.event["resource_type"], item.event["event_type"]
        )
        if fn is None:
            missing = LookupError(
                f"no handler registered for "
                f"{item.event['resource_type']}/{item.event['event_type']}"
            )
            return self._fail(batch, item, missing, reason=dead_letter.NO_HANDLER)
        if item.index in batch.runs.failed:
            # It failed in this batch's first pass, which was rolled back: record that.
            return self._handler_failed(batch, item, batch.runs.failed[item.index])
        if item.index not in batch.runs.timed:
            # One duration per message and batch: a rerun in a redo is not observed again.
            batch.runs.timed.add(item.index)
            fn = metrics.timed(fn, self.durable)
        if not batch.savepoints:
            return self._run_unprotected(fn, batch, item)
        return self._run_in_savepoint(fn, batch, item)

    def _run_in_savepoint(self, fn: Handler, batch: _Pass, item: _Item) -> Outcome:
        deferred = batch.inbox.deferred() if batch.inbox is not None else 0
        try:
            with transaction.atomic(using=self.using):  # a savepoint inside the batch
                self._run_handler(fn, batch, item)
        except Exception as exc:
            if batch.inbox is not None:
                # The savepoint rolled back: so does the row waiting for this message (its
                # release may fail after the handler returned and the row was deferred).
                batch.inbox.forget_deferred(deferred)
            return self._handler_failed(batch, item, exc)
        return Outcome(item.message, Verdict.ACK)

    def _run_unprotected(self, fn: Handler, batch: _Pass, item: _Item) -> Outcome:
        """Run the handler straight in the batch transaction; on any trouble, stop the pass."""
        self._health.forget_errors()
        try:
            self._run_handler(fn, batch, item)
        except Exception as exc:
            raise _RedoWithSavepoints(item.index, exc) from exc
        if self._health.spoiled():
            # The handler returned, but after a database error it caught: the transaction
            # may be unusable. It runs again in the redo, in its own savepoint.
            raise _RedoWithSavepoints(item.index, None)
        return Outcome(item.message, Verdict.ACK)

    def _run_handler(self, fn: Handler, batch: _Pass, item: _Item) -> None:
        assert item.event is not None
        message = item.message
        if iscoroutinefunction(fn):
            async_to_sync(fn)(item.event, message.subject, message.deliveries)
        else:
            fn(item.event, message.subject, message.deliveries)
        if connections[self.using].needs_rollback:
            # It caught an error Django marked for rollback (or called set_rollback): its
            # writes will not commit, so it did not succeed. Without this, its savepoint would
            # roll back quietly and a deferred inbox row would ack the message unapplied.
            raise TransactionManagementError(
                "the handler returned with the transaction marked for rollback"
            )
        if batch.inbox is not None:
            _record(batch.inbox, item, InboxStatus.PROCESSED, defer=batch.defer)

    def _handler_failed(self, batch: _Pass, item: _Item, exc: Exception) -> Outcome:
        if isinstance(exc, RejectMessage):
            return self._fail(batch, item, exc, reason=dead_letter.REJECTED)
        if isinstance(exc, DatabaseError) and self._health.broken():
            raise exc  # the batch transaction is broken: retry the whole batch
        return self._fail(batch, item, exc, reason=None)

    def _fail(
        self, batch: _Pass, item: _Item, error: BaseException, *, reason: str | None
    ) -> Outcome:
        """Record a failure and decide: retry later, or dead-letter now."""
        if batch.inbox is not None:
            self._record_failure(batch.inbox, item, describe(error))
        event_id = (item.event or {}).get("event_id")
        outcome = self.decisions.failed(item.message, error, reason=reason, event_id=event_id)
        if outcome.verdict is Verdict.RETRY:
            logger.warning(
                "handler failed (delivery %d); retrying in %.1fs: %s",
                item.message.deliveries,
                outcome.delay,
                describe(error),
                extra={"durable": self.durable, "stream_seq": item.message.stream_seq},
            )
        return outcome

    def _record_failure(self, inbox: Inbox, item: _Item, error: str) -> None:
        try:
            with transaction.atomic(using=self.using):
                _record(inbox, item, InboxStatus.FAILED, error)
        except IntegrityError:
            # Another worker recorded this event meanwhile; its row is the truth.
            logger.info("inbox row recorded concurrently", extra={"durable": self.durable})
        except DatabaseError as exc:
            if self._health.broken():
                raise  # the batch transaction is broken: retry the whole batch
            # This message's own row cannot be stored (PostgreSQL refuses \u0000 in JSON,
            # for one). Its savepoint is rolled back; letting the error escape would fail
            # every other message of the batch with it, delivery after delivery.
            logger.warning(
                "could not record the failure in the inbox: %s",
                exc,
                extra={"durable": self.durable, "stream_seq": item.message.stream_seq},
            )


@dataclass(frozen=True)
class _Item:
    """One message of a batch, decoded (or why not), with its inbox row if it has one."""

    index: int
    message: ReceivedMessage
    event: dict[str, Any] | None
    error: Exception | None  # why the body is not an envelope
    seen: Seen | None = None


@dataclass
class _Runs:
    """What earlier passes over the same batch did, by the message's index in the batch."""

    # Handlers that raised in a pass without savepoints (rolled back): not run again.
    failed: dict[int, Exception] = field(default_factory=dict)
    # Handlers whose duration the metrics have observed.
    timed: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Pass:
    """How one pass over a batch runs: its inbox, savepoints or not, rows deferred or not."""

    inbox: Inbox | None
    savepoints: bool
    defer: bool
    runs: _Runs = field(default_factory=_Runs)


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


class _TransactionHealth:
    """Tell whether the batch transaction on ``using`` is still usable after a handler ran."""

    def __init__(self, using: str) -> None:
        self.using = using
        self._query_errors: list[BaseException] = []

    @contextlib.contextmanager
    def watching(self, enabled: bool) -> Iterator[None]:
        """Note every failed query while the batch runs without savepoints.

        A handler may catch a database error itself. Inside its own savepoint that is harmless,
        but without one it can leave the batch transaction aborted (PostgreSQL) or, on MySQL, a
        deadlock may have rolled it back: the next handler would then fail for an error that
        is not its own. ``spoiled`` reads these notes after each handler.

        Not on PostgreSQL, where ``spoiled`` reads the transaction's state from libpq instead:
        a wrapper around every query of the batch would be work for nothing.
        """
        if not enabled:
            yield
            return
        self._query_errors = []
        connection = connections[self.using]
        if connection.vendor == "postgresql":
            yield
            return

        def note(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
            try:
                return execute(sql, params, many, context)
            except Exception as exc:
                self._query_errors.append(exc)
                raise

        with connection.execute_wrapper(note):
            yield

    def forget_errors(self) -> None:
        """Start noting failed queries afresh (before the next handler runs)."""
        self._query_errors.clear()

    def spoiled(self) -> bool:
        """Tell whether a query failed since ``forget_errors``, leaving the batch in doubt."""
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

    def broken(self) -> bool:
        """Tell whether the batch transaction cannot go on (marked for rollback or unusable)."""
        connection = connections[self.using]
        if connection.needs_rollback:
            return True
        try:
            return not connection.is_usable()
        except Exception:
            return True


def _decoded(index: int, message: ReceivedMessage) -> _Item:
    try:
        return _Item(index, message, decode(message.data), None)
    except MalformedEnvelope as exc:
        return _Item(index, message, None, exc)


def _record(
    inbox: Inbox, item: _Item, status: str, error: str | None = None, *, defer: bool = False
) -> None:
    """Insert or update the inbox row for ``item`` with ``status``."""
    seen = item.seen
    inbox.record(
        existing=seen if seen is not None and seen.pk is not None else None,
        status=status,
        message=item.message,
        event=item.event,
        error=error,
        defer=defer,
    )
