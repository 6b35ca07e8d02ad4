"""The relay: publish what the fast path did not, from any number of processes at once.

On databases with ``SKIP LOCKED`` (PostgreSQL, MySQL 8, MariaDB 10.6) each round is one
transaction: lock a batch of due rows (``OutboxStore.lock``), publish it pipelined on the
shared connection, record the results, commit. Other relays skip the locked rows. A relay
that dies rolls back and its rows are due again at once; one that stalls is cut off by
PostgreSQL after ``RELAY_LEASE`` idle in the transaction. ``workers`` rounds run at once (each
thread with its own database connection), so one batch's publishing overlaps another's
database work.

On SQLite, whose one write lock cannot be held while publishing, a round leases its batch
instead (``OutboxStore.claim``), publishes after that commit, and records the results fenced
on the lease; claiming the next batch overlaps the previous batch's publishes. A relay that dies
leaves its rows leased until the lease expires.

Either way a re-sent row is dropped by the stream as a duplicate (``Nats-Msg-Id``; the
duplicate window is validated to be longer than the lease).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.db import close_old_connections, connections, transaction

from . import metrics, otel
from .broker import Connection, PubAck
from .conf import get_config
from .core.errors import NatsError
from .core.settings import BridgeConfig
from .outbox import ClaimedRow, OutboxStore, Outcome
from .provision import republish_missing
from .runtime import get_runtime
from .sql import postgresql
from .stream_audit import warn_at_start

logger = logging.getLogger(__name__)

Results = list[PubAck | Exception]


@dataclass
class RelayStats:
    sent: int = 0
    failed: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.sent / elapsed if elapsed > 0 else 0.0


class PollWaker:
    """Wake every ``interval`` seconds (or at once when stopped)."""

    kind = "polling"

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def wait(self, timeout: float) -> None:
        self.stop.wait(timeout)

    def close(self) -> None:
        pass


class PgNotifyWaker(PollWaker):
    """Wake on PostgreSQL ``NOTIFY`` from the publisher, polling as a fallback."""

    kind = "LISTEN/NOTIFY"

    def __init__(self, stop: threading.Event, alias: str) -> None:
        super().__init__(stop)
        params = connections[alias].get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        self.params = params
        self.conn: Any = self._listen()
        self.alias = alias

    def _listen(self) -> Any:
        import psycopg

        conn = psycopg.connect(**self.params, autocommit=True)
        postgresql.listen_outbox(conn)
        return conn

    def verify(self, timeout: float = 2.0) -> bool:
        """Send a notification through Django's own connection and wait for it here."""
        postgresql.notify_outbox(connections[self.alias], "probe")
        if not connections[self.alias].get_autocommit():
            connections[self.alias].commit()
        return any(True for _ in self.conn.notifies(timeout=timeout, stop_after=1))

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.conn is None:
                # The listening session was lost (database restart, terminated backend): an
                # error here used to escape run() and kill the relay. Poll while reconnecting.
                try:
                    self.conn = self._listen()
                except Exception as exc:
                    logger.warning("LISTEN reconnect failed (%s); polling meanwhile", exc)
                    self.stop.wait(remaining)
                    return
            try:
                # Short slices so SIGTERM is noticed quickly.
                for _ in self.conn.notifies(timeout=min(remaining, 0.5), stop_after=1):
                    return
            except Exception as exc:
                logger.warning("LISTEN connection lost (%s); reconnecting", exc)
                self.close()
                return  # notifications may have been missed meanwhile: look at the outbox now

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("closing the LISTEN connection failed", exc_info=True)


def _results(future: concurrent.futures.Future[Results], rows: list[ClaimedRow]) -> Results:
    """The batch's per-row results; a batch that never reached the server failed as a whole."""
    try:
        return future.result()
    except NatsError as exc:
        # The runtime connects before running the batch: an unreachable server fails here,
        # and the claimed rows must be recorded as failed, not left leased until expiry.
        return [exc] * len(rows)


