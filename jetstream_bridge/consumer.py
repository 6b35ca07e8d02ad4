"""Durable pull consumer: one loop per peer, each fetching, handing over and settling.

Each peer this service hears from (``DESTINATION_APP``, or the ``peers`` given) is consumed on
its own durable (``core/topology_plan.peer_durable``: the default peer keeps the name given,
every other peer gets ``{name}-{peer}``) by its own ``consumer_loop.PeerLoop``. With several
peers the loops run concurrently, each with its own database thread and connection, so a slow
handler of one peer never holds up another peer's events (on SQLite, with one writer, their
batch transactions take turns). With one peer the single loop runs exactly as a single-peer
service always has.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

from django.db import connections

from .conf import get_config
from .consumer_loop import IDLE_CHECK_EVERY, ConsumerStats, LoopOptions, PeerLoop
from .core.settings import BridgeConfig
from .core.topology_plan import peer_durables
from .handlers import Handler, HandlerRegistry, Registration, autodiscover, registry
from .middleware import Middleware
from .processing import BatchProcessor

logger = logging.getLogger(__name__)

__all__ = ["IDLE_CHECK_EVERY", "Consumer", "ConsumerStats", "PeerLoop"]


class Consumer:
    """Consume ``{env}.data.sync.{peer}.{app}`` for each peer, with a durable per peer.

    ``peers`` restricts the peers (default: every ``DESTINATION_APP``; an unknown one raises
    ``UnknownPeer``). ``handler`` (sync or ``async def``, called as
    ``handler(event, subject, deliveries)``) handles every event; without it the registry
    decides per producer and resource/event type. ``max_messages`` counts every peer's.
    ``middleware`` wraps every handler call, inside the ``MIDDLEWARE`` setting's and
    ``jetstream_bridge.use()``'s (``jetstream_bridge.middleware``).
    """

    def __init__(  # noqa: PLR0913 (public keyword-only constructor)
        self,
        *,
        durable_name: str,
        batch_size: int = 25,
        handler: Handler | Registration | None = None,
        registry: HandlerRegistry = registry,
        using: str | None = None,
        idle_timeout: float = 1.0,
        max_messages: int | None = None,
        stop_when_idle: bool = False,
        config: BridgeConfig | None = None,
        peers: Sequence[str] | None = None,
        middleware: Iterable[Middleware] = (),
    ) -> None:
        self.config = config or get_config()
        self.durables = peer_durables(self.config, durable_name, peers)  # peer -> durable
        self.peers = tuple(self.durables)
        # The durable consumed: the name given, or the one peer's when only one is consumed.
        self.durable = self.durables[self.peers[0]] if len(self.peers) == 1 else durable_name
        self.handler = handler
        self.registry = registry
        self.stop = threading.Event()
        self.stats = ConsumerStats()
        options = LoopOptions(
            base_durable=durable_name,
            batch_size=batch_size,
            idle_timeout=idle_timeout,
            max_messages=max_messages,
            stop_when_idle=stop_when_idle,
            stop=self.stop,
        )
        own = tuple(middleware)
        processors = {
            peer: BatchProcessor(
                durable=durable,
                handler=handler,
                registry=registry,
                using=using,
                config=self.config,
                middleware=own,
            )
            for peer, durable in self.durables.items()
        }
        self.using = next(iter(processors.values())).using
        # Each loop's batch transactions in a thread of its own, so one peer's slow handler
        # holds up no other peer. Not on SQLite: it has one writer per database, and two open
        # transactions upgrading to write fail at once ("database is locked"), costing their
        # messages a delivery; its loops take turns in Django's sync thread instead.
        threads = len(self.peers) > 1 and connections[self.using].vendor != "sqlite"
        self.loops = [
            PeerLoop(
                peer,
                durable,
                processors[peer],
                options,
                self.stats,
                ThreadPoolExecutor(1, f"jsb-{durable}") if threads else None,
            )
            for peer, durable in self.durables.items()
        ]
        self.processor = self.loops[0].processor

    @property
    def stream(self) -> str:
        """The stream of the first peer's durable (known once running)."""
        return self.loops[0].stream

    def run(self) -> ConsumerStats:
        """Run until SIGTERM/SIGINT (or the configured limits); return the counts."""
        if threading.current_thread() is threading.main_thread():

            def stop(signum: int, frame: FrameType | None) -> None:
                logger.info("stopping after the batches in hand", extra={"signal": signum})
                self.stop.set()

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        return asyncio.run(self.run_async())

    async def run_async(self) -> ConsumerStats:
        """Async twin of ``run`` (signals are the caller's business; set ``stop`` to end).

        Every peer's loop finishes and settles its batch in hand before this returns; when one
        loop fails, the others are stopped the same way and its error is raised.
        """
        self._discover_handlers()
        tasks = [asyncio.ensure_future(loop.run_async()) for loop in self.loops]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            self.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self.stats.redone = sum(loop.processor.redone for loop in self.loops)
        logger.info(
            "consumer stopped",
            extra={
                "durables": list(self.durables.values()),
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
