"""Ensure the stream and durable consumer exist and match the settings, safely under overlap.

``ensure_topology()`` / ``ensure_topology_async()`` are idempotent and may run from many
processes at once: they converge on one stream holding the union of every app's subjects.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .broker import Connection, ConsumerInfo, StreamInfo
from .core.errors import JetStreamApiError, TopologyError
from .core.settings import BridgeConfig
from .core.stream_plan import (
    Holding,
    SettingsPlan,
    fixed_advice,
    limits_problem,
    plan_settings,
)
from .core.subjects import covers
from .core.topology_plan import (
    ERR_CONSUMER_EXISTS,
    ERR_REPLICAS_NOT_SUPPORTED,
    RETRYABLE_STREAM_ERRORS,
    SubjectPlan,
    consumer_config,
    consumer_differences,
    desired_subjects,
    foreign_filter_problem,
    peer_durables,
    plan_subjects,
    stream_config,
)
from .dlq_stream import ensure_dlq_stream_async
from .stream_audit import audit_streams_async

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class Action:
    """One line of the plan: what was (or would be) done and why."""

    kind: str  # create-stream, add-subjects, skip, create-consumer, update-consumer, ...
    target: str
    detail: str
    change: bool

    def __str__(self) -> str:
        verb = self.kind.replace("-", " ")
        return f"{verb:<18} {self.target}: {self.detail}"


@dataclass
class TopologyReport:
    stream: str
    actions: list[Action] = field(default_factory=list)
    consumer_stream: str | None = None  # the first durable's stream
    consumer_streams: dict[str, str] = field(default_factory=dict)  # durable -> its stream
    applied: bool = False
    # What the streams holding our subjects do that the settings cannot fix (foreign
    # retention, a duplicate window too short for the relay lease); see ``stream_audit``.
    warnings: list[str] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return not self.warnings and not any(action.change for action in self.actions)

    def add(self, kind: str, target: str, detail: str, *, change: bool) -> None:
        self.actions.append(Action(kind, target, detail, change))


async def _colliding_streams(
    conn: Connection, subjects: list[str], own: str
) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for subject in subjects:
        others = [name for name in await conn.jsm.stream_names(subject=subject) if name != own]
        if others:
            result[subject] = others
    return result


@dataclass(frozen=True)
class _Plan:
    info: StreamInfo | None
    subjects: SubjectPlan
    settings: SettingsPlan

    @property
    def changes(self) -> bool:
        return bool(self.subjects.add or self.settings.writes)

    def body(self, config: BridgeConfig) -> dict[str, Any]:
        """Return the config to create the stream with, or to update it to."""
        if self.info is None:
            return stream_config(config, self.subjects.add)
        # Start from the server's own config so every field the settings do not manage (and
        # every managed one the user left unset) survives; only subjects and given limits
        # change.
        subjects = [*self.info.config.subjects, *self.subjects.add]
        return self.settings.updated(self.info.config.raw, subjects)


@dataclass(frozen=True)
class _Limits:
    """How an ensure treats the stream's limits (``core/stream_plan.py``)."""

    enforce: bool = True  # False: subjects only (a consumer's or a relay's own ensure)
    take_over: bool = False
    allow_discard: bool = False


def _holding(info: StreamInfo) -> Holding:
    first = info.state.first_time
    age = (datetime.now(timezone.utc) - first).total_seconds() if first else None
    return Holding(messages=info.state.messages, bytes=info.state.bytes, oldest_age=age)


async def _plan(conn: Connection, config: BridgeConfig, limits: _Limits) -> _Plan:
    wanted = desired_subjects(config)
    info = await conn.jsm.stream_info(config.stream_name)
    own = list(info.config.subjects) if info else []
    collisions = await _colliding_streams(conn, wanted, config.stream_name)
    settings = SettingsPlan()
    if info is not None and limits.enforce:
        settings = plan_settings(
            config,
            info.config.raw,
            take_over=limits.take_over,
            holding=_holding(info),
            allow_discard=limits.allow_discard,
        )
    return _Plan(info, plan_subjects(wanted, own, collisions), settings)


