"""Health of the bridge: NATS, JetStream, stream, consumer lag, outbox backlog and DLQ depth.

``check_async()`` and its sync twin ``check()`` never raise because the bridge is unhealthy or
NATS is down: they return a ``HealthReport`` whose ``status`` is ``healthy``, ``unhealthy`` or
``unreachable``. An unreachable server answers within ``timeout`` (by default
``CONNECT_TIMEOUT`` plus a second), never by hanging. ``to_dict()`` is safe to serve: server
URLs are redacted and error texts are scrubbed of credentials.

What makes a bridge unhealthy: JetStream unavailable, a subject the bridge uses that no stream
stores, a named durable that does not exist, an outbox table that cannot be read, and the
optional thresholds (consumer lag, age of the oldest unsent outbox row, DLQ depth). What the
streams do that settings cannot fix (interest or workqueue retention on our subjects, a
duplicate window not longer than ``RELAY_LEASE``) is listed in ``warnings`` without changing
the status: a Ruby service's stream should not fail every readiness probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from asgiref.sync import sync_to_async
from django.db import DatabaseError

from .broker import Connection, ConsumerInfo
from .conf import get_config
from .core.durations import format_age, format_duration, parse_duration
from .core.errors import AuthenticationFailed, NatsError, NatsUnavailable
from .core.redaction import scrub
from .core.settings import BridgeConfig
from .core.subjects import token_problem
from .core.topology_plan import desired_subjects
from .dlq import Depth as DlqDepth
from .dlq import depth_async as dlq_depth_async
from .models import OutboxStatus
from .readers import find_durable, find_readers, subscribe_subjects
from .runtime import get_runtime
from .stream_audit import audit_streams_async

logger = logging.getLogger(__name__)

HEALTHY, UNHEALTHY, UNREACHABLE = "healthy", "unhealthy", "unreachable"
ENSURE_HINT = "run `manage.py jetstream_ensure_topology`"

Duration = float | str


@dataclass(frozen=True)
class Thresholds:
    """Limits beyond which the bridge is unhealthy; ``None`` only reports the number.

    ``max_consumer_lag`` applies to each consumer's unacknowledged messages (pending plus
    delivered-but-unacked), ``max_outbox_age`` to the oldest unsent outbox row (seconds),
    ``max_dlq_depth`` to the messages on the DLQ subject.
    """

    max_consumer_lag: int | None = None
    max_outbox_age: float | None = None
    max_dlq_depth: int | None = None


@dataclass(frozen=True)
class StreamState:
    name: str
    exists: bool
    subjects: tuple[str, ...] = ()
    messages: int = 0
    bytes: int = 0
    consumer_count: int = 0


@dataclass(frozen=True)
class ConsumerLag:
    """A durable consumer's position: ``lag`` counts messages not yet acknowledged."""

    durable: str
    stream: str
    exists: bool
    filter_subjects: tuple[str, ...] = ()
    num_pending: int = 0
    num_ack_pending: int = 0
    num_redelivered: int = 0

    @property
    def lag(self) -> int:
        return self.num_pending + self.num_ack_pending


@dataclass(frozen=True)
class OutboxBacklog:
    counts: dict[str, int]
    unsent: int
    oldest_unsent_age: float | None
    error: str | None = None
    unsent_by_subject: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Destination:
    """A peer we publish to: its subject, the stream storing it, our unsent rows for it."""

    peer: str
    subject: str
    stream: str | None
    unsent: int | None  # None: not counted (no outbox, or it could not be read)


@dataclass(frozen=True)
class HealthReport:
    """Everything one health check found; ``error`` (never serialised) is the cause if any."""

    status: str
    problems: tuple[str, ...]
    servers: tuple[str, ...]
    connected: bool
    warnings: tuple[str, ...] = ()
    server_version: str = ""
    server_name: str = ""
    jetstream: bool = False
    round_trip_ms: float | None = None
    stream: StreamState | None = None
    subjects: dict[str, str | None] = field(default_factory=dict)
    destinations: tuple[Destination, ...] = ()
    consumers: tuple[ConsumerLag, ...] = ()
    outbox: OutboxBacklog | None = None
    dlq: DlqDepth | None = None
    thresholds: Thresholds = Thresholds()
    checked_at: str = ""
    took_ms: float = 0.0
    error: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def healthy(self) -> bool:
        return self.status == HEALTHY

    def to_dict(self) -> dict[str, Any]:
        """Return plain JSON-safe data (no exception objects, no credentials)."""
        data = asdict(replace(self, error=None))  # asdict would deep-copy the exception
        del data["error"]
        data["problems"] = list(self.problems)
        data["warnings"] = list(self.warnings)
        data["servers"] = list(self.servers)
        data["destinations"] = [asdict(d) for d in self.destinations]
        if self.stream is not None:
            data["stream"]["subjects"] = list(self.stream.subjects)
        data["consumers"] = [
            {**asdict(c), "filter_subjects": list(c.filter_subjects), "lag": c.lag}
            for c in self.consumers
        ]
        if self.dlq is not None:
            data["dlq"] = {
                "subject": self.dlq.subject,
                "stream": self.dlq.stream,
                "messages": self.dlq.messages,
            }
        return data


