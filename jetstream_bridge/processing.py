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

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from django.db import (
    DatabaseError,
    DataError,
    IntegrityError,
    connections,
    router,
    transaction,
)
from django.db.transaction import TransactionManagementError

from . import metrics
from .batch_handlers import BatchGroups, GroupHost
from .conf import get_config
from .core import dead_letter
from .core.envelope import FieldLimits, decode
from .core.errors import InvalidPayload, MalformedEnvelope, RejectMessage
from .core.settings import BridgeConfig
from .core.subjects import producer_of
from .handlers import (
    Handler,
    HandlerRegistry,
    Registration,
    autodiscover,
    registration_of,
    registry,
)
from .inbox import Inbox, Seen, field_limits, inbox_model
from .middleware import Middleware, chain_for, prepare
from .models import InboxStatus
from .outcomes import Decisions, Outcome, ReceivedMessage, Verdict, describe
from .transaction_health import TransactionHealth, database_unavailable

__all__ = ["BatchProcessor", "Outcome", "ReceivedMessage", "Verdict"]

logger = logging.getLogger(__name__)


class BatchProcessor:
    """Handle received messages for the durable ``durable`` on the database ``using``.

    ``handler`` (sync or ``async def``, called as its ``Registration`` says) handles every
    event, else ``registry`` decides per type; ``middleware`` runs inside the configured chain.
    The caller runs it in Django's sync world (``sync_to_async`` from async code).
    """

    def __init__(
        self,
        *,
        durable: str,
        handler: Handler | Registration | None = None,
        registry: HandlerRegistry = registry,
        using: str | None = None,
        config: BridgeConfig | None = None,
        middleware: Iterable[Middleware] = (),
    ) -> None:
        self.config = config or get_config()
        self.durable = durable
        self.handler = registration_of(handler) if handler is not None else None
        self.registry = registry
        self.chain = chain_for(self.config, middleware)
        model = inbox_model(self.config)
        self.using = using or router.db_for_write(model)
        # An id or type longer than the inbox columns makes its message malformed (decode).
        self.limits = field_limits(model)
        self.decisions = Decisions(self.config)
        # Batches rolled back after a handler failed and redone with a savepoint per message.
        self.redone = 0
        self._health = TransactionHealth(self.using)

    def process(self, messages: Sequence[ReceivedMessage]) -> list[Outcome]:
        """Handle ``messages`` in one transaction; return an outcome each, in their order.

        Nothing is settled. A ``DatabaseError`` escapes only when the database is unavailable
        (connection lost, lock timeout: nothing committed): ``after_database_error`` then says
        what to do with the messages. Any other error fails the batch, is logged, and the
        batch is redone one message per transaction, so only the message that causes it fails
        (``Decisions.unexpected``: retried, dead-lettered on its last delivery) and the others
        are applied.
        """
        try:
            return self._process(messages)
        except Exception as exc:
            if database_unavailable(exc):
                raise
            logger.exception(
                "batch failed unexpectedly; redoing it one message at a time",
                extra={"durable": self.durable, "messages": len(messages)},
            )
            if len(messages) == 1:
                return [self.decisions.unexpected(messages[0], exc)]
        outcomes = []
        for message in messages:
            try:
                outcomes += self._process([message])
            except Exception as exc:
                if database_unavailable(exc):
                    raise
                logger.exception("message failed unexpectedly", extra={"durable": self.durable})
                outcomes.append(self.decisions.unexpected(message, exc))
        return outcomes

    def _process(self, messages: Sequence[ReceivedMessage]) -> list[Outcome]:
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
            except (IntegrityError, DataError) as exc:
                if not defer:
                    raise
                # The batch's one inbox INSERT met a row another worker committed meanwhile,
                # or a value the database refuses: the whole batch rolled back, handler writes
                # included. Redo it with an INSERT per message inside each savepoint, so only
                # the events handled elsewhere fail (and come back to be acked as duplicates)
                # or the one that cannot be stored (dead-lettered as malformed) instead of the
                # batch counting as an outage.
                logger.info(
                    "inbox rows of a batch refused (%s); redoing it message by message",
                    type(exc).__name__,
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
            message = ReceivedMessage.stored(row, self.durable)
            item = replace(_decoded(0, message, self.limits), seen=Seen(row.pk, row.status))
            batch = _Pass(inbox, savepoints=True, defer=True)
            outcome = self._process_item(batch, item) or self._run_groups(batch, [None])[0]
            inbox.flush()
            return outcome

    def after_database_error(
        self, messages: Sequence[ReceivedMessage], error: Exception
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
        items = [_decoded(index, message, self.limits) for index, message in enumerate(messages)]
        inbox = batch.inbox
        with transaction.atomic(using=self.using), self._health.watching(not batch.savepoints):
            seen_ids, seen_seqs = _seen(inbox, items)
            outcomes: list[Outcome | None] = []
            for item in items:
                seen = seen_ids.get(item.event["event_id"]) if item.event is not None else None
                seen = seen or seen_seqs.get((item.message.stream, item.message.stream_seq))
                outcome = self._process_item(batch, replace(item, seen=seen))
                outcomes.append(outcome)
                if item.event is not None and inbox is not None and outcome and outcome.applied:
                    # The same event twice in one batch: the second is a duplicate, whether
                    # the first created the inbox row or turned an earlier failure around.
                    seen_ids[item.event["event_id"]] = Seen(
                        seen.pk if seen is not None else None, InboxStatus.PROCESSED
                    )
            done = self._run_groups(batch, outcomes)
            if inbox is not None:
                inbox.flush()
        return done

    def _run_groups(self, batch: _Pass, outcomes: list[Outcome | None]) -> list[Outcome]:
        """Run the pass's batch handlers (``batch_handlers``) and fill in their outcomes."""
        if batch.groups:
            record, fail = partial(_record_applied, batch), partial(self._handler_failed, batch)
            host = GroupHost(self.using, self.durable, self.chain, batch.inbox, record, fail)
            for index, outcome in batch.groups.run(host, batch.runs.failed).items():
                outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _process_item(self, batch: _Pass, item: _Item) -> Outcome | None:
        if (skipped := self.decisions.replay_for_another(item.message)) is not None:
            return skipped  # a replay for another durable: acked, not handled
        if item.seen is not None and item.seen.status == InboxStatus.PROCESSED:
            return Outcome(item.message, Verdict.ACK, duplicate=True)
        if item.event is None:
            assert item.error is not None
            return self._fail(batch, item, item.error, reason=dead_letter.MALFORMED)
        style, producer = _registered(self.handler, self.registry, item, self.config)
        if style is None:
            missing = LookupError(
                f"no handler registered for "
                f"{item.event['resource_type']}/{item.event['event_type']}"
            )
            return self._fail(batch, item, missing, reason=dead_letter.NO_HANDLER)
        if item.index in batch.runs.failed:
            # It failed in this batch's first pass, which was rolled back: record that.
            return self._handler_failed(batch, item, batch.runs.failed[item.index])
        try:
            prepared = prepare(style, item.message, item.event, producer)
        except InvalidPayload as exc:  # a typed handler's payload: retries cannot fix it
            return self._fail(batch, item, exc, reason=dead_letter.INVALID)
        if style.batch:
            batch.groups.join(prepared, item)  # handled with its group, after this pass
            return None
        fn = partial(self.chain.call, prepared)
        if item.index not in batch.runs.timed:
            # One duration per message and batch: a rerun in a redo is not observed again.
            batch.runs.timed.add(item.index)
            fn = metrics.timed(fn, self.durable)
        if not batch.savepoints:
            return self._run_unprotected(fn, batch, item)
        return self._run_in_savepoint(fn, batch, item)

    def _run_in_savepoint(self, fn: Callable[[], Any], batch: _Pass, item: _Item) -> Outcome:
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

    def _run_unprotected(self, fn: Callable[[], Any], batch: _Pass, item: _Item) -> Outcome:
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

    def _run_handler(self, fn: Callable[[], Any], batch: _Pass, item: _Item) -> None:
        fn()  # the handler, through the middleware chain
        if connections[self.using].needs_rollback:
            # It caught an error Django marked for rollback (or called set_rollback): its
            # writes will not commit, so it did not succeed. Without this, its savepoint would
            # roll back quietly and a deferred inbox row would ack the message unapplied.
            raise TransactionManagementError(
                "the handler returned with the transaction marked for rollback"
            )
        _record_applied(batch, item)

    def _handler_failed(self, batch: _Pass, item: _Item, exc: Exception) -> Outcome:
        if isinstance(exc, RejectMessage):
            return self._fail(batch, item, exc, reason=dead_letter.REJECTED)
        if isinstance(exc, _Unstorable):
            # Record its failure without what could not be stored (the event's fields, the
            # headers); the dead letter carries the message as received.
            bare = replace(item, event=None, message=replace(item.message, headers={}))
            outcome = self._fail(batch, bare, exc.error, reason=dead_letter.MALFORMED)
            return replace(outcome, message=item.message)
        if isinstance(exc, DatabaseError) and self._health.broken():
            raise exc  # the batch transaction is broken: retry the whole batch
        return self._fail(batch, item, exc, reason=None)

    def _fail(
        self, batch: _Pass, item: _Item, error: BaseException, *, reason: str | None
    ) -> Outcome:
        """Record a failure and decide: retry later, or dead-letter now."""
        if batch.inbox is not None:
            _record_failure(batch.inbox, item, describe(error), self._health)
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
    groups: BatchGroups = field(default_factory=BatchGroups)  # the batch handlers' messages


class _Unstorable(Exception):
    """The inbox row of a message that the handler applied cannot be stored: ``error`` says why."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _RedoWithSavepoints(Exception):
    """A handler failed in a batch run without savepoints: roll back, redo with savepoints.

    ``error`` is what the handler raised (``None`` when it returned but left the transaction
    unusable, and so must run again).
    """

    def __init__(self, index: int, error: Exception | None) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _record_applied(batch: _Pass, item: _Item) -> None:
    """Record ``item`` as processed in the inbox (deferred to the flush when ``batch.defer``)."""
    if batch.inbox is not None:
        try:
            _record(batch.inbox, item, InboxStatus.PROCESSED, defer=batch.defer)
        except (DataError, UnicodeError) as exc:
            # The database refuses its row (a value longer than a custom column, a header
            # PostgreSQL's JSON cannot hold): malformed, it would fail on every delivery.
            raise _Unstorable(exc) from exc


def _record_failure(inbox: Inbox, item: _Item, error: str, health: TransactionHealth) -> None:
    """Record ``item``'s failure in its own savepoint; a row that cannot be stored is logged."""
    durable = inbox.consumer
    try:
        with transaction.atomic(using=inbox.manager.db):
            _record(inbox, item, InboxStatus.FAILED, error)
    except IntegrityError:
        # Another worker recorded this event meanwhile; its row is the truth.
        logger.info("inbox row recorded concurrently", extra={"durable": durable})
    except (DatabaseError, UnicodeError) as exc:
        if isinstance(exc, DatabaseError) and health.broken():
            raise  # the batch transaction is broken: retry the whole batch
        # Its own row cannot be stored (PostgreSQL refuses \u0000 in JSON): its savepoint
        # rolled back; escaping, the error would fail every other message of the batch too.
        logger.warning(
            "could not record the failure in the inbox: %s",
            exc,
            extra={"durable": durable, "stream_seq": item.message.stream_seq},
        )


def _registered(
    handler: Registration | None, registry: HandlerRegistry, item: _Item, config: BridgeConfig
) -> tuple[Registration | None, str | None]:
    """The handler for ``item`` (``handler``, or the registry's) and its producer.

    The producer is read from the delivery subject, never from a header.
    """
    assert item.event is not None
    producer = producer_of(item.message.subject, config.env, config.app_name)
    if handler is not None:
        return handler, producer
    return registry.lookup(
        item.event["resource_type"], item.event["event_type"], producer
    ), producer


def _seen(
    inbox: Inbox | None, items: Sequence[_Item]
) -> tuple[dict[str, Seen], dict[tuple[str, int], Seen]]:
    """The inbox rows already recorded for the batch's event ids and stream sequences."""
    if inbox is None:
        return {}, {}
    return inbox.seen(
        [item.event["event_id"] for item in items if item.event],
        [(item.message.stream, item.message.stream_seq) for item in items],
    )


def _decoded(index: int, message: ReceivedMessage, limits: FieldLimits) -> _Item:
    try:
        return _Item(index, message, decode(message.data, limits), None)
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