def _describe_settings(report: TopologyReport, plan: SettingsPlan) -> None:
    for difference in plan.apply:
        report.add("update-stream", report.stream, str(difference), change=True)
    for conflict in plan.conflicts:
        report.add("conflict", report.stream, str(conflict), change=True)
        logger.warning("stream %s: %s", report.stream, conflict, extra={"stream": report.stream})
    for difference in plan.fixed:
        advice = fixed_advice(report.stream, difference)
        report.add("cannot-change", report.stream, advice, change=True)
        logger.warning("stream %s: %s", report.stream, advice, extra={"stream": report.stream})
    for held in plan.held:
        report.add("held", report.stream, str(held), change=True)
        logger.warning("stream %s: %s", report.stream, held, extra={"stream": report.stream})
    for setting in plan.claimed:
        report.add(
            "record-owner",
            report.stream,
            f"{setting.field} already as {setting.key} says; recorded as enforced by this app",
            change=False,
        )


def _describe(report: TopologyReport, plan: SubjectPlan, *, stream_exists: bool) -> None:
    for subject, owner in plan.covered.items():
        detail = "already in the stream" if owner == subject else f"covered by {owner!r}"
        report.add("skip", subject, detail, change=False)
    for subject, streams in plan.elsewhere.items():
        report.add(
            "skip",
            subject,
            f"captured by other stream(s) {', '.join(streams)}; left to them",
            change=False,
        )
    if plan.add:
        kind = "add-subjects" if stream_exists else "create-stream"
        report.add(kind, report.stream, ", ".join(plan.add), change=True)


async def _ensure_stream(
    conn: Connection,
    config: BridgeConfig,
    report: TopologyReport,
    *,
    dry_run: bool,
    limits: _Limits,
) -> SubjectPlan:
    for attempt in range(1, MAX_ATTEMPTS + 1):
        whole = await _plan(conn, config, limits)
        info, plan = whole.info, whole.subjects
        if attempt == 1:
            _describe(report, plan, stream_exists=info is not None)
            _describe_settings(report, whole.settings)
            problem = limits_problem(whole.body(config)) if whole.changes else None
            if problem:
                report.add("refused", report.stream, problem, change=True)
            for subject, streams in plan.elsewhere.items():
                logger.warning(
                    "subject %s is captured by stream %s; not adding it to %s",
                    subject,
                    ", ".join(streams),
                    config.stream_name,
                    extra={
                        "subject": subject,
                        "owners": list(streams),
                        "stream": config.stream_name,
                    },
                )
        if dry_run or not whole.changes:
            return plan
        try:
            await _write_stream(conn, config, whole)
        except JetStreamApiError as exc:
            if exc.err_code == ERR_REPLICAS_NOT_SUPPORTED:
                raise TopologyError(
                    f"STREAM_REPLICAS is {config.stream_replicas} but the NATS server is not "
                    f"clustered ({exc}); set STREAM_REPLICAS to 1, or leave it unset, on a "
                    "single server"
                ) from exc
            if exc.err_code not in RETRYABLE_STREAM_ERRORS:
                raise
            logger.info(
                "stream %s changed under us (%s); re-reading",
                config.stream_name,
                exc.err_code,
                extra={"attempt": attempt},
            )
        # Updates are last-writer-wins: another process may have replaced our subject list,
        # so re-read until every subject we need is covered here or owned elsewhere.
        await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
    plan = (await _plan(conn, config, limits)).subjects
    if plan.add:
        logger.error(
            "stream %s did not converge after %d attempts; missing %s",
            config.stream_name,
            MAX_ATTEMPTS,
            ", ".join(plan.add),
            extra={"stream": config.stream_name, "missing": list(plan.add)},
        )
    return plan


async def _write_stream(conn: Connection, config: BridgeConfig, plan: _Plan) -> None:
    add, body = plan.subjects.add, plan.body(config)
    problem = limits_problem(body)
    if problem:
        raise TopologyError(f"stream {config.stream_name}: {problem}")
    if plan.info is None:
        await conn.jsm.create_stream(body)
        logger.info(
            "created stream %s",
            config.stream_name,
            extra={"stream": config.stream_name, "subjects": list(add)},
        )
        return
    await conn.jsm.update_stream(body)
    logger.info(
        "updated stream %s",
        config.stream_name,
        extra={
            "stream": config.stream_name,
            "subjects": list(add),
            "changes": [str(difference) for difference in plan.settings.apply],
        },
    )


