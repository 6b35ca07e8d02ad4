"""Publish domain events: ``Publisher().publish(...)`` and ``await Publisher().publish_async(...)``.

The publisher prepares an event (envelope, validation, headers) and dispatches it. With the
outbox on, the event row is written in the caller's transaction, so it exists if and only if
the business data commits; after commit it is handed to the fast path (``fast_path``), which
publishes it from the shared connection without blocking the caller, and ``jetstream_relay``
sends whatever the fast path could not. With the outbox off, a publish inside a transaction
waits for the commit (``transaction.on_commit``) and a publish outside one is sent at once.

With several peers in ``DESTINATION_APP``, one publish makes one copy per destination
(``destination=``; every peer when left out), each its own outbox row and stream message,
written together or not at all; ``core/destinations.py`` names each copy's ``Nats-Msg-Id``.

Everything that leaves the process goes through the current ``Sender``; ``use_sender()``
replaces it for a block (the testing kit's ``capture_published`` records instead of sending).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

from asgiref.sync import sync_to_async
from django.db import transaction

from . import fast_path, metrics, otel
from .broker import Connection, PubAck
from .conf import get_config
from .core.destinations import Requested, copy_id_problem, message_id, resolve
from .core.envelope import (
    MSG_ID_HEADER,
    build_envelope,
    encode,
    header_problem,
    storage_problem,
)
from .core.errors import InvalidEvent, PayloadTooLarge
from .core.schemas import dump
from .core.settings import BridgeConfig
from .outbox import NewEvent, OutboxStore
from .provision import publish_provisioned
from .runtime import get_runtime

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # the server's default until we have asked it

Status = Literal["sent", "duplicate", "queued", "deferred"]


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` did.

    ``status`` is ``sent`` (the stream acknowledged it), ``duplicate`` (the stream or the
    outbox already had this ``event_id``), ``queued`` (written to the outbox; it is published
    after commit) or ``deferred`` (no outbox; it is published when the transaction commits).
    """

    event_id: str
    subject: str
    status: Status
    stream: str | None = None
    stream_seq: int | None = None


@dataclass(frozen=True)
class PreparedEvent:
    """An event built, validated and encoded, ready for the wire: what a ``Sender`` receives.

    ``data`` are the exact bytes published (the encoded envelope) and ``headers`` include
    ``Nats-Msg-Id``. ``explicit_id`` says the caller chose the event id (so it may repeat).
    ``destination`` is the peer this copy is for (``subject`` is its publish subject).
    """

    config: BridgeConfig
    envelope: dict[str, Any]
    data: bytes
    headers: dict[str, str]
    subject: str
    explicit_id: bool
    destination: str = ""

    @property
    def event_id(self) -> str:
        """The envelope's id, the same in every destination's copy."""
        return str(self.envelope["event_id"])

    @property
    def msg_id(self) -> str:
        """This copy's ``Nats-Msg-Id`` and outbox key (``core/destinations.message_id``)."""
        return self.headers[MSG_ID_HEADER]

    def log_fields(self) -> dict[str, Any]:
        """The fields every log line about this event carries (``extra=``)."""
        return {
            "event_id": self.event_id,
            "subject": self.subject,
            "event_type": self.envelope["event_type"],
            "resource_type": self.envelope["resource_type"],
        }

    async def publish(self, conn: Connection) -> PubAck:
        """Publish on ``conn`` and return the stream's ack.

        With a trace context in the headers, in a PRODUCER span whose context is sent.
        """
        with otel.producing(self.config, self.subject, self.headers) as headers:
            ack = await conn.publish(self.subject, self.data, headers)
        logger.debug(
            "event published",
            extra={**self.log_fields(), "stream_seq": ack.seq, "duplicate": ack.duplicate},
        )
        return ack


class Sender(Protocol):
    """Where prepared events go: the interface ``use_sender()`` takes.

    ``send``/``send_async`` return a ``PubAck`` (importable from here): the stream's name and
    sequence, and whether the stream dropped the message as a duplicate.

    The default (``NatsSender``) publishes to JetStream; the testing kit's ``Capture``
    records instead. A sender is called from the publishing thread (``send``), its event loop
    (``send_async``), or a commit hook (``after_commit``).
    """

    def send(self, event: PreparedEvent) -> PubAck:
        """Publish now (no outbox, no transaction) and return the stream's ack."""

    async def send_async(self, event: PreparedEvent) -> PubAck:
        """Async twin of ``send``."""

    def after_commit(self, event: PreparedEvent, using: str | None, pk: Any = None) -> None:
        """Send an event whose transaction committed, without waiting for the ack.

        ``pk`` is its outbox row, whose result must be recorded there; None without the
        outbox.
        """