@dataclass
class _Facts:
    """What the NATS side of the check learnt, filled in as it goes."""

    connected: bool = False
    server_version: str = ""
    server_name: str = ""
    round_trip: float | None = None
    jetstream: bool = False
    stream: StreamState | None = None
    subjects: dict[str, str | None] = field(default_factory=dict)
    consumers: list[ConsumerLag] = field(default_factory=list)
    dlq: DlqDepth | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unreachable: BaseException | None = None
    error: BaseException | None = None


def _consumer_lag(stream: str, durable: str, info: ConsumerInfo | None) -> ConsumerLag:
    if info is None:
        return ConsumerLag(durable=durable, stream=stream, exists=False)
    return ConsumerLag(
        durable=durable,
        stream=stream,
        exists=True,
        filter_subjects=info.config.filters,
        num_pending=info.num_pending,
        num_ack_pending=info.num_ack_pending,
        num_redelivered=info.num_redelivered,
    )


async def _probe(
    conn: Connection, config: BridgeConfig, durables: Sequence[str], facts: _Facts
) -> None:
    if not conn.is_connected:
        # Requests made while the client reconnects would wait a full REQUEST_TIMEOUT each.
        raise NatsUnavailable(f"not connected to NATS at {conn.urls_for_humans} (reconnecting)")
    facts.connected = True
    server = await conn.server_info()
    facts.server_version, facts.server_name = server.version, server.server_name
    facts.round_trip = await conn.round_trip()
    try:
        await conn.jsm.account_info()
    except NatsUnavailable:
        raise
    except NatsError as exc:
        facts.problems.append(f"JetStream is not available: {exc}")
        facts.error = exc
        return
    facts.jetstream = True
    await _probe_stream(conn, config, facts)
    facts.warnings = [finding.message for finding in await audit_streams_async(conn, config)]
    subscribe = subscribe_subjects(config)
    if not any(facts.subjects.get(subject) for subject in subscribe):
        _no_consumer_stream(subscribe, durables, facts)
    elif durables:
        await _probe_durables(conn, config, durables, facts)
    else:
        # Every durable reading what any peer sends us; other apps' lag is theirs to watch.
        for reader in await find_readers(conn, config):
            facts.consumers.append(_consumer_lag(reader.stream, reader.durable, reader.info))
    if config.use_dlq:
        facts.dlq = await dlq_depth_async(conn, config)


async def _probe_stream(conn: Connection, config: BridgeConfig, facts: _Facts) -> None:
    """Read the stream and which stream stores each subject the bridge uses."""
    info = await conn.jsm.stream_info(config.stream_name)
    facts.stream = StreamState(
        name=config.stream_name,
        exists=info is not None,
        subjects=info.config.subjects if info else (),
        messages=info.state.messages if info else 0,
        bytes=info.state.bytes if info else 0,
        consumer_count=info.state.consumer_count if info else 0,
    )
    for subject in desired_subjects(config):
        names = await conn.jsm.stream_names(subject=subject)
        owner = config.stream_name if config.stream_name in names else next(iter(names), None)
        facts.subjects[subject] = owner
    missing = [subject for subject, owner in facts.subjects.items() if owner is None]
    if missing and info is None:
        facts.problems.append(f"stream {config.stream_name} does not exist; {ENSURE_HINT}")
    elif missing:
        facts.problems.append(f"no stream stores {', '.join(missing)}; {ENSURE_HINT}")


def _no_consumer_stream(subscribe: list[str], durables: Sequence[str], facts: _Facts) -> None:
    for durable in durables:
        facts.consumers.append(ConsumerLag(durable=durable, stream="", exists=False))
        facts.problems.append(
            f"consumer {durable} cannot exist: no stream stores {', '.join(subscribe)}"
        )