async def _stream_capturing(conn: Connection, config: BridgeConfig, subject: str) -> str | None:
    """Return the stream whose subjects capture ``subject`` (ours preferred)."""
    names = await conn.jsm.stream_names(subject=subject)
    ordered = sorted(names, key=lambda name: name != config.stream_name)
    for name in ordered:
        info = await conn.jsm.stream_info(name)
        if info and any(covers(own, subject) for own in info.config.subjects):
            return name
    return ordered[0] if ordered else None


async def _ensure_consumer(
    conn: Connection,
    config: BridgeConfig,
    durable: str,
    report: TopologyReport,
    *,
    dry_run: bool,
    subject: str | None = None,
) -> None:
    """Create or reconcile ``durable`` filtering ``subject`` (the default peer's by default)."""
    subject = subject or config.subjects.subscribe
    stream = await _stream_capturing(conn, config, subject)
    if stream is None:
        if dry_run:
            stream = config.stream_name  # it would be created by this plan
        else:
            raise TopologyError(f"no stream captures {subject}; cannot create consumer {durable}")
    report.consumer_stream = report.consumer_stream or stream
    report.consumer_streams[durable] = stream
    desired = consumer_config(config, durable, subject)
    exists = await conn.jsm.stream_info(stream)
    info = await conn.jsm.consumer_info(stream, durable) if exists else None
    if info is None:
        await _create_consumer(conn, config, stream, desired, report, dry_run=dry_run)
    else:
        await _update_consumer(conn, stream, desired, info, report, dry_run=dry_run)


async def _refuse_reordered_peers(
    conn: Connection, config: BridgeConfig, durable: str, report: TopologyReport
) -> None:
    """Refuse before any consumer changes when ``durable`` consumes another configured peer.

    Checked for every peer set (``--from`` too): creating ``{durable}-{old default}`` would
    replay that peer's whole history, re-filtering ``durable`` would skip the new default's.
    """
    subject = config.subjects.subscribe
    stream = await _stream_capturing(conn, config, subject)
    info = await conn.jsm.consumer_info(stream, durable) if stream else None
    problem = info and foreign_filter_problem(config, durable, subject, info.config.filter_subject)
    if problem:
        report.add("refused", f"{stream}/{durable}", problem, change=True)
        raise TopologyError(problem)


async def _create_consumer(
    conn: Connection,
    config: BridgeConfig,
    stream: str,
    desired: dict[str, Any],
    report: TopologyReport,
    *,
    dry_run: bool,
) -> None:
    durable = desired["durable_name"]
    target = f"{stream}/{durable}"
    report.add("create-consumer", target, f"filter {desired['filter_subject']}", change=True)
    if dry_run:
        return
    try:
        await conn.jsm.create_consumer(stream, desired, action="create")
        logger.info("created consumer %s", target, extra={"stream": stream, "durable": durable})
    except JetStreamApiError as exc:
        if exc.err_code != ERR_CONSUMER_EXISTS:
            raise
        # Another process created it first; reconcile with what it made.
        report.actions.pop()
        subject = desired["filter_subject"]
        await _ensure_consumer(conn, config, durable, report, dry_run=dry_run, subject=subject)