class NatsSender:
    """Publish to JetStream on the shared connection (``runtime``): the default ``Sender``."""

    def send(self, event: PreparedEvent) -> PubAck:
        return get_runtime().call(
            lambda conn: publish_provisioned(conn, event.config, event.publish)
        )

    async def send_async(self, event: PreparedEvent) -> PubAck:
        return await get_runtime().run(
            lambda conn: publish_provisioned(conn, event.config, event.publish)
        )

    def after_commit(self, event: PreparedEvent, using: str | None, pk: Any = None) -> None:
        if pk is None:
            _send_detached(event)
        else:
            fast_path.hand_off(event, using, pk)


def _send_detached(event: PreparedEvent) -> None:
    """Publish after commit without an outbox; a failure can only be logged now."""

    def report(future: concurrent.futures.Future[PubAck]) -> None:
        error = future.exception()
        if error is not None:
            logger.error(
                "publish after commit failed; the event is lost because USE_OUTBOX is off: %s",
                error,
                extra=event.log_fields(),
            )

    get_runtime().submit(
        lambda conn: publish_provisioned(conn, event.config, event.publish)
    ).add_done_callback(report)


_sender: Sender = NatsSender()


def current_sender() -> Sender:
    """The sender publishes go through now."""
    return _sender


AnySender = TypeVar("AnySender", bound=Sender)


@contextmanager
def use_sender(sender: AnySender) -> Iterator[AnySender]:
    """Send every event published in the block through ``sender``, then restore the previous.

    The sender in use when an event is published is also the one that sends it after its
    transaction commits, even when that happens after the block. Process-wide, not per
    thread: threads and commit hooks of the block see it too.
    """
    global _sender
    previous, _sender = _sender, sender
    try:
        yield sender
    finally:
        _sender = previous


@dataclass(frozen=True)
class FanOutResult(PublishResult):
    """What a publish to several destinations did: a ``PublishResult`` per destination.

    Returned when ``destination`` is a list or tuple, or is left out while ``DESTINATION_APP``
    names several peers (a publish to one peer returns a plain ``PublishResult``, as it always
    has). ``copies`` maps each destination, in settings order, to its copy's result (same
    ``event_id``, its own ``subject`` and ``status``). The inherited fields describe the first
    copy, so code written for one peer keeps working; read ``copies`` for the others.
    """

    copies: Mapping[str, PublishResult] = field(default_factory=dict)


@dataclass(frozen=True)
class _Request:
    """The fields a caller passed to ``publish``."""

    resource_type: str
    event_type: str
    payload: Mapping[str, Any] | object
    event_id: str | None
    trace_id: str | None
    occurred_at: datetime | str | None
    resource_id: str | None
    headers: Mapping[str, str] | None
    destination: Requested = None


