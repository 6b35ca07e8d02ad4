"""The DLQ's own stream: create it, keep its limits, and move dead letters into it.

With ``DLQ_STREAM_NAME`` different from ``STREAM_NAME`` (the default), dead letters live in a
stream of their own that captures only ``DLQ_SUBJECT``, limited by ``DLQ_MAX_AGE`` and
``DLQ_MAX_BYTES``: a flood of dead letters fills that stream, never the events' one.

``ensure_dlq_stream_async`` is overlap-safe like the events' stream: whatever stream already
captures the DLQ subject keeps it (an existing environment whose events' stream holds it is
reported, not changed), and concurrent ensures converge on one DLQ stream.

``move_dlq_async`` moves an existing environment's dead letters out of the events' stream:

1. take ``DLQ_SUBJECT`` off the events' stream (the server's full config, one subject less);
2. create the DLQ stream, which captures it from then on;
3. copy the letters still in the events' stream into it (same headers, same ``Nats-Msg-Id``,
   so a copy the server has already seen within its duplicate window is not stored twice);
4. purge the copied letters from the events' stream, a chunk at a time.

Between steps 1 and 2 (one round trip) no stream captures the DLQ subject: a consumer that
dead-letters then gets no stream ack, NAKs the message and dead-letters it on a later
delivery. A re-run after a crash picks up where the move stopped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .broker import Connection
from .core.dead_letter import nonce
from .core.durations import to_nanos
from .core.envelope import MSG_ID_HEADER
from .core.errors import JetStreamApiError, TopologyError
from .core.settings import BridgeConfig
from .core.subjects import covers
from .core.topology_plan import (
    RETRYABLE_STREAM_ERRORS,
    dlq_limit_differences,
    dlq_stream_config,
)

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
COPY_CHUNK = 100  # letters copied before the events' stream is purged of them


class Report(Protocol):
    def add(self, kind: str, target: str, detail: str, *, change: bool) -> None: ...


@dataclass
class MoveResult:
    """What ``move_dlq_async`` did (or, in a dry run, would do)."""

    source: str
    target: str
    subject_removed: bool = False
    copied: int = 0
    purged: int = 0
    steps: tuple[str, ...] = ()


async def dlq_holders(conn: Connection, config: BridgeConfig) -> list[str]:
    """Return the streams capturing the DLQ subject: the DLQ's own first, then the events'."""
    names = await conn.jsm.stream_names(subject=config.subjects.dlq)
    rank = {config.dlq_stream_name: 0, config.stream_name: 1}
    return sorted(names, key=lambda name: rank.get(name, 2))


async def durable_reads(conn: Connection, subject: str, durable: str) -> bool:
    """Tell whether ``durable`` reads ``subject``: it exists on a stream capturing it and its
    filter (none reads everything) covers it. A replay for it alone must reach it."""
    for stream in await conn.jsm.stream_names(subject=subject):
        info = await conn.jsm.consumer_info(stream, durable)
        if info is None:
            continue
        filters = info.config.filters
        if not filters or any(covers(own, subject) for own in filters):
            return True
    return False


async def ensure_dlq_stream_async(
    conn: Connection,
    config: BridgeConfig,
    report: Report,
    *,
    dry_run: bool = False,
    limits: bool = True,
) -> str | None:
    """Make sure a stream captures the DLQ subject; return it (``None``: none would).

    Only with a DLQ stream of its own: a shared DLQ subject is the events' stream's business.
    ``limits=False`` (a consumer's own ensure) creates a missing DLQ stream but leaves an
    existing one's limits alone.
    """
    if not config.separate_dlq_stream:
        return None
    name = config.dlq_stream_name
    for attempt in range(1, MAX_ATTEMPTS + 1):
        holders = await dlq_holders(conn, config)
        if name in holders:
            if limits:
                await _keep_limits(conn, config, report, dry_run=dry_run)
            return name
        if holders:
            _report_elsewhere(config, report, holders)
            return holders[0]
        try:
            await _create(conn, config, report, dry_run=dry_run)
            return name
        except JetStreamApiError as exc:
            if exc.err_code not in RETRYABLE_STREAM_ERRORS:
                raise
            logger.info("DLQ stream %s changed under us (%s); re-reading", name, exc.err_code)
        await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
    logger.error("DLQ stream %s did not converge after %d attempts", name, MAX_ATTEMPTS)
    report.add("skip", name, "did not converge; run jetstream_ensure_topology again", change=True)
    return None


async def _create(conn: Connection, config: BridgeConfig, report: Report, *, dry_run: bool) -> None:
    name, subject = config.dlq_stream_name, config.subjects.dlq
    info = await conn.jsm.stream_info(name)
    if info is not None:
        # It exists without the subject (a move interrupted after step 1, a hand edit).
        report.add("add-subjects", name, subject, change=True)
        if not dry_run:
            await conn.jsm.update_stream(
                info.config.with_subjects([*info.config.subjects, subject])
            )
            logger.info("added %s to DLQ stream %s", subject, name)
        return
    report.add("create-dlq-stream", name, f"{subject} ({_limits(config)})", change=True)
    if not dry_run:
        await conn.jsm.create_stream(dlq_stream_config(config))
        logger.info("created DLQ stream %s", name, extra={"stream": name, "subject": subject})


def _limits(config: BridgeConfig) -> str:
    age = f"{config.dlq_max_age:g}s" if config.dlq_max_age else "unlimited"
    size = f"{config.dlq_max_bytes} bytes" if config.dlq_max_bytes else "unlimited"
    return f"max_age {age}, max_bytes {size}"


async def _keep_limits(
    conn: Connection, config: BridgeConfig, report: Report, *, dry_run: bool
) -> None:
    """Apply ``DLQ_MAX_AGE`` (and ``DLQ_MAX_BYTES`` when set) to the existing DLQ stream."""
    name = config.dlq_stream_name
    info = await conn.jsm.stream_info(name)
    if info is None:  # deleted since we listed it; the next ensure creates it
        return
    differences = dlq_limit_differences(config, info.config.max_age, info.config.max_bytes)
    if not differences:
        report.add("skip", name, "DLQ stream matches the settings", change=False)
        return
    report.add("update-dlq-stream", name, "; ".join(differences), change=True)
    if dry_run:
        return
    wanted = {**info.config.raw, "max_age": to_nanos(config.dlq_max_age or 0.0)}
    if config.dlq_max_bytes:  # unset: a limit set on the server by hand stays
        wanted["max_bytes"] = config.dlq_max_bytes
    await conn.jsm.update_stream(wanted)
    logger.info("updated DLQ stream %s limits", name, extra={"changes": differences})


def _report_elsewhere(config: BridgeConfig, report: Report, holders: Sequence[str]) -> None:
    subject = config.subjects.dlq
    if holders[0] == config.stream_name:
        detail = (
            f"kept in the events' stream {config.stream_name} (an existing environment); "
            f"`jetstream_ensure_topology --move-dlq` moves it to {config.dlq_stream_name}"
        )
    else:
        detail = f"captured by other stream(s) {', '.join(holders)}; left to them"
    report.add("skip", subject, detail, change=False)
    logger.warning(
        "dead letters on %s stay in stream %s, not %s",
        subject,
        holders[0],
        config.dlq_stream_name,
        extra={"subject": subject, "owners": list(holders), "stream": config.dlq_stream_name},
    )


class _Steps:
    """Collects the move's steps as ``Report`` actions."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, kind: str, target: str, detail: str, *, change: bool) -> None:
        if change:
            self.lines.append(f"{kind.replace('-', ' ')} {target}: {detail}")


async def move_dlq_async(
    conn: Connection, config: BridgeConfig, *, dry_run: bool = False
) -> MoveResult:
    """Move the dead letters from the events' stream to the DLQ's own (see the module doc)."""
    if not config.separate_dlq_stream:
        raise TopologyError(
            "DLQ_STREAM_NAME is STREAM_NAME (or USE_DLQ is off): there is no DLQ stream to move "
            "the dead letters to; leave DLQ_STREAM_NAME out to use '{STREAM_NAME}-dlq'"
        )
    subject, source = config.subjects.dlq, config.stream_name
    info = await conn.jsm.stream_info(source)
    if info is None:
        raise TopologyError(f"stream {source} does not exist; nothing to move")
    broad = [own for own in info.config.subjects if own != subject and covers(own, subject)]
    if broad:
        raise TopologyError(
            f"stream {source} captures {subject} through {', '.join(broad)}; take the DLQ "
            "subject out of that wildcard by hand before moving it"
        )
    result = MoveResult(source=source, target=config.dlq_stream_name)
    steps = _Steps()
    if subject in info.config.subjects:
        steps.add("remove-subject", source, subject, change=True)
        result.subject_removed = True
        if not dry_run:
            others = [own for own in info.config.subjects if own != subject]
            await conn.jsm.update_stream(info.config.with_subjects(others))
            logger.warning("took %s off stream %s to move the DLQ", subject, source)
    if dry_run:
        if config.dlq_stream_name not in await dlq_holders(conn, config):
            await _create(conn, config, steps, dry_run=True)  # as it would be once removed
        result.steps = tuple(steps.lines)
        return result
    holder = await ensure_dlq_stream_async(conn, config, steps)
    if holder != config.dlq_stream_name:
        raise TopologyError(
            f"stream {holder or '(none)'} captured {subject} again before {result.target} could; "
            "stop the services that put it there (DLQ_STREAM_NAME = STREAM_NAME, or an older "
            "version) and run --move-dlq again"
        )
    await _copy_and_purge(conn, config, result)
    result.steps = tuple(steps.lines)
    return result


async def _copy_and_purge(conn: Connection, config: BridgeConfig, result: MoveResult) -> None:
    subject, source = config.subjects.dlq, result.source
    seq, copied_upto, pending = 1, 0, 0
    while True:
        stored = await conn.jsm.next_message(source, seq, subject)
        if stored is not None:
            headers = {
                name: value
                for name, value in stored.headers.items()
                if not name.lower().startswith("nats-") or name == MSG_ID_HEADER
            }
            # A letter without an id (not the bridge's) gets a fresh one: a predictable id
            # could be taken first, and the copy dropped as a duplicate, then purged.
            headers.setdefault(MSG_ID_HEADER, f"moved:{source}:{stored.seq}:{nonce()}")
            ack = await conn.publish(subject, stored.data, headers)
            if ack.stream != result.target:
                raise TopologyError(f"{subject} is now captured by {ack.stream}, not the DLQ")
            result.copied += 0 if ack.duplicate else 1
            copied_upto, seq, pending = stored.seq, stored.seq + 1, pending + 1
        if pending and (stored is None or pending >= COPY_CHUNK):
            result.purged += await conn.jsm.purge_stream(
                source, subject, before_seq=copied_upto + 1
            )
            pending = 0
        if stored is None:
            break
    logger.warning(
        "moved %d dead letter(s) from %s to %s",
        result.copied,
        source,
        result.target,
        extra={"copied": result.copied, "purged": result.purged},
    )


def move_dlq(*, dry_run: bool = False) -> MoveResult:
    """Sync twin of ``move_dlq_async`` on the shared connection and current settings."""
    from .conf import get_config
    from .runtime import get_runtime

    config = get_config()
    return get_runtime().call(lambda conn: move_dlq_async(conn, config, dry_run=dry_run))