async def _update_consumer(
    conn: Connection,
    stream: str,
    desired: dict[str, Any],
    info: ConsumerInfo,
    report: TopologyReport,
    *,
    dry_run: bool,
) -> None:
    durable = desired["durable_name"]
    target = f"{stream}/{durable}"
    differences = consumer_differences(desired, info.config.as_dict())
    if not differences:
        report.add("skip", target, "consumer matches the settings", change=False)
        return
    report.add("update-consumer", target, "; ".join(differences), change=True)
    if dry_run:
        return
    try:
        await conn.jsm.create_consumer(stream, desired, action="update")
        logger.info(
            "updated consumer %s",
            target,
            extra={"stream": stream, "durable": durable, "changes": differences},
        )
    except JetStreamApiError as exc:
        logger.warning(
            "server refused to update consumer %s (%s); deleting and re-creating it from its "
            "ack floor",
            target,
            exc,
            extra={"stream": stream, "durable": durable, "changes": differences},
        )
        floor = info.ack_floor.stream_seq
        recreated = dict(desired)
        if floor:
            # Resume after what was already acknowledged instead of replaying the stream.
            recreated.update(deliver_policy="by_start_sequence", opt_start_seq=floor + 1)
        await conn.jsm.delete_consumer(stream, durable)
        await conn.jsm.create_consumer(stream, recreated, action="create")
        report.add(
            "recreate-consumer", target, f"resumes at stream sequence {floor + 1}", change=True
        )


async def ensure_topology_async(  # noqa: PLR0913 - public, keyword-only
    conn: Connection,
    config: BridgeConfig,
    *,
    durable: str | None = None,
    dry_run: bool = False,
    take_over: bool = False,
    allow_discard: bool = False,
    limits: bool = True,
    peers: Sequence[str] | None = None,
) -> TopologyReport:
    """Make the stream, the DLQ's own stream (``dlq_stream``) and, with ``durable``, the
    consumers match the settings.

    ``durable`` names the consumer of the default peer; every other peer (of ``peers``, by
    default all of DESTINATION_APP) gets its own durable (``core/topology_plan.peer_durable``).

    With ``dry_run`` nothing is changed and the report says what would be. A stream limit
    another app enforces with another value is reported, not overwritten, unless
    ``take_over``; one that would delete stored messages is held back unless
    ``allow_discard`` (see ``core/stream_plan.py``). ``limits=False`` leaves the stream's
    limits alone (subjects and the consumer only): what a consumer does at start. The report's
    ``warnings`` list what the streams holding our subjects do that settings cannot fix
    (``stream_audit``).
    """
    report = TopologyReport(stream=config.stream_name, applied=not dry_run)
    policy = _Limits(enforce=limits, take_over=take_over, allow_discard=allow_discard)
    await _ensure_stream(conn, config, report, dry_run=dry_run, limits=policy)
    await ensure_dlq_stream_async(conn, config, report, dry_run=dry_run, limits=limits)
    if durable:
        await _refuse_reordered_peers(conn, config, durable, report)
        for peer, name in peer_durables(config, durable, peers).items():
            subject = config.subjects_for(peer).subscribe
            await _ensure_consumer(conn, config, name, report, dry_run=dry_run, subject=subject)
    report.warnings = [finding.message for finding in await audit_streams_async(conn, config)]
    return report


async def ensure_stream_async(conn: Connection, config: BridgeConfig) -> TopologyReport:
    """The stream side of ``ensure_topology_async``: every peer's subjects, no consumer.

    What ``AUTO_PROVISION`` runs when a publish finds no stream (``provision.py``); it raises
    ``TopologyError`` when the stream cannot capture our subjects.
    """
    report = TopologyReport(stream=config.stream_name, applied=True)
    # A publish path creates what is missing but never changes an existing stream's limits.
    plan = await _ensure_stream(conn, config, report, dry_run=False, limits=_Limits(enforce=False))
    if plan.add:
        raise TopologyError(
            f"stream {config.stream_name} did not take {', '.join(plan.add)} after "
            f"{MAX_ATTEMPTS} attempts"
        )
    return report


def ensure_topology(
    *,
    durable: str | None = None,
    dry_run: bool = False,
    take_over: bool = False,
    allow_discard: bool = False,
    peers: Sequence[str] | None = None,
) -> TopologyReport:
    """Sync twin of ``ensure_topology_async`` on the shared connection and current settings."""
    from .conf import get_config
    from .runtime import get_runtime

    config = get_config()
    return get_runtime().call(
        lambda conn: ensure_topology_async(
            conn,
            config,
            durable=durable,
            dry_run=dry_run,
            take_over=take_over,
            allow_discard=allow_discard,
            peers=peers,
        )
    )