async def _probe_durables(
    conn: Connection, config: BridgeConfig, durables: Sequence[str], facts: _Facts
) -> None:
    """Report each named durable, on whichever stream capturing our subjects holds it."""
    for durable in durables:
        stream, info = await find_durable(conn, config, durable)
        lag = _consumer_lag(stream or "", durable, info)
        facts.consumers.append(lag)
        if not lag.exists:
            facts.problems.append(f"consumer {durable} does not exist on stream {stream}")


async def _nats_job(
    conn: Connection, config: BridgeConfig, durables: Sequence[str], facts: _Facts
) -> _Facts:
    try:
        await _probe(conn, config, durables, facts)
    except (NatsUnavailable, AuthenticationFailed):
        raise
    except NatsError as exc:
        facts.problems.append(scrub(str(exc)))
        facts.error = exc
    return facts


def _outbox_backlog(config: BridgeConfig, using: str | None) -> OutboxBacklog | None:
    if not config.use_outbox:
        return None
    from .outbox import OutboxStore

    store = OutboxStore(config, using=using)
    try:
        # One grouped count more, for the backlog per destination (several peers only).
        data = store.backlog(by_subject=len(config.destinations) > 1)
        by_subject = data["unsent_by_subject"]
    except DatabaseError as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return OutboxBacklog({}, 0, None, error=scrub(f"{type(exc).__name__}: {first_line}"))
    counts = {str(status): int(n) for status, n in data["counts"].items()}
    unsent = sum(n for status, n in counts.items() if status != OutboxStatus.SENT)
    if len(config.destinations) == 1 and unsent:
        by_subject = {config.subjects.publish: unsent}  # rows of older settings count here too
    return OutboxBacklog(counts, unsent, data["oldest_unsent_age"], unsent_by_subject=by_subject)


def _destinations(
    config: BridgeConfig, facts: _Facts, outbox: OutboxBacklog | None
) -> tuple[Destination, ...]:
    counted = outbox is not None and not outbox.error
    return tuple(
        Destination(
            peer=peer,
            subject=(subject := config.subjects_for(peer).publish),
            stream=facts.subjects.get(subject),
            unsent=outbox.unsent_by_subject.get(subject, 0) if counted and outbox else None,
        )
        for peer in config.destinations
    )


def _thresholds(
    max_consumer_lag: int | None, max_outbox_age: Duration | None, max_dlq_depth: int | None
) -> Thresholds:
    return Thresholds(
        max_consumer_lag=max_consumer_lag,
        max_outbox_age=parse_duration(max_outbox_age) if max_outbox_age is not None else None,
        max_dlq_depth=max_dlq_depth,
    )


def _invalid_durables(durables: Sequence[str]) -> list[str]:
    return [
        f"{durable!r} is not a valid durable name: {problem}"
        for durable in durables
        if (problem := token_problem(durable))
    ]


def _assess(
    config: BridgeConfig,
    facts: _Facts,
    outbox: OutboxBacklog | None,
    limits: Thresholds,
    started: float,
) -> HealthReport:
    problems = list(facts.problems)
    for consumer in facts.consumers:
        if (
            consumer.exists
            and limits.max_consumer_lag is not None
            and consumer.lag > limits.max_consumer_lag
        ):
            problems.append(
                f"consumer {consumer.durable} has {consumer.lag} unacknowledged message(s) "
                f"(limit {limits.max_consumer_lag})"
            )
    if outbox is not None:
        if outbox.error:
            problems.append(f"outbox table unreadable: {outbox.error}")
        elif (
            limits.max_outbox_age is not None
            and outbox.oldest_unsent_age is not None
            and outbox.oldest_unsent_age > limits.max_outbox_age
        ):
            problems.append(
                f"oldest unsent outbox row is {format_age(outbox.oldest_unsent_age)} old "
                f"(limit {format_duration(limits.max_outbox_age)}); is `manage.py "
                "jetstream_relay` running?"
            )
    if (
        facts.dlq is not None
        and limits.max_dlq_depth is not None
        and facts.dlq.messages > limits.max_dlq_depth
    ):
        problems.append(
            f"{facts.dlq.messages} dead letter(s) on {facts.dlq.subject} "
            f"(limit {limits.max_dlq_depth}); see `manage.py jetstream_dlq list`"
        )
    if facts.unreachable is not None:
        status = UNREACHABLE
    elif problems:
        status = UNHEALTHY
    else:
        status = HEALTHY
    report = HealthReport(
        status=status,
        problems=tuple(scrub(problem) for problem in problems),
        warnings=tuple(scrub(warning) for warning in facts.warnings),
        servers=config.redacted_urls,
        connected=facts.connected and facts.unreachable is None,
        server_version=facts.server_version,
        server_name=facts.server_name,
        jetstream=facts.jetstream,
        round_trip_ms=round(facts.round_trip * 1000, 3) if facts.round_trip is not None else None,
        stream=facts.stream,
        subjects=dict(facts.subjects),
        destinations=_destinations(config, facts, outbox),
        consumers=tuple(facts.consumers),
        outbox=outbox,
        dlq=facts.dlq,
        thresholds=limits,
        checked_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        took_ms=round((time.perf_counter() - started) * 1000, 1),
        error=facts.unreachable or facts.error,
    )
    if not report.healthy:
        logger.warning(
            "jetstream bridge is %s: %s",
            report.status,
            "; ".join(report.problems),
            extra={"status": report.status, "problems": list(report.problems)},
        )
    return report


