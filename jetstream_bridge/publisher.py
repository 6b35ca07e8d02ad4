"""Publish domain events: ``Publisher().publish(...)`` and ``await Publisher().publish_async(...)``.

With the outbox on, the event row is written in the caller's transaction, so it exists if and
only if the business data commits; after commit the fast path publishes it from the shared
connection without blocking the caller, and ``jetstream_relay`` sends whatever the fast path
could not. With the outbox off, a publish inside a transaction waits for the commit
(``transaction.on_commit``) and a publish outside one is sent at once.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import os
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from asgiref.sync import sync_to_async
from django.db import close_old_connections, transaction

from . import metrics
from .conf import get_config
from .connection import Connection, PubAck
from .core.config import BridgeConfig
from .core.envelope import MSG_ID_HEADER, build_envelope, encode
from .core.errors import PayloadTooLarge
from .outbox import NewEvent, OutboxStore, Outcome
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
class _Prepared:
    config: BridgeConfig
    envelope: dict[str, Any]
    data: bytes
    headers: dict[str, str]
    subject: str
    explicit_id: bool

    @property
    def event_id(self) -> str:
        return str(self.envelope["event_id"])

    def result(self, status: Status, ack: PubAck | None = None) -> PublishResult:
        if ack is not None and ack.duplicate:
            status = "duplicate"
        metrics.published(status)
        return PublishResult(
            self.event_id,
            self.subject,
            status,
            ack.stream if ack else None,
            ack.seq if ack else None,
        )


class Publisher:
    """Publish events for ``DESTINATION_APP`` on ``{env}.data.sync.{app}.{dest}``.

    ``using`` names the database alias whose transaction the outbox row joins.
    """

    def __init__(self, *, using: str | None = None) -> None:
        self.using = using

    def _prepare(
        self,
        *,
        resource_type: str,
        event_type: str,
        payload: Mapping[str, Any],
        event_id: str | None,
        trace_id: str | None,
        occurred_at: datetime | str | None,
        resource_id: str | None,
        headers: Mapping[str, str] | None,
    ) -> _Prepared:
        config = get_config()
        envelope = build_envelope(
            producer=config.app_name,
            resource_type=resource_type,
            event_type=event_type,
            payload=payload,
            event_id=event_id,
            trace_id=trace_id,
            occurred_at=occurred_at,
            resource_id=resource_id,
        )
        data = encode(envelope)
        limit = get_runtime().max_payload or DEFAULT_MAX_PAYLOAD
        if len(data) > limit:
            raise PayloadTooLarge(
                f"event {envelope['event_id']} is {len(data)} bytes; the server accepts at most "
                f"{limit}. Publish a reference (an id or URL) instead of the whole document."
            )
        extra = {str(k): str(v) for k, v in (headers or {}).items()}
        return _Prepared(
            config,
            envelope,
            data,
            {**extra, MSG_ID_HEADER: envelope["event_id"]},
            config.subjects.publish,
            explicit_id=event_id is not None,
        )

    # -- sync ---------------------------------------------------------------------------------

    def publish(
        self,
        *,
        resource_type: str,
        event_type: str,
        payload: Mapping[str, Any],
        event_id: str | None = None,
        trace_id: str | None = None,
        occurred_at: datetime | str | None = None,
        resource_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> PublishResult:
        """Publish one event; raise ``InvalidEvent`` (nothing written) on bad input."""
        prepared = self._prepare(
            resource_type=resource_type,
            event_type=event_type,
            payload=payload,
            event_id=event_id,
            trace_id=trace_id,
            occurred_at=occurred_at,
            resource_id=resource_id,
            headers=headers,
        )
        return self._dispatch(prepared)

    def _dispatch(self, prepared: _Prepared) -> PublishResult:
        if prepared.config.use_outbox:
            return self._write_outbox(prepared)
        if self._defer_until_commit(prepared):
            return prepared.result("deferred")
        ack = _sender.send(prepared)
        return prepared.result("sent", ack)

    def _defer_until_commit(self, prepared: _Prepared) -> bool:
        """Inside a transaction, send on commit (never on rollback); tell whether it did."""
        if not transaction.get_connection(self.using).in_atomic_block:
            return False
        transaction.on_commit(
            functools.partial(_sender.after_commit, prepared, self.using), using=self.using
        )
        logger.debug("publish deferred until commit", extra=_log_fields(prepared))
        return True

    def _write_outbox(self, prepared: _Prepared) -> PublishResult:
        pk, created = OutboxStore(prepared.config, using=self.using).write(
            NewEvent(
                prepared.event_id,
                prepared.subject,
                prepared.envelope,
                {k: v for k, v in prepared.headers.items() if k != MSG_ID_HEADER},
                prepared.explicit_id,
                encoded=prepared.data.decode(),  # the bytes the fast path publishes, as is
            )
        )
        if not created:
            logger.info("event already in the outbox", extra=_log_fields(prepared))
            return prepared.result("duplicate")
        logger.debug("event written to the outbox", extra=_log_fields(prepared))
        # on_commit runs at once when not in a transaction (the row is already committed).
        transaction.on_commit(
            functools.partial(_sender.after_commit, prepared, self.using, pk), using=self.using
        )
        return prepared.result("queued")

    # -- async --------------------------------------------------------------------------------

    async def publish_async(
        self,
        *,
        resource_type: str,
        event_type: str,
        payload: Mapping[str, Any],
        event_id: str | None = None,
        trace_id: str | None = None,
        occurred_at: datetime | str | None = None,
        resource_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> PublishResult:
        """Async twin of ``publish``; database work runs in Django's sync thread."""
        prepared = self._prepare(
            resource_type=resource_type,
            event_type=event_type,
            payload=payload,
            event_id=event_id,
            trace_id=trace_id,
            occurred_at=occurred_at,
            resource_id=resource_id,
            headers=headers,
        )
        if prepared.config.use_outbox:
            return await sync_to_async(self._write_outbox)(prepared)

        if await sync_to_async(self._defer_until_commit)(prepared):
            return prepared.result("deferred")
        ack = await _sender.send_async(prepared)
        return prepared.result("sent", ack)