class Publisher:
    """Publish events to the peers in ``DESTINATION_APP`` on ``{env}.data.sync.{app}.{dest}``.

    ``using`` names the database alias whose transaction the outbox row joins.
    """

    def __init__(self, *, using: str | None = None) -> None:
        self.using = using

    # -- sync ---------------------------------------------------------------------------------

    def publish(  # noqa: PLR0913 (public keyword-only API)
        self,
        *,
        resource_type: str,
        event_type: str,
        payload: Mapping[str, Any] | object,
        event_id: str | None = None,
        trace_id: str | None = None,
        occurred_at: datetime | str | None = None,
        resource_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        destination: str | Sequence[str] | None = None,
    ) -> PublishResult:
        """Publish one event; raise ``InvalidEvent`` (nothing written) on bad input.

        ``destination`` is one peer of ``DESTINATION_APP``, several (a list), or None: every
        peer. A publish to one peer returns its ``PublishResult``, to several a
        ``FanOutResult``. A peer not in ``DESTINATION_APP`` raises ``UnknownDestination``.
        ``payload`` may be a pydantic model (``model_dump(mode="json")``) or a dataclass.
        """
        request = _Request(
            resource_type,
            event_type,
            payload,
            event_id,
            trace_id,
            occurred_at,
            resource_id,
            headers,
            destination,
        )
        copies = self._prepare(request)
        if copies[0].config.use_outbox:
            results = self._write_outbox(copies)
        elif self._defer_until_commit(copies):
            results = [_result(copy, "deferred") for copy in copies]
        else:
            results = [_result(copy, "sent", _sender.send(copy)) for copy in copies]
        return _report(request, copies, results)

    # -- async --------------------------------------------------------------------------------

    async def publish_async(  # noqa: PLR0913 (public keyword-only API)
        self,
        *,
        resource_type: str,
        event_type: str,
        payload: Mapping[str, Any] | object,
        event_id: str | None = None,
        trace_id: str | None = None,
        occurred_at: datetime | str | None = None,
        resource_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        destination: str | Sequence[str] | None = None,
    ) -> PublishResult:
        """Async twin of ``publish``; database work runs in Django's sync thread."""
        request = _Request(
            resource_type,
            event_type,
            payload,
            event_id,
            trace_id,
            occurred_at,
            resource_id,
            headers,
            destination,
        )
        copies = self._prepare(request)
        if copies[0].config.use_outbox:
            results = await sync_to_async(self._write_outbox)(copies)
        elif await sync_to_async(self._defer_until_commit)(copies):
            results = [_result(copy, "deferred") for copy in copies]
        else:
            results = [_result(copy, "sent", await _sender.send_async(copy)) for copy in copies]
        return _report(request, copies, results)

    # -- preparing and dispatching ------------------------------------------------------------

    @staticmethod
    def _prepare(request: _Request) -> tuple[PreparedEvent, ...]:
        """Build, validate and encode the envelope, one copy per destination.

        Raise ``InvalidEvent``/``PayloadTooLarge``/``UnknownDestination`` before anything is
        written.
        """
        config = get_config()
        targets = resolve(request.destination, config.destinations)
        envelope = build_envelope(
            producer=config.app_name,
            resource_type=request.resource_type,
            event_type=request.event_type,
            payload=dump(request.payload),  # a pydantic model or a dataclass: as JSON data
            event_id=request.event_id,
            trace_id=request.trace_id or otel.trace_id_of_current(config),
            occurred_at=request.occurred_at,
            resource_id=request.resource_id,
        )
        data = encode(envelope)
        problem = storage_problem(envelope, data) or copy_id_problem(
            envelope["event_id"], targets, config.destinations
        )
        if problem:
            raise InvalidEvent(f"event {envelope['event_id']} cannot be stored: {problem}")
        limit = get_runtime().max_payload or DEFAULT_MAX_PAYLOAD
        if len(data) > limit:
            raise PayloadTooLarge(
                f"event {envelope['event_id']} is {len(data)} bytes; the server accepts at most "
                f"{limit}. Publish a reference (an id or URL) instead of the whole document."
            )
        headers = _checked_headers(request.headers)
        # The active trace, as W3C headers stored with the row: the relay continues it too.
        headers.update(otel.outgoing(config, headers))
        return tuple(
            PreparedEvent(
                config,
                envelope,
                data,
                {
                    **headers,
                    MSG_ID_HEADER: message_id(envelope["event_id"], peer, config.destinations),
                },
                config.subjects_for(peer).publish,
                explicit_id=request.event_id is not None,
                destination=peer,
            )
            for peer in targets
        )

    def _defer_until_commit(self, copies: Sequence[PreparedEvent]) -> bool:
        """Inside a transaction, send on commit (never on rollback); tell whether it did."""
        if not transaction.get_connection(self.using).in_atomic_block:
            return False
        for copy in copies:
            transaction.on_commit(
                functools.partial(_sender.after_commit, copy, self.using), using=self.using
            )
            logger.debug("publish deferred until commit", extra=copy.log_fields())
        return True

    def _write_outbox(self, copies: Sequence[PreparedEvent]) -> list[PublishResult]:
        """One row per copy, all or none, in the caller's transaction; each sent after commit."""
        written = OutboxStore(copies[0].config, using=self.using).write_many(
            [
                NewEvent(
                    copy.msg_id,
                    copy.subject,
                    copy.envelope,
                    {k: v for k, v in copy.headers.items() if k != MSG_ID_HEADER},
                    copy.explicit_id,
                    encoded=copy.data.decode(),  # the bytes the fast path publishes, as is
                )
                for copy in copies
            ]
        )
        results = []
        for copy, (pk, created) in zip(copies, written, strict=True):
            if not created:
                logger.info("event already in the outbox", extra=copy.log_fields())
                results.append(_result(copy, "duplicate"))
                continue
            logger.debug("event written to the outbox", extra=copy.log_fields())
            # on_commit runs at once when not in a transaction (the row is already committed).
            transaction.on_commit(
                functools.partial(_sender.after_commit, copy, self.using, pk), using=self.using
            )
            results.append(_result(copy, "queued"))
        return results


def _report(
    request: _Request, copies: Sequence[PreparedEvent], results: Sequence[PublishResult]
) -> PublishResult:
    """One peer's ``PublishResult`` for a publish to one peer, else a ``FanOutResult``."""
    if isinstance(request.destination, str) or (request.destination is None and len(results) == 1):
        return results[0]
    first = results[0]
    return FanOutResult(
        first.event_id,
        first.subject,
        first.status,
        first.stream,
        first.stream_seq,
        copies={copy.destination: result for copy, result in zip(copies, results, strict=True)},
    )


def _checked_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Return the caller's headers; raise ``InvalidEvent`` for one that cannot travel as is."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidEvent(f"headers must be a dict, got {type(headers).__name__}")
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem:
            raise InvalidEvent(problem)
    return dict(headers)


def _result(event: PreparedEvent, status: Status, ack: PubAck | None = None) -> PublishResult:
    """The caller's ``PublishResult``, counted in the ``published`` metric."""
    if ack is not None and ack.duplicate:
        status = "duplicate"
    metrics.published(status)
    return PublishResult(
        event.event_id,
        event.subject,
        status,
        ack.stream if ack else None,
        ack.seq if ack else None,
    )


__all__ = [
    "FanOutResult",
    "NatsSender",
    "PreparedEvent",
    "PubAck",
    "PublishResult",
    "Publisher",
    "Sender",
    "current_sender",
    "use_sender",
]