def _unreachable(exc: BaseException, budget: float) -> _Facts:
    # Fresh facts: after a timeout the abandoned job may still be filling in the old ones.
    reason = f"NATS did not answer within {budget:g}s" if isinstance(exc, TimeoutError) else None
    return _Facts(problems=[reason or scrub(str(exc))], unreachable=exc)


def check(
    durables: Sequence[str] = (),
    *,
    max_consumer_lag: int | None = None,
    max_outbox_age: Duration | None = None,
    max_dlq_depth: int | None = None,
    timeout: float | None = None,
    using: str | None = None,
) -> HealthReport:
    """Check the bridge from sync code; see ``check_async`` for the arguments."""
    started = time.perf_counter()
    config = get_config()
    limits = _thresholds(max_consumer_lag, max_outbox_age, max_dlq_depth)
    budget = timeout if timeout is not None else config.connect_timeout + 1.0
    facts = _Facts(problems=_invalid_durables(durables))
    if not facts.problems:
        try:
            # A timeout stops waiting but never cancels the job: cancelling a connect in
            # flight would leave nats-py retrying forever in the background.
            facts = get_runtime().call(
                lambda conn: _nats_job(conn, config, durables, facts), timeout=budget
            )
        except (NatsUnavailable, AuthenticationFailed, TimeoutError) as exc:
            facts = _unreachable(exc, budget)
    return _assess(config, facts, _outbox_backlog(config, using), limits, started)


async def check_async(
    durables: Sequence[str] = (),
    *,
    max_consumer_lag: int | None = None,
    max_outbox_age: Duration | None = None,
    max_dlq_depth: int | None = None,
    timeout: float | None = None,
    using: str | None = None,
) -> HealthReport:
    """Check NATS, JetStream, the stream, consumers, outbox and DLQ; never raise for ill health.

    ``durables`` names the consumers to report (each must exist); by default every durable
    that reads this app's subscribe subject is reported. The ``max_*`` thresholds turn a
    number into a problem when exceeded (``max_outbox_age`` takes seconds or ``"10m"``).
    ``timeout`` bounds the NATS part; ``using`` is the outbox's database alias.
    """
    started = time.perf_counter()
    config = get_config()
    limits = _thresholds(max_consumer_lag, max_outbox_age, max_dlq_depth)
    budget = timeout if timeout is not None else config.connect_timeout + 1.0
    facts = _Facts(problems=_invalid_durables(durables))
    outbox = sync_to_async(_outbox_backlog, thread_sensitive=True)(config, using)
    if facts.problems:
        return _assess(config, facts, await outbox, limits, started)
    job = get_runtime().submit(lambda conn: _nats_job(conn, config, durables, facts))
    waiter = asyncio.wrap_future(job)
    backlog = await outbox
    remaining = max(0.0, budget - (time.perf_counter() - started))
    done, _ = await asyncio.wait({waiter}, timeout=remaining)
    if not done:
        # Stop waiting without cancelling (see ``check``); collect the late result quietly.
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        facts = _unreachable(TimeoutError(), budget)
    else:
        try:
            facts = waiter.result()
        except (NatsUnavailable, AuthenticationFailed) as exc:
            facts = _unreachable(exc, budget)
    return _assess(config, facts, backlog, limits, started)
