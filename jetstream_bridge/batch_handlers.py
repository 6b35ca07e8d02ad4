"""Batch handlers: one call per consumer batch with every message of one type.

``@handler("order", "created", batch=True)`` registers ``fn(contexts)``, a list of
``MessageContext``. While ``processing.BatchProcessor`` passes over a batch, the messages whose
handler is a batch handler join that handler's group (``BatchGroups.join``) instead of running
at once: only messages the inbox has not seen processed, no replay meant for another durable,
one copy of each event. After the batch's single handlers, each group runs once, in the order
of its first message, in a savepoint of its own inside the batch transaction
(``BatchGroups.run``). Its outcome, message by message:

* the handler returns ``None`` (or an empty iterable): every message is applied. Their inbox
  rows are written in the group's savepoint, so they commit with the handler's writes.
* it returns an iterable of some of its contexts (or their event ids): those failed. Their
  inbox rows record the failure and they are retried after the backoff (dead-lettered on the
  last delivery, as a single handler's would be); the others are applied and acked. The
  handler's writes commit as a whole: it must not write the effects of a message it reports as
  failed. Anything else it returns (an id not in the group, a string) fails the whole group.
* it raises: the savepoint rolls back (its writes, its rows) and every message of the group
  fails with that error, as a single handler's would (``RejectMessage`` dead-letters them
  all). The other handlers' work in the batch is kept.
* an inbox row of the group that cannot be written (another worker processed the event
  meanwhile, a value the database refuses) rolls the savepoint back, and the group runs again
  without that message: no effect is kept without its row.

Single handlers run first, so a batch redone with a savepoint per message after one of them
failed (``HANDLER_SAVEPOINTS``, in ``processing``) is redone before its groups ran. A batch
redone for a refused inbox row runs its groups again (their writes were rolled back) except on
the messages they failed, whose failures are recorded instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync, iscoroutinefunction
from django.db import connections, transaction
from django.db.transaction import TransactionManagementError

from . import metrics
from .context import Invocation, MessageContext
from .inbox import Inbox
from .middleware import Chain, Prepared
from .outcomes import Outcome, Verdict

if TYPE_CHECKING:
    from .processing import _Item


class BatchMessageFailed(Exception):
    """A batch handler reported this message as failed (the inbox's ``last_error``)."""


class BatchResultError(TypeError):
    """A batch handler returned something that does not name its failed messages."""


@dataclass(frozen=True)
class GroupHost:
    """What a group needs of the processor's pass: where, how to record, how to fail."""

    using: str
    durable: str
    chain: Chain
    inbox: Inbox | None
    record: Callable[[_Item], None]  # the inbox row as processed; raises when refused
    fail: Callable[[_Item, Exception], Outcome]  # record the failure, retry or dead-letter

    def call(self, prepared: Prepared, contexts: list[MessageContext]) -> Any:
        """Run the batch handler on ``contexts`` through the middleware (one invocation)."""
        fn = prepared.registration.fn
        invocation = Invocation(tuple(contexts), fn, batch=True)
        result = self.chain.run(invocation, metrics.timed(_call_group, self.durable))
        if connections[self.using].needs_rollback:
            # It caught an error Django marked for rollback: its writes cannot commit.
            raise TransactionManagementError(
                "the batch handler returned with the transaction marked for rollback"
            )
        return result


def _call_group(invocation: Invocation) -> Any:
    fn, contexts = invocation.handler, list(invocation.messages)
    if iscoroutinefunction(fn):
        return async_to_sync(fn)(contexts)
    return fn(contexts)


@dataclass
class _Member:
    item: _Item
    prepared: Prepared


@dataclass
class _Group:
    prepared: Prepared  # the first member's (the registration is the group's)
    members: dict[str, _Member] = field(default_factory=dict)  # by event id, in batch order
    twins: list[_Item] = field(default_factory=list)  # later copies of a member's event


@dataclass
class BatchGroups:
    """The batch handlers' messages of one pass over a batch, by handler."""

    _groups: dict[Callable[..., Any], _Group] = field(default_factory=dict)

    def join(self, prepared: Prepared, item: _Item) -> None:
        """Add ``item`` (decoded, not yet processed, validated) to its handler's group."""
        group = self._groups.setdefault(prepared.registration.fn, _Group(prepared))
        event_id = str(prepared.event["event_id"])
        if event_id in group.members:
            group.twins.append(item)
        else:
            group.members[event_id] = _Member(item, prepared)

    def __bool__(self) -> bool:
        return bool(self._groups)

    def run(self, host: GroupHost, failed: dict[int, Exception]) -> dict[int, Outcome]:
        """Run every group once; return the outcome of each of their messages, by index.

        ``failed`` receives the batch index of each message that failed (a redo of the batch
        records those failures instead of running the group on them again).
        """
        outcomes: dict[int, Outcome] = {}
        groups, self._groups = list(self._groups.values()), {}
        for group in groups:
            outcomes.update(_run_group(host, group, failed))
        return outcomes


def _run_group(
    host: GroupHost, group: _Group, failures: dict[int, Exception]
) -> dict[int, Outcome]:
    outcomes: dict[int, Outcome] = {}
    members = dict(group.members)
    failed: set[str] = set()
    while members:
        try:
            failed = _call(host, group.prepared, members)
            break
        except _RowRefused as refused:
            # Rolled back: run the group again without the message whose row was refused.
            member = members.pop(refused.event_id)
            outcomes[member.item.index] = host.fail(member.item, refused.error)
        except Exception as exc:
            for member in members.values():
                failures[member.item.index] = exc
                outcomes[member.item.index] = host.fail(member.item, exc)
            members = {}
    for event_id, member in members.items():
        if event_id in failed:
            error = BatchMessageFailed("the batch handler reported this message as failed")
            failures[member.item.index] = error
            outcomes[member.item.index] = host.fail(member.item, error)
        else:
            outcomes[member.item.index] = Outcome(member.item.message, Verdict.ACK)
    for twin in group.twins:
        assert twin.event is not None
        first = group.members[str(twin.event["event_id"])].item
        if outcomes[first.index].applied:
            outcomes[twin.index] = Outcome(twin.message, Verdict.ACK, duplicate=True)
        else:
            outcomes[twin.index] = host.fail(twin, BatchMessageFailed("its copy failed"))
    return outcomes


def _call(host: GroupHost, prepared: Prepared, members: dict[str, _Member]) -> set[str]:
    """Run the handler on ``members`` in a savepoint; return the event ids it failed."""
    deferred = host.inbox.deferred() if host.inbox is not None else 0
    try:
        with transaction.atomic(using=host.using):
            contexts = [member.prepared.context() for member in members.values()]
            failed = failed_ids(host.call(prepared, contexts), members.keys())
            for event_id, member in members.items():
                if event_id in failed:
                    continue
                try:
                    host.record(member.item)
                except Exception as exc:
                    raise _RowRefused(event_id, exc) from exc
    except Exception:
        if host.inbox is not None:
            host.inbox.forget_deferred(deferred)  # the rows waiting for the rolled-back call
        raise
    return failed


def failed_ids(result: Any, group: Iterable[str]) -> set[str]:
    """The event ids a batch handler's ``result`` names as failed (``None``: none failed).

    ``result`` is an iterable of the group's contexts or event ids; anything else is an error
    that says what to return.
    """
    if result is None:
        return set()
    if isinstance(result, (str, bytes, MessageContext)) or not isinstance(result, Iterable):
        raise BatchResultError(
            f"a batch handler returns None or an iterable of the contexts (or event ids) that "
            f"failed, not {type(result).__name__}"
        )
    known = set(group)
    failed = set()
    for entry in result:
        event_id = entry.event_id if isinstance(entry, MessageContext) else entry
        if not isinstance(event_id, str) or event_id not in known:
            raise BatchResultError(
                f"a batch handler reported {entry!r:.80} as failed, which is not one of the "
                "messages it was given: return its contexts or their event ids"
            )
        failed.add(event_id)
    return failed


class _RowRefused(Exception):
    """The inbox row of the group's message ``event_id`` could not be written."""

    def __init__(self, event_id: str, error: Exception) -> None:
        super().__init__(event_id, error)
        self.event_id = event_id
        self.error = error
