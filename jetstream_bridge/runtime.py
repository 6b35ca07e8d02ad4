"""One background event loop per process that owns the shared NATS connection.

nats-py clients are bound to the loop they connected on, so sync callers (WSGI views, the
shell, management commands, Celery tasks) and async callers on other loops all hop onto this
loop instead of creating a client per call. The loop thread starts on first use, never at
import; after ``fork()`` the child starts its own.

When the settings change (``override_settings``, a reload) the runtime is retired, not torn
down: new work goes to a fresh runtime with the new settings, while the old one finishes the
jobs already handed to it and closes once it is idle. Closing it under in-flight publishes
used to fail them (``'NoneType' object has no attribute 'publish'``, ``Event loop is closed``).

``connect_or_wait`` is how worker commands start while NATS may still be down.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .broker import Connection
from .core.errors import NatsUnavailable
from .core.retry import reconnect_delays
from .core.settings import BridgeConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[Connection], Awaitable[T]]

DRAIN_TIMEOUT = 30.0  # longest a retired runtime waits for its jobs before closing anyway


class Runtime:
    """A daemon thread running an event loop, and the connection that lives on it."""

    def __init__(self, config_provider: Callable[[], BridgeConfig]) -> None:
        self._config_provider = config_provider
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        self._jobs = threading.Condition()  # guards the two fields below
        self._in_flight = 0
        self._closed = False  # retired and closed: jobs go to the current runtime

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                ready = threading.Event()
                loop = asyncio.new_event_loop()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="jetstream-bridge-loop", daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @property
    def max_payload(self) -> int | None:
        """The connected server's max payload, or ``None`` before the first connect."""
        connection = self._connection
        return connection.server_max_payload if connection is not None else None

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    async def connection(self, *, fresh: bool = False) -> Connection:
        """Return the connected shared connection; call only on the runtime loop.

        ``fresh``: try to connect even right after a failed attempt (see ``Connection``).
        """
        if self._connection is None:
            self._connection = Connection(self._config_provider())
        await self._connection.connect(now=fresh)
        return self._connection

    async def _run_job(self, job: Job[T], fresh: bool = False) -> T:
        return await job(await self.connection(fresh=fresh))

    def submit(self, job: Job[T], *, fresh: bool = False) -> concurrent.futures.Future[T]:
        """Schedule ``job(connection)`` on the runtime loop and return a thread-safe future."""
        with self._jobs:
            closed = self._closed
            if not closed:
                self._in_flight += 1
        if closed:
            # The caller held on to a runtime that a settings change retired and closed.
            return get_runtime().submit(job, fresh=fresh)
        coro: Coroutine[Any, Any, T] = self._run_job(job, fresh)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except BaseException:
            coro.close()
            self._job_done()
            raise
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, future: object = None) -> None:
        with self._jobs:
            self._in_flight -= 1
            self._jobs.notify_all()

    def connect(self) -> None:
        """Connect from sync code: a fresh attempt, even right after a failed one."""

        async def job(connection: Connection) -> None:
            return None

        self.submit(job, fresh=True).result()

    def retire(self, drain: float = DRAIN_TIMEOUT) -> None:
        """Close once the jobs in flight have finished (at most ``drain`` seconds).

        Until then a caller still holding this runtime may hand it more work; afterwards its
        jobs go to the current runtime.
        """
        with self._jobs:
            if not self._jobs.wait_for(lambda: self._in_flight == 0, drain) and drain:
                logger.warning(
                    "closing a retired nats connection with %d job(s) unfinished", self._in_flight
                )
            self._closed = True
        self.close()

    async def run(self, job: Job[T]) -> T:
        """Await ``job(connection)`` from any event loop."""
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is not None and current is self._loop:
            return await self._run_job(job)
        return await asyncio.wrap_future(self.submit(job))

    def call(self, job: Job[T], timeout: float | None = None) -> T:
        """Run ``job(connection)`` from sync code and return its result."""
        if self.in_loop_thread():
            raise RuntimeError(
                "sync jetstream-bridge call made on its own event loop; "
                "use the *_async variant there"
            )
        return self.submit(job).result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection and stop the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or loop.is_closed():
            return
        connection, self._connection = self._connection, None
        if connection is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(connection.close(), loop)
            try:
                future.result(timeout)
            except Exception:
                logger.debug("closing the nats connection failed", exc_info=True)
        if loop.is_running():
            # Jobs still running would never finish once the loop stops: cancel them, so
            # whoever waits on one (the fast path) sees it fail instead of waiting forever.
            future = asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), loop)
            try:
                future.result(timeout)
            except Exception:
                logger.debug("cancelling the loop's tasks failed", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    def forget(self) -> None:
        """Drop state inherited through ``fork()``: the parent's thread does not exist here."""
        _abandoned.append((self._loop, self._connection))
        self._loop = self._thread = self._connection = None
        self._lock = threading.Lock()
        self._jobs = threading.Condition()
        self._in_flight, self._closed = 0, True  # whoever still holds it gets the current one


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_abandoned: list[Any] = []  # keeps inherited objects alive so their finalizers never run
_retiring: set[Runtime] = set()  # retired runtimes still draining their jobs
_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """Return the process-wide runtime (created lazily, recreated after fork)."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                from .conf import get_config

                _runtime = Runtime(get_config)
    return _runtime


def reset_runtime() -> None:
    """Close the shared connection; the next call reconnects with the current settings."""
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.retire(drain=0)


def retire_runtime() -> None:
    """Hand new work to a fresh runtime; the current one closes when its jobs are done.

    Returns at once: with jobs in flight a background thread waits for them.
    """
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is None:
        return
    _retiring.add(runtime)

    def drain() -> None:
        try:
            runtime.retire()
        finally:
            _retiring.discard(runtime)

    threading.Thread(target=drain, name="jetstream-bridge-retire", daemon=True).start()


def connect_or_wait(stop: threading.Event, *, wait: bool = True) -> bool:
    """Connect the shared connection, waiting for NATS as long as it is unreachable.

    Each failed attempt is logged with the server (credentials hidden) and the pause before
    the next, which grows from 1 s to 30 s with jitter (``core.retry.reconnect_delays``).
    Returns ``False`` when ``stop`` is set first (SIGTERM while waiting). Without ``wait`` the
    first failure is raised; refused credentials are always raised, as waiting cannot fix
    them.
    """
    delays = reconnect_delays()
    for attempt in itertools.count(1):
        if stop.is_set():
            return False
        try:
            get_runtime().connect()
        except NatsUnavailable as exc:
            if not wait:
                raise
            delay = next(delays)
            logger.warning(
                "waiting for NATS (attempt %d): %s Next attempt in %.1fs.",
                attempt,
                exc,
                delay,
                extra={"attempt": attempt, "retry_in": round(delay, 1)},
            )
            stop.wait(delay)
        else:
            if attempt > 1:
                logger.info("NATS reachable after %d attempt(s)", attempt)
            return True
    raise AssertionError("unreachable")  # pragma: no cover


def _after_fork_in_child() -> None:
    global _runtime, _runtime_lock
    _runtime_lock = threading.Lock()
    for retired in list(_retiring):
        retired.forget()  # its drain thread does not exist in the child
    _retiring.clear()
    if _runtime is not None:
        _runtime.forget()
        _runtime = None


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(reset_runtime)
