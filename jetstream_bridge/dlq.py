"""Dead-letter triage: list, show, replay and purge the messages on the DLQ subject.

Dead letters are messages on ``DLQ_SUBJECT`` in whichever stream stores that subject (normally
the bridge's own), so each is addressed by its stream sequence. The header names live in
``jetstream_bridge.core.dead_letter``; this module reads and acts on them.

Replay republishes the stored body to the subject it failed on, under a new ``Nats-Msg-Id``
(``replay:<dlq-seq>:<run>``): the original id may still sit in the stream's dedupe window and
would make the server drop the copy. Exactly-once handling does not depend on that id: the
consumer's inbox recognises the event id, so an event that was processed meanwhile is acked as
a duplicate instead of being handled twice.

Every ``*_async`` function takes a connection and a config; the sync twins run them on the
shared connection with the current settings.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from .broker import Connection, StoredMessage
from .conf import get_config
from .core import dead_letter as core_dlq
from .core.envelope import MSG_ID_HEADER
from .core.errors import JetStreamApiError, PublishFailed
from .core.settings import BridgeConfig
from .core.subjects import is_reserved, subject_problem
from .runtime import get_runtime

logger = logging.getLogger(__name__)

T = TypeVar("T")

_RFC3339_FRACTION = re.compile(r"\.(\d+)")


def _parse_time(value: str) -> datetime | None:
    """Parse the server's RFC 3339 timestamp (nanoseconds, ``Z``) into an aware datetime."""
    if not value:
        return None
    text = value.replace("Z", "+00:00")
    # Python 3.10's fromisoformat accepts only 3 or 6 fraction digits; the server sends 9.
    text = _RFC3339_FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class DeadLetterMessage:
    """One message on the DLQ subject, as stored."""

    stream: str
    seq: int
    subject: str
    stored_at: datetime | None
    headers: dict[str, str]
    data: bytes = field(repr=False)

    @classmethod
    def from_stored(cls, stream: str, message: StoredMessage) -> DeadLetterMessage:
        return cls(
            stream=stream,
            seq=message.seq,
            subject=message.subject,
            stored_at=_parse_time(message.time),
            headers=dict(message.headers),
            data=message.data,
        )

    @property
    def letter(self) -> core_dlq.DeadLetter:
        return core_dlq.DeadLetter.from_headers(self.headers)

    @property
    def reason(self) -> str:
        return self.headers.get(core_dlq.REASON, "")

    @property
    def original_subject(self) -> str:
        return self.headers.get(core_dlq.ORIGINAL_SUBJECT, "")

    @property
    def consumer(self) -> str:
        return self.headers.get(core_dlq.CONSUMER, "")

    def age(self, now: datetime | None = None) -> float | None:
        """Return the seconds since the message was dead-lettered, if the server said when."""
        if self.stored_at is None:
            return None
        return max(0.0, ((now or datetime.now(timezone.utc)) - self.stored_at).total_seconds())

    def body(self) -> Any:
        """Return the body decoded as JSON, or ``None`` when it is not JSON."""
        try:
            return json.loads(self.data)
        except ValueError:
            return None

    def body_text(self) -> str:
        """Return the body for humans: indented JSON, else text, else escaped bytes."""
        decoded = self.body()
        if decoded is not None:
            return json.dumps(decoded, indent=2, sort_keys=True, ensure_ascii=False)
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            return repr(self.data)

    def to_dict(self, *, body: bool = False, now: datetime | None = None) -> dict[str, Any]:
        letter = self.letter
        result: dict[str, Any] = {
            "stream": self.stream,
            "seq": self.seq,
            "subject": self.subject,
            "stored_at": self.stored_at.isoformat() if self.stored_at else None,
            "age_seconds": self.age(now),
            "reason": letter.reason,
            "error_class": letter.error_class,
            "error_message": letter.error_message,
            "original_subject": letter.original_subject,
            "original_stream": letter.stream,
            "original_seq": letter.stream_seq,
            "deliveries": letter.deliveries,
            "consumer": letter.consumer,
            "event_id": letter.event_id,
        }
        if body:
            result["headers"] = dict(self.headers)
            decoded = self.body()
            result["body"] = decoded if decoded is not None else self.body_text()
        return result


@dataclass(frozen=True)
class Selection:
    """Which dead letters an operation applies to; every criterion given must match.

    ``since`` keeps messages dead-lettered within that many seconds, ``older_than`` those
    dead-lettered longer ago. An empty selection selects every dead letter.
    """

    reason: str | None = None
    consumer: str | None = None
    seqs: frozenset[int] = frozenset()
    since: float | None = None
    older_than: float | None = None

    @property
    def everything(self) -> bool:
        return (
            not self.reason
            and not self.consumer
            and not self.seqs
            and self.since is None
            and self.older_than is None
        )

    def matches(self, message: DeadLetterMessage, now: datetime) -> bool:
        if self.reason and message.reason != self.reason:
            return False
        if self.consumer and message.consumer != self.consumer:
            return False
        if self.seqs and message.seq not in self.seqs:
            return False
        if self.since is not None or self.older_than is not None:
            age = message.age(now)
            if age is None:
                return False
            if self.since is not None and age > self.since:
                return False
            if self.older_than is not None and age < self.older_than:
                return False
        return True


