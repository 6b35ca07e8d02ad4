"""The after-commit fast path: publish a committed outbox row at once, beside the relay.

The publisher hands each committed row over (``hand_off``); the publish runs on the shared
connection's loop, and a small worker thread records the results in bulk through the same
recorder as the relay (``OutboxStore.record``). Anything it cannot do stays in the outbox for
``jetstream_relay``: a failed publish is recorded as failed (due again after its backoff), one
never recorded (the process died) is still pending.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import queue
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import close_old_connections

from .broker import PubAck
from .core.errors import NatsUnavailable
from .core.settings import BridgeConfig
from .outbox import OutboxStore, Outcome
from .provision import publish_provisioned
from .runtime import get_runtime

if TYPE_CHECKING:
    from .publisher import PreparedEvent

logger = logging.getLogger(__name__)

BATCH_LIMIT = 1000  # results recorded at once


class _Publish(NamedTuple):
    event: PreparedEvent
    using: str | None
    pk: Any
    future: concurrent.futures.Future[PubAck]


def hand_off(event: PreparedEvent, using: str | None, pk: Any) -> None:
    """Publish the committed outbox row ``pk`` now, unless settings leave it to the relay."""
    if event.config.outbox_fast_path and not _held_for_order(event, using, pk):
        fast_path().submit(event, using, pk)


def _held_for_order(event: PreparedEvent, using: str | None, pk: Any) -> bool:
    """With OUTBOX_ORDERING, leave a row to the relay while an earlier one of its resource waits.

    The relay publishes a resource's rows to each peer strictly in order; the fast path must
    not overtake. With several peers only rows for the same subject count: an event's copies
    for other peers (written just before this one) do not hold it.
    """
    resource_id = event.envelope.get("resource_id")
    if not (event.config.outbox_ordering and resource_id):
        return False
    store = OutboxStore(event.config, using=using)
    per_peer = event.subject if len(event.config.destinations) > 1 else None
    held = store.has_older_unsent(
        pk, str(event.envelope["resource_type"]), str(resource_id), per_peer
    )
    if held:
        logger.debug("fast path skipped to keep resource order", extra=event.log_fields())
    return held


class FastPath:
    """Publish committed outbox rows at once and record the results in bulk.

    The publish runs on the runtime loop; a small worker thread turns finished publishes into
    one UPDATE per drained batch.
    """

    def __init__(self) -> None:
        self._results: queue.SimpleQueue[_Publish | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._in_flight = 0

    def submit(self, event: PreparedEvent, using: str | None, pk: Any) -> None:
        with self._idle:
            self._in_flight += 1
        self._ensure_worker()
        future = get_runtime().submit(
            lambda conn: publish_provisioned(conn, event.config, event.publish)
        )
        future.add_done_callback(lambda f: self._results.put(_Publish(event, using, pk, f)))

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, daemon=True, name="jetstream-bridge-fast-path"
                )
                self._thread.start()

    def _next_batch(self) -> list[_Publish] | None:
        """Wait for a finished publish, then take whatever else has finished; None: stop."""
        item = self._results.get()
        if item is None:
            return None
        batch = [item]
        while len(batch) < BATCH_LIMIT:
            try:
                more = self._results.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._results.put(None)
                break
            batch.append(more)
        return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                _record(batch)
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

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every submitted publish is recorded (tests, graceful shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)


def _record(batch: list[_Publish]) -> None:
    """Record a batch of finished publishes, one store per settings object and database."""
    by_target: dict[tuple[int, str | None], tuple[BridgeConfig, list[Outcome]]] = {}
    for event, using, pk, future in batch:
        _, outcomes = by_target.setdefault((id(event.config), using), (event.config, []))
        error: BaseException | None = (
            NatsUnavailable("the connection closed before the publish finished")
            if future.cancelled()
            else future.exception()
        )
        if error is not None:
            logger.warning(
                "fast-path publish failed; the relay will retry: %s",
                error,
                extra=event.log_fields(),
            )
        # Attempt 1: the fast path is always a row's first try.
        outcomes.append(Outcome(pk, 1, error if error is not None else future.result()))
    for (_, using), (config, outcomes) in by_target.items():
        OutboxStore(config, using=using).record(outcomes)


_fast_path: FastPath | None = None
_fast_path_lock = threading.Lock()


def fast_path() -> FastPath:
    """The process's fast path (one per process; a forked child starts its own)."""
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