def _log_fields(prepared: _Prepared) -> dict[str, Any]:
    return {
        "event_id": prepared.event_id,
        "subject": prepared.subject,
        "event_type": prepared.envelope["event_type"],
        "resource_type": prepared.envelope["resource_type"],
    }


async def _send(conn: Connection, prepared: _Prepared) -> PubAck:
    ack = await conn.publish(prepared.subject, prepared.data, prepared.headers)
    logger.debug(
        "event published",
        extra={**_log_fields(prepared), "stream_seq": ack.seq, "duplicate": ack.duplicate},
    )
    return ack


def _send_detached(prepared: _Prepared) -> None:
    """Publish after commit without an outbox; a failure can only be logged now."""

    def report(future: concurrent.futures.Future[PubAck]) -> None:
        error = future.exception()
        if error is not None:
            logger.error(
                "publish after commit failed; the event is lost because USE_OUTBOX is off: %s",
                error,
                extra=_log_fields(prepared),
            )

    get_runtime().submit(lambda conn: _send(conn, prepared)).add_done_callback(report)


class Sender:
    """Hand prepared events to JetStream.

    The publisher reaches NATS only through the module's ``_sender``; the testing kit
    (``jetstream_bridge.testing.capture``) swaps it for a recorder so users' tests need no broker.
    """

    def send(self, prepared: _Prepared) -> PubAck:
        """Publish now and wait for the stream's ack."""
        return get_runtime().call(lambda conn: _send(conn, prepared))

    async def send_async(self, prepared: _Prepared) -> PubAck:
        """Publish now and await the stream's ack."""
        return await get_runtime().run(lambda conn: _send(conn, prepared))

    def after_commit(self, prepared: _Prepared, using: str | None, pk: Any = None) -> None:
        """Send a committed event: outbox row ``pk`` via the fast path, or (no row) detached."""
        if pk is None:
            _send_detached(prepared)
        elif prepared.config.outbox_fast_path and not _held_for_order(prepared, using, pk):
            fast_path().submit(prepared, using, pk)


