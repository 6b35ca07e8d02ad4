"""Dead-letter triage: list, show, replay and purge the messages on the DLQ subject.

Dead letters are messages on ``DLQ_SUBJECT`` in whichever stream stores that subject (normally
the bridge's own), so each is addressed by its stream sequence. The header names live in
``jetstream_bridge.core.dead_letter``; this module reads and acts on them.

Whoever may publish on the DLQ subject can put a forged letter there, so replay trusts no
header: it republishes only to this app's own inbound subject unless the operator names another
(``ReplayPolicy.subjects``), and with ``DLQ_SIGNING_KEY`` set it skips letters whose signature
does not verify unless told to include them. A header that does not parse is shown as written
and marked invalid; it never stops a listing or a replay.

Replay is for the durable that dead-lettered the letter (``Jsb-Replay-For``; the other
durables on the subject ack it unhandled, ``outcomes``) unless ``ReplayPolicy.broadcast``.
It republishes the stored body under a new ``Nats-Msg-Id`` (``replay:<dlq-seq>:<random>``):
the original id may still sit in the stream's dedupe window and would make the server drop the
copy, and a predictable id could be published first to the same effect, so a ``duplicate`` ack
counts as a failure and the letter stays. Exactly-once handling does not depend on that id: the
consumer's inbox recognises the event id, so an event that was processed meanwhile is acked as
a duplicate instead of being handled twice.

Every ``*_async`` function takes a connection and a config; the sync twins run them on the
shared connection with the current settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, TypeVar

from .broker import Connection, StoredMessage
from .conf import get_config
from .core import dead_letter as core_dlq
from .core.dead_letter import ReplayPolicy as ReplayPolicy  # re-exported for the commands
from .core.durations import parse_server_time
from .core.envelope import MSG_ID_HEADER
from .core.errors import JetStreamApiError, PublishFailed
from .core.settings import BridgeConfig
from .core.subjects import token_problem
from .dlq_stream import dlq_holders, durable_reads
from .runtime import get_runtime

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class DeadLetterMessage:
    """One message on the DLQ subject, as stored.

    ``verification`` says whether the bridge wrote it (``core.dead_letter.VERIFIED``), as far
    as the configured signing key can tell.
    """

    stream: str
    seq: int
    subject: str
    stored_at: datetime | None
    headers: dict[str, str]
    data: bytes = field(repr=False)
    verification: str = core_dlq.UNVERIFIABLE

    @classmethod
    def from_stored(
        cls, stream: str, message: StoredMessage, key: bytes | None = None
    ) -> DeadLetterMessage:
        headers = dict(message.headers)
        return cls(
            stream=stream,
            seq=message.seq,
            subject=message.subject,
            stored_at=parse_server_time(message.time),
            headers=headers,
            data=message.data,
            verification=core_dlq.verification(headers, message.data, key),
        )

    @cached_property
    def letter(self) -> core_dlq.ClaimedLetter:
        """What the headers claim: this bridge's ``Jsb-`` set or the Ruby gem's ``x-dlq-*``."""
        return core_dlq.ClaimedLetter.from_headers(self.headers)

    @property
    def reason(self) -> str:
        return self.letter.reason

    @property
    def original_subject(self) -> str:
        return self.letter.original_subject

    @property
    def consumer(self) -> str:
        return self.letter.consumer

    def age(self, now: datetime | None = None) -> float | None:
        """Return the seconds since the message was dead-lettered, if the server said when."""
        if self.stored_at is None:
            return None
        return max(0.0, ((now or datetime.now(timezone.utc)) - self.stored_at).total_seconds())

    @cached_property
    def _json(self) -> tuple[Any, str | None]:
        try:
            # NaN and Infinity would make `--json` output invalid, and a nesting too deep to
            # load or dump raises RecursionError: either way the body is shown as text.
            decoded = json.loads(self.data, parse_constant=_reject_constant)
            return decoded, json.dumps(decoded, indent=2, sort_keys=True, ensure_ascii=False)
        except (ValueError, RecursionError):
            return None, None

    def body(self) -> Any:
        """Return the body decoded as JSON, or ``None`` when it is not (strict) JSON."""
        return self._json[0]

    def body_text(self) -> str:
        """Return the body for humans: indented JSON, else text, else escaped bytes."""
        pretty = self._json[1]
        if pretty is not None:
            return pretty
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
            "failed_at": letter.failed_at.isoformat() if letter.failed_at else None,
            "verification": self.verification,
            "invalid_headers": dict(letter.invalid),
            "format": letter.format,
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
    """Return the stream that stores the DLQ subject: ``DLQ_STREAM_NAME``, else the events'
    stream (an environment not moved yet), else whichever captures it."""
    names = await dlq_holders(conn, config)
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
    key = core_dlq.signing_key(config.dlq_signing_key)
    found: list[DeadLetterMessage] = []
    if selection.seqs:
        for seq in sorted(selection.seqs):
            stored = await conn.jsm.get_message(stream, seq) if seq <= last else None
            if stored is not None and stored.subject == subject:
                message = DeadLetterMessage.from_stored(stream, stored, key)
                if selection.matches(message, now):
                    found.append(message)
        return depth, found[:limit] if limit is not None else found
    seq = 1
    while limit is None or len(found) < limit:
        stored = await conn.jsm.next_message(stream, seq, subject)
        if stored is None or stored.seq > last:
            break
        message = DeadLetterMessage.from_stored(stream, stored, key)
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
    return DeadLetterMessage.from_stored(
        stream, stored, core_dlq.signing_key(config.dlq_signing_key)
    )


def replay_problem(config: BridgeConfig, subject: str, allowed: Collection[str] = ()) -> str | None:
    """Return why a dead letter must not be republished to ``subject``, or ``None``.

    Allowed are this app's inbound subjects (one per peer) and the subjects in ``allowed``
    (``core.dead_letter.target_problem`` has the rules).
    """
    return core_dlq.target_problem(config.subjects, subject, {*allowed, *_inbound(config)})


def _inbound(config: BridgeConfig) -> frozenset[str]:
    """What every peer sends us: a letter from any of them may go back there."""
    return frozenset(peer.subscribe for peer in config.peer_subjects)


async def replay_async(
    conn: Connection,
    config: BridgeConfig,
    selection: Selection | None = None,
    *,
    keep: bool = False,
    policy: ReplayPolicy | None = None,
) -> ReplayResult:
    """Republish the selected dead letters to their original subjects, oldest first.

    ``policy`` allows more targets than this app's inbound subject, or unverified letters.
    Each successfully republished message is deleted from the DLQ unless ``keep``; one that
    cannot or must not be republished stays there and is listed in ``failed``. A lost
    connection aborts the run (what was replayed so far stays replayed).
    """
    policy = policy or ReplayPolicy()
    policy = replace(policy, subjects=policy.subjects | _inbound(config))
    _, messages = await _scan(conn, config, selection)
    result = ReplayResult()
    seen: dict[tuple[str, str], bool] = {}
    for message in messages:
        problem = policy.problem(config.subjects, message.original_subject, message.verification)
        if problem:
            result.failed.append((message.seq, problem))
            continue
        target = None if policy.broadcast else message.consumer.strip() or None
        why = await _target_problem(conn, message.original_subject, target, seen)
        if why:
            result.failed.append((message.seq, why))
            continue
        key = core_dlq.signing_key(config.dlq_signing_key)
        headers = core_dlq.replay_headers(message.seq, message.data, target=target, key=key)
        new_seq = await _republish(conn, message, headers, result)
        if new_seq is not None and not keep:
            try:
                await conn.jsm.delete_message(message.stream, message.seq)
                result.deleted += 1
            except JetStreamApiError as exc:  # deleted meanwhile by someone else
                logger.info("dead letter %d already gone: %s", message.seq, exc)
    return result


async def _target_problem(
    conn: Connection, subject: str, durable: str | None, seen: dict[tuple[str, str], bool]
) -> str | None:
    """Say why a replay cannot be for ``durable`` only (``None``: it can, or it is for all).

    The letter's consumer is a claim: it must name a durable reading ``subject``.
    """
    if durable is None:
        return None
    if token_problem(durable):
        return f"consumer {durable!r} is not a durable name; use --broadcast"
    if (subject, durable) not in seen:
        seen[(subject, durable)] = await durable_reads(conn, subject, durable)
    return None if seen[(subject, durable)] else f"no durable {durable!r}; use --broadcast"


async def _republish(
    conn: Connection, message: DeadLetterMessage, headers: dict[str, str], result: ReplayResult
) -> int | None:
    """Publish ``message`` to its original subject; return the new sequence, or ``None``."""
    target, replay_id = message.original_subject, headers[MSG_ID_HEADER]
    fields: dict[str, Any] = {"dlq_seq": message.seq, "subject": target}
    try:
        ack = await conn.publish(target, message.data, headers)
    except (PublishFailed, JetStreamApiError) as exc:
        result.failed.append((message.seq, str(exc)))
        logger.warning("replay of dead letter %d failed: %s", message.seq, exc, extra=fields)
        return None
    if ack.duplicate:
        why = f"the stream already held message id {replay_id!r}; kept in the DLQ, try again"
        result.failed.append((message.seq, why))
        logger.error("replay of dead letter %d dropped as a duplicate", message.seq, extra=fields)
        return None
    result.replayed.append((message.seq, ack.seq))
    logger.info(
        "replayed dead letter %d to %s",
        message.seq,
        target,
        extra={**fields, "stream_seq": ack.seq, "event_id": message.letter.event_id},
    )
    return ack.seq


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


def replay(
    selection: Selection | None = None,
    *,
    keep: bool = False,
    policy: ReplayPolicy | None = None,
) -> ReplayResult:
    config = get_config()
    return _call(lambda conn: replay_async(conn, config, selection, keep=keep, policy=policy))


def count(selection: Selection | None = None) -> tuple[int, int]:
    config = get_config()
    return _call(lambda conn: count_async(conn, config, selection))


def purge(selection: Selection | None = None, *, upto_seq: int | None = None) -> int:
    config = get_config()
    return _call(lambda conn: purge_async(conn, config, selection, upto_seq=upto_seq))