class Relay:
    """Drain the outbox to JetStream. ``run()`` loops; ``drain()`` empties what is due.

    With ``workers`` > 1 (``jetstream_relay`` uses 2), ``drain()`` starts threads that live
    until ``close()``; ``run()`` closes them itself.
    """

    def __init__(
        self,
        *,
        using: str | None = None,
        batch_size: int | None = None,
        max_in_flight: int = 256,
        workers: int = 1,
        config: BridgeConfig | None = None,
    ) -> None:
        self.config = config or get_config()
        self.store = OutboxStore(self.config, using=using)
        self.using = self.store.alias
        self.batch_size = batch_size or self.config.relay_batch_size
        self.max_in_flight = max_in_flight
        self.locking = self.store.can_lock_rows
        # Leasing rounds already overlap publishing with the next claim in one thread.
        self.workers = max(1, workers) if self.locking else 1
        self.stop = threading.Event()
        self.stats = RelayStats()
        self._stats_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _publish(self, rows: list[ClaimedRow]) -> concurrent.futures.Future[Results]:
        async def job(conn: Connection) -> Results:
            # A row stored with a trace context is published in a PRODUCER span of its trace.
            spans = otel.ProducerSpans(self.config)
            items = [(row.subject, row.body, spans.start(row.subject, row.headers)) for row in rows]
            try:
                results = await conn.publish_many(items, max_in_flight=self.max_in_flight)
                # A subject no stream captures yet (a publish-only service): AUTO_PROVISION.
                results = await republish_missing(
                    conn, self.config, items, results, max_in_flight=self.max_in_flight
                )
            except BaseException as exc:
                spans.end([exc] * len(items))
                raise
            spans.end(results)
            return results

        return get_runtime().submit(job)

    @staticmethod
    def _unreachable() -> NatsError | None:
        """Connect the shared connection if needed; the error if NATS cannot be reached."""

        async def connected(conn: Connection) -> None:
            return None

        try:
            get_runtime().call(connected)
        except NatsError as exc:
            return exc
        return None

    def _record(self, token: str | None, rows: list[ClaimedRow], results: Results) -> None:
        """Record a batch's results: fenced on the lease ``token``, or (None) on held locks."""
        outcomes = [
            Outcome(row.pk, row.attempts, result) for row, result in zip(rows, results, strict=True)
        ]
        recorded = self.store.record(outcomes, token=token, locked=token is None)
        if recorded.failed:
            logger.warning(
                "relay publish failed for %d row(s): %s",
                recorded.failed,
                recorded.first_error,
                extra={"failed": recorded.failed},
            )
        with self._stats_lock:
            self.stats.sent += recorded.sent
            self.stats.failed += recorded.failed
            self.stats.batches += 1
        metrics.relayed(recorded.sent, recorded.failed)

    def drain(self) -> int:
        """Publish everything due now; return how many rows were claimed."""
        if not self.locking:
            return self._drain_leased()
        if self.workers == 1:
            return self._drain_locked()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.workers - 1, thread_name_prefix="jetstream-relay"
            )
        others = [self._pool.submit(self._drain_locked, True) for _ in range(self.workers - 1)]
        claimed = self._drain_locked()
        return claimed + sum(future.result() for future in others)

    def _drain_locked(self, in_pool: bool = False) -> int:
        """Lock, publish, record and commit batch after batch until nothing is due."""
        claimed = 0
        after: Any = None  # as in _drain_leased: claims start past the last key claimed
        while not self.stop.is_set():
            if in_pool:
                close_old_connections()  # what a request does; run() does it for its thread
            # Connect before taking any lock: a first connect may take CONNECT_TIMEOUT.
            unreachable = self._unreachable()
            with transaction.atomic(using=self.using):
                rows = self.store.lock(self.batch_size, after=after)
                if rows:
                    results: Results = (
                        [unreachable] * len(rows)
                        if unreachable is not None
                        else _results(self._publish(rows), rows)
                    )
                    self._record(None, rows, results)
            if not rows:
                if after is None:
                    # Each round claims after its own commit, so rows that recording made
                    # due (OUTBOX_ORDERING's next event of a resource) are seen here.
                    break
                after = None  # look behind the cursor once more (see _drain_leased)
                continue
            claimed += len(rows)
            after = rows[-1].pk
        return claimed

    def _drain_leased(self) -> int:
        claimed = 0
        pending: tuple[str, list[ClaimedRow], concurrent.futures.Future[Results]] | None
        pending = None
        # Claims start past the last key this drain claimed. From the start, PostgreSQL walks
        # the primary key past every row already sent (the claim orders by key): with a
        # 50,000-row backlog each claim got slower than the one before (benchmarks/).
        after: Any = None
        try:
            while not self.stop.is_set():
                token, rows = self.store.claim(self.batch_size, after=after)
                recorded = pending is not None
                if pending is not None:
                    self._record(pending[0], pending[1], _results(pending[2], pending[1]))
                    pending = None
                if not rows:
                    if after is not None:
                        # Rows behind the cursor may have become due meanwhile: a retry whose
                        # backoff ended, an expired lease, a transaction that took an earlier
                        # key and committed late. Look from the start before stopping.
                        after = None
                        continue
                    if recorded:
                        # This claim ran while the previous batch was still in flight, and
                        # recording that batch can make more rows due: with OUTBOX_ORDERING a
                        # resource's next event waits until the one before it is sent. Claim
                        # once more before calling the outbox drained, or `--once` would
                        # stop after the first event of each resource.
                        continue
                    break
                claimed += len(rows)
                after = rows[-1].pk  # rows come in key order
                pending = (token, rows, self._publish(rows))
        finally:
            if pending is not None:  # stopping: finish the batch in hand
                self._record(pending[0], pending[1], _results(pending[2], pending[1]))
        return claimed

    def _waker(self) -> PollWaker:
        if connections[self.using].vendor != "postgresql":
            return PollWaker(self.stop)
        try:
            waker = PgNotifyWaker(self.stop, self.using)
            if waker.verify():
                return waker
            waker.close()
            logger.warning("PostgreSQL notifications did not arrive; falling back to polling")
        except Exception as exc:
            logger.warning("LISTEN/NOTIFY unavailable (%s); falling back to polling", exc)
        return PollWaker(self.stop)

    def run(self, *, once: bool = False) -> RelayStats:
        """Relay until ``stop`` is set (or, with ``once``, until nothing is due)."""
        if once:
            try:
                self.drain()
            finally:
                self.close()
            return self.stats
        waker = self._waker()
        logger.info("relay started", extra={"wake": waker.kind, "batch_size": self.batch_size})
        warn_at_start(self.config, "relay")
        try:
            while not self.stop.is_set():
                try:
                    claimed = self.drain()
                except Exception:
                    logger.exception("relay round failed; retrying")
                    close_old_connections()
                    claimed = 0
                    self.stop.wait(self.config.relay_poll_interval)
                if claimed == 0:
                    waker.wait(self.config.relay_poll_interval)
                close_old_connections()
        finally:
            waker.close()
            self.close()
        return self.stats

    def close(self) -> None:
        """Stop the worker threads and close their database connections."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # One task per thread: each waits at the barrier, so no thread runs two.
        barrier = threading.Barrier(self.workers - 1, timeout=10)

        def close_connections() -> None:
            barrier.wait()
            connections.close_all()

        for future in [pool.submit(close_connections) for _ in range(self.workers - 1)]:
            try:
                future.result()
            except threading.BrokenBarrierError:
                logger.debug("a relay worker did not close its connections", exc_info=True)
        pool.shutdown()
