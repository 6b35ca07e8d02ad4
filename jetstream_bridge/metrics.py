"""Prometheus metrics, when ``prometheus_client`` is installed (the ``metrics`` extra).

Counters and the handler histogram are updated where the work happens; the outbox backlog and
consumer lag are read when Prometheus scrapes, by a collector registered on the default
registry. Anything that serves that registry exposes them: ``django-prometheus``'s ``/metrics``,
``prometheus_client.make_wsgi_app()`` or ``start_http_server()``, or ``metrics_view`` below.
Without ``prometheus_client`` every function here is a cheap no-op.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse
    from prometheus_client.metrics_core import Metric

    from .core.settings import BridgeConfig
    from .readers import Reader

try:
    from prometheus_client import REGISTRY, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # the extra is not installed
    ENABLED = False
else:
    ENABLED = True

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

NAMESPACE = "jetstream_bridge"
SCRAPE_TIMEOUT = 2.0  # seconds the NATS part of a scrape may take
OUTBOX_STATUSES = ("pending", "publishing", "sent", "failed")

if ENABLED:
    PUBLISHED = Counter(
        "published",
        "Publish calls, by result: sent, duplicate, queued (outbox) or deferred (until commit).",
        ["status"],
        namespace=NAMESPACE,
    )
    RELAYED = Counter(
        "relayed", "Outbox rows the relay published and recorded as sent.", namespace=NAMESPACE
    )
    RELAY_FAILURES = Counter(
        "relay_failures",
        "Outbox rows whose publish by the relay failed (retried after backoff).",
        namespace=NAMESPACE,
    )
    CONSUMED = Counter(
        "consumed",
        "Messages settled by a consumer: processed, duplicate, skipped, retried or dead_lettered.",
        ["consumer", "outcome"],
        namespace=NAMESPACE,
    )
    DEAD_LETTERED = Counter(
        "dead_lettered",
        "Messages sent to the dead-letter subject, by reason.",
        ["consumer", "reason"],
        namespace=NAMESPACE,
    )
    HANDLER_DURATION = Histogram(
        "handler_duration_seconds",
        "Time spent in event handlers, failures included.",
        ["consumer"],
        namespace=NAMESPACE,
    )


def published(status: str) -> None:
    """Count one ``publish`` call by its result status."""
    if ENABLED:
        PUBLISHED.labels(status).inc()


def relayed(sent: int, failed: int) -> None:
    """Count the rows one relay batch sent and the rows it failed to send."""
    if ENABLED:
        RELAYED.inc(sent)
        RELAY_FAILURES.inc(failed)


def consumed(consumer: str, outcome: str) -> None:
    """Count one settled message: ``processed``, ``duplicate``, ``skipped`` or ``retried``."""
    if ENABLED:
        CONSUMED.labels(consumer, outcome).inc()


def dead_lettered(consumer: str, reason: str) -> None:
    """Count one message dead-lettered for ``reason``."""
    if ENABLED:
        CONSUMED.labels(consumer, "dead_lettered").inc()
        DEAD_LETTERED.labels(consumer, reason).inc()


def timed(handler: F, consumer: str) -> F:
    """Return ``handler`` wrapped to observe its duration (itself when metrics are off)."""
    if not ENABLED:
        return handler
    histogram = HANDLER_DURATION.labels(consumer)
    if iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await handler(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - started)

        return cast(F, timed_async)

    @functools.wraps(handler)
    def timed_sync(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return handler(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - started)

    return cast(F, timed_sync)


@dataclass(frozen=True)
class _Gauges:
    """The gauge families of one scrape."""

    scrape_success: GaugeMetricFamily
    outbox_rows: GaugeMetricFamily
    outbox_oldest: GaugeMetricFamily
    outbox_destination: GaugeMetricFamily
    consumer_pending: GaugeMetricFamily
    consumer_ack_pending: GaugeMetricFamily

    @classmethod
    def empty(cls) -> _Gauges:
        return cls(
            GaugeMetricFamily(
                f"{NAMESPACE}_scrape_success",
                "1 if the source (outbox, nats) was read for this scrape, else 0.",
                labels=["source"],
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_outbox_rows", "Outbox rows by status.", labels=["status"]
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_outbox_oldest_unsent_age_seconds",
                "Age of the oldest outbox row not yet sent (0 when none).",
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_outbox_unsent_rows_by_destination",
                "Outbox rows not yet sent, per destination peer and its subject.",
                labels=["destination", "subject"],
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_consumer_pending_messages",
                "Messages on the stream not yet delivered to the durable consumer (its lag).",
                labels=["stream", "consumer"],
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_consumer_ack_pending_messages",
                "Messages delivered to the durable consumer and not yet acknowledged.",
                labels=["stream", "consumer"],
            ),
        )

    def families(self) -> list[Metric]:
        return [
            self.scrape_success,
            self.outbox_rows,
            self.outbox_oldest,
            self.outbox_destination,
            self.consumer_pending,
            self.consumer_ack_pending,
        ]


class BridgeCollector:
    """Report the outbox backlog and consumer lag at scrape time; never raise into a scrape.

    Consumers are found on the server (``readers.find_readers``: every durable reading what any
    peer sends us), so a web process reports the lag of worker processes too; the outbox backlog
    is also given per destination peer. ``jetstream_bridge_scrape_success{source}`` is 0
    when a source could not be read (its gauges are then absent rather than wrong).
    """

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() at registration: at import.
        return _Gauges.empty().families()

    def collect(self) -> Iterable[Metric]:
        if not ENABLED:
            return []
        gauges = _Gauges.empty()
        try:
            from .conf import get_config

            config = get_config()
        except Exception:
            logger.debug("metrics: no valid JETSTREAM_BRIDGE settings", exc_info=True)
            return [gauges.scrape_success]
        for source, read in (("outbox", self._outbox), ("nats", self._consumers)):
            try:
                read(config, gauges)
            except Exception:
                logger.debug("metrics: could not read %s", source, exc_info=True)
                gauges.scrape_success.add_metric([source], 0)
            else:
                gauges.scrape_success.add_metric([source], 1)
        return gauges.families()

    @staticmethod
    def _outbox(config: BridgeConfig, gauges: _Gauges) -> None:
        if not config.use_outbox:
            return
        from django.db import connections

        from .outbox import OutboxStore

        store = OutboxStore(config)
        alias = store.read_alias
        opened_here = connections[alias].connection is None
        try:
            several = len(config.destinations) > 1
            backlog = store.backlog(by_subject=several)
            by_subject = backlog["unsent_by_subject"]
        finally:
            if opened_here and not connections[alias].in_atomic_block:
                # A scrape thread of its own must not keep a database connection open.
                connections[alias].close()
        counts = backlog["counts"]
        for status in sorted({*OUTBOX_STATUSES, *counts}):
            gauges.outbox_rows.add_metric([status], counts.get(status, 0))
        gauges.outbox_oldest.add_metric([], backlog["oldest_unsent_age"] or 0.0)
        if not several:  # one peer: every unsent row is for it
            unsent = sum(n for status, n in counts.items() if status != "sent")
            by_subject = {config.subjects.publish: unsent}
        for peer in config.destinations:
            subject = config.subjects_for(peer).publish
            gauges.outbox_destination.add_metric([peer, subject], by_subject.get(subject, 0))

    @staticmethod
    def _consumers(config: BridgeConfig, gauges: _Gauges) -> None:
        from .broker import Connection
        from .readers import find_readers
        from .runtime import get_runtime

        async def read(conn: Connection) -> list[Reader]:
            return await find_readers(conn, config)

        # On timeout the job is left to finish by itself: the connection bounds it with
        # CONNECT_TIMEOUT/REQUEST_TIMEOUT, and cancelling a connect midway would leak its socket.
        for reader in get_runtime().submit(read).result(SCRAPE_TIMEOUT):
            labels = [reader.stream, reader.durable]
            gauges.consumer_pending.add_metric(labels, reader.info.num_pending)
            gauges.consumer_ack_pending.add_metric(labels, reader.info.num_ack_pending)


COLLECTOR = BridgeCollector()
if ENABLED:
    REGISTRY.register(COLLECTOR)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve the default registry in the Prometheus text format.

    Only to staff users and to scrapers sending ``Authorization: Bearer <METRICS_TOKEN>``;
    anyone else gets 403 (the gauges name streams, consumers and backlog sizes).
    """
    from django.http import HttpResponse

    from .access import configured_token, may_see

    if not may_see(request, configured_token("metrics_token")):
        return HttpResponse(
            "Forbidden: log in as a staff user or send Authorization: Bearer <METRICS_TOKEN> "
            "(JETSTREAM_BRIDGE['METRICS_TOKEN']).",
            status=403,
            content_type="text/plain",
        )
    if not ENABLED:
        return HttpResponse(
            "prometheus_client is not installed: pip install 'django-jetstream-bridge[metrics]'",
            status=501,
            content_type="text/plain",
        )
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