_sender = Sender()


def _held_for_order(prepared: _Prepared, using: str | None, pk: Any) -> bool:
    """With OUTBOX_ORDERING, leave a row to the relay while an earlier one of its resource waits.

    The relay publishes a resource's rows strictly in order; the fast path must not overtake.
    """
    resource_id = prepared.envelope.get("resource_id")
    if not (prepared.config.outbox_ordering and resource_id):
        return False
    store = OutboxStore(prepared.config, using=using)
    held = store.has_older_unsent(pk, str(prepared.envelope["resource_type"]), str(resource_id))
    if held:
        logger.debug("fast path skipped to keep resource order", extra=_log_fields(prepared))
    return held


class FastPath:
    """Publish committed outbox rows at once and record the results in bulk.

    The publish runs on the runtime loop; a small worker thread turns finished publishes into
    one UPDATE per drained batch. Anything it cannot do stays in the outbox for the relay.
    """

    def __init__(self) -> None:
        self._results: queue.SimpleQueue[
            tuple[_Prepared, str | None, Any, concurrent.futures.Future[PubAck]] | None
        ]
        self._results = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._in_flight = 0

    def submit(self, prepared: _Prepared, using: str | None, pk: Any) -> None:
        with self._idle:
            self._in_flight += 1
        self._ensure_worker()
        future = get_runtime().submit(lambda conn: _send(conn, prepared))
        future.add_done_callback(lambda f: self._results.put((prepared, using, pk, f)))

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, daemon=True, name="jetstream-bridge-fast-path"
                )
                self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._results.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 1000:
                try:
                    more = self._results.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._results.put(None)
                    break
                batch.append(more)
            try:
                self._record(batch)
            except Exception:
                logger.exception("could not record fast-path results; the relay will resend")
            finally:
                if self._results.empty():
                    # Idle: give the connection back unless CONN_MAX_AGE says to keep it, as
                    # at the end of a request. Closing it unconditionally made every batch
                    # at a steady rate open a new PostgreSQL session: at 300 commits/s that
                    # took ~40% of this thread and 2 ms of CPU per publish (benchmarks/).
                    close_old_connections()
                with self._idle:
                    self._in_flight -= len(batch)
                    self._idle.notify_all()

    @staticmethod
    def _record(
        batch: list[tuple[_Prepared, str | None, Any, concurrent.futures.Future[PubAck]]],
    ) -> None:
        by_target: dict[tuple[int, str | None], tuple[BridgeConfig, list[Outcome]]] = {}
        for prepared, using, pk, future in batch:
            key = (id(prepared.config), using)
            _, outcomes = by_target.setdefault(key, (prepared.config, []))
            error = future.exception()
            if error is not None:
                logger.warning(
                    "fast-path publish failed; the relay will retry: %s",
                    error,
                    extra=_log_fields(prepared),
                )
            # Attempt 1: the fast path is always a row's first try.
            outcomes.append(Outcome(pk, 1, error if error is not None else future.result()))
        for (_, using), (config, outcomes) in by_target.items():
            OutboxStore(config, using=using).record(outcomes)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every submitted publish is recorded (tests, graceful shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)


_fast_path: FastPath | None = None
_fast_path_lock = threading.Lock()


def fast_path() -> FastPath:
    global _fast_path
    if _fast_path is None:
        with _fast_path_lock:
            if _fast_path is None:
                _fast_path = FastPath()
    return _fast_path


@atexit.register
def _flush_fast_path_at_exit() -> None:
    # A short-lived process (a management command, a script) must not exit with publishes
    # in flight; what still fails here is left pending for the relay.
    if _fast_path is not None and not _fast_path.wait_idle(timeout=5.0):
        logger.warning("exiting with fast-path publishes unrecorded; the relay will send them")


def _forget_fast_path() -> None:
    global _fast_path, _fast_path_lock
    _fast_path, _fast_path_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_fast_path)