@dataclass(frozen=True)
class Depth:
    """How many messages the DLQ subject holds, and where."""

    subject: str
    stream: str | None
    messages: int
    last_seq: int = 0


@dataclass
class ReplayResult:
    """What a replay did: ``(dlq_seq, new_stream_seq)`` per success, ``(dlq_seq, why)`` else."""

    replayed: list[tuple[int, int]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    deleted: int = 0


async def find_stream(conn: Connection, config: BridgeConfig) -> str | None:
    """Return the stream that stores the DLQ subject (the bridge's own preferred)."""
    names = await conn.jsm.stream_names(subject=config.subjects.dlq)
    if config.stream_name in names:
        return config.stream_name
    return names[0] if names else None


async def depth_async(conn: Connection, config: BridgeConfig) -> Depth:
    """Count the messages on the DLQ subject without reading them."""
    subject = config.subjects.dlq
    stream = await find_stream(conn, config)
    info = await conn.jsm.stream_info(stream, subjects_filter=subject) if stream else None
    if info is None:
        return Depth(subject=subject, stream=None, messages=0)
    count = info.state.subjects.get(subject, 0)
    return Depth(subject=subject, stream=stream, messages=count, last_seq=info.state.last_seq)


async def _scan(
    conn: Connection,
    config: BridgeConfig,
    selection: Selection | None,
    *,
    limit: int | None = None,
    upto_seq: int | None = None,
) -> tuple[Depth, list[DeadLetterMessage]]:
    selection = selection or Selection()
    depth = await depth_async(conn, config)
    if depth.stream is None or depth.messages == 0:
        return depth, []
    stream, subject = depth.stream, depth.subject
    # Stop at the last sequence seen now: a replayed message that fails again comes back to
    # the DLQ with a higher sequence and must not be picked up by the same run.
    last = min(depth.last_seq, upto_seq) if upto_seq is not None else depth.last_seq
    now = datetime.now(timezone.utc)
    found: list[DeadLetterMessage] = []
    if selection.seqs:
        for seq in sorted(selection.seqs):
            stored = await conn.jsm.get_message(stream, seq) if seq <= last else None
            if stored is not None and stored.subject == subject:
                message = DeadLetterMessage.from_stored(stream, stored)
                if selection.matches(message, now):
                    found.append(message)
        return depth, found[:limit] if limit is not None else found
    seq = 1
    while limit is None or len(found) < limit:
        stored = await conn.jsm.next_message(stream, seq, subject)
        if stored is None or stored.seq > last:
            break
        message = DeadLetterMessage.from_stored(stream, stored)
        if selection.matches(message, now):
            found.append(message)
        seq = stored.seq + 1
    return depth, found


async def list_async(
    conn: Connection,
    config: BridgeConfig,
    selection: Selection | None = None,
    *,
    limit: int | None = None,
) -> tuple[Depth, list[DeadLetterMessage]]:
    """Return the DLQ depth and the selected dead letters, oldest first (at most ``limit``)."""
    return await _scan(conn, config, selection, limit=limit)


async def get_async(conn: Connection, config: BridgeConfig, seq: int) -> DeadLetterMessage | None:
    """Return the dead letter at stream sequence ``seq``, or ``None`` when there is none."""
    stream = await find_stream(conn, config)
    if stream is None:
        return None
    stored = await conn.jsm.get_message(stream, seq)
    if stored is None or stored.subject != config.subjects.dlq:
        return None
    return DeadLetterMessage.from_stored(stream, stored)


def replay_problem(config: BridgeConfig, subject: str) -> str | None:
    """Return why a dead letter must not be republished to ``subject``, or ``None``.

    Headers are data anyone with publish rights on the DLQ subject could have written, so the
    target is confined to the bridge's own ``{env}.data.sync.`` subjects: never ``$JS.API``,
    never the DLQ itself, never a wildcard.
    """
    if not subject:
        return f"no {core_dlq.ORIGINAL_SUBJECT} header"
    problem = subject_problem(subject, allow_wildcards=False)
    if problem:
        return f"original subject {subject!r} {problem}"
    if is_reserved(subject) or subject.startswith("$"):
        return f"refusing to publish to system subject {subject!r}"
    if subject == config.subjects.dlq:
        return "the original subject is the DLQ itself"
    prefix = f"{config.env}.data.sync."
    if not subject.startswith(prefix):
        return f"refusing to publish to {subject!r}: outside this bridge's {prefix}* subjects"
    return None


async def replay_async(
    conn: Connection,
    config: BridgeConfig,
    selection: Selection | None = None,
    *,
    keep: bool = False,
) -> ReplayResult:
    """Republish the selected dead letters to their original subjects, oldest first.

    Each successfully republished message is deleted from the DLQ unless ``keep``; one that
    cannot be republished stays there and is listed in ``failed``. A lost connection aborts
    the run (what was replayed so far stays replayed).
    """
    _, messages = await _scan(conn, config, selection)
    run = time.time_ns() // 1_000_000
    result = ReplayResult()
    for message in messages:
        target = message.original_subject
        problem = replay_problem(config, target)
        if problem:
            result.failed.append((message.seq, problem))
            continue
        replay_headers = {
            MSG_ID_HEADER: f"replay:{message.seq}:{run}",
            core_dlq.REPLAY_OF: str(message.seq),
        }
        try:
            ack = await conn.publish(target, message.data, replay_headers)
        except (PublishFailed, JetStreamApiError) as exc:
            result.failed.append((message.seq, str(exc)))
            logger.warning(
                "replay of dead letter %d failed: %s",
                message.seq,
                exc,
                extra={"dlq_seq": message.seq, "subject": target},
            )
            continue
        result.replayed.append((message.seq, ack.seq))
        logger.info(
            "replayed dead letter %d to %s",
            message.seq,
            target,
            extra={
                "dlq_seq": message.seq,
                "subject": target,
                "stream_seq": ack.seq,
                "event_id": message.letter.event_id,
            },
        )
        if not keep:
            try:
                await conn.jsm.delete_message(message.stream, message.seq)
                result.deleted += 1
            except JetStreamApiError as exc:  # deleted meanwhile by someone else
                logger.info("dead letter %d already gone: %s", message.seq, exc)
    return result


async def count_async(
    conn: Connection, config: BridgeConfig, selection: Selection | None = None
) -> tuple[int, int]:
    """Return how many dead letters the selection matches and the DLQ's last sequence."""
    selection = selection or Selection()
    if selection.everything:
        depth = await depth_async(conn, config)
        return depth.messages, depth.last_seq
    depth, messages = await _scan(conn, config, selection)
    return len(messages), depth.last_seq


async def purge_async(
    conn: Connection,
    config: BridgeConfig,
    selection: Selection | None = None,
    *,
    upto_seq: int | None = None,
) -> int:
    """Delete the selected dead letters (only up to ``upto_seq``); return how many went.

    Pass the ``last_seq`` that ``count_async`` returned so that what is deleted is what the
    operator confirmed, not what arrived since.
    """
    selection = selection or Selection()
    if selection.everything:
        depth = await depth_async(conn, config)
        if depth.stream is None or depth.messages == 0:
            return 0
        last = depth.last_seq if upto_seq is None else min(upto_seq, depth.last_seq)
        purged = await conn.jsm.purge_stream(depth.stream, depth.subject, before_seq=last + 1)
    else:
        _, messages = await _scan(conn, config, selection, upto_seq=upto_seq)
        purged = 0
        for message in messages:
            try:
                await conn.jsm.delete_message(message.stream, message.seq)
                purged += 1
            except JetStreamApiError as exc:
                logger.info("dead letter %d already gone: %s", message.seq, exc)
    logger.warning("purged %d dead letter(s)", purged, extra={"purged": purged})
    return purged


# -- sync twins on the shared connection -------------------------------------------------------


def _call(job: Callable[[Connection], Awaitable[T]]) -> T:
    return get_runtime().call(job)


def depth() -> Depth:
    config = get_config()
    return _call(lambda conn: depth_async(conn, config))


def list_dead_letters(
    selection: Selection | None = None, *, limit: int | None = None
) -> tuple[Depth, list[DeadLetterMessage]]:
    config = get_config()
    return _call(lambda conn: list_async(conn, config, selection, limit=limit))


def get_dead_letter(seq: int) -> DeadLetterMessage | None:
    config = get_config()
    return _call(lambda conn: get_async(conn, config, seq))


def replay(selection: Selection | None = None, *, keep: bool = False) -> ReplayResult:
    config = get_config()
    return _call(lambda conn: replay_async(conn, config, selection, keep=keep))


def count(selection: Selection | None = None) -> tuple[int, int]:
    config = get_config()
    return _call(lambda conn: count_async(conn, config, selection))


def purge(selection: Selection | None = None, *, upto_seq: int | None = None) -> int:
    config = get_config()
    return _call(lambda conn: purge_async(conn, config, selection, upto_seq=upto_seq))
