"""Auto-provisioning: a publish that finds no stream for its subject creates the subjects once.

A publish-only service never runs ``jetstream_ensure_topology``; its first publish to a subject
no stream captures is answered "no responders" (``NoStreamForSubject``). With ``AUTO_PROVISION``
on, the fast path and the relay hand that error here: the stream side of the ensure runs (the
same overlap-safe code, so concurrent processes converge on one stream), and the publish is
tried again. This costs nothing on the normal path: only a failed publish comes here.

One ensure serves every failure of a process for ``RERUN_AFTER`` seconds (a lock per
connection and settings; a batch of a thousand failed rows runs it once). With
``AUTO_PROVISION`` off, the error says who must run the ensure, with which settings.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .broker import Connection, PubAck
from .core.errors import JetStreamBridgeError, NoStreamForSubject
from .core.settings import BridgeConfig
from .core.subjects import covers
from .core.topology_plan import desired_subjects
from .topology import ensure_stream_async

logger = logging.getLogger(__name__)

T = TypeVar("T")
Item = tuple[str, bytes, Mapping[str, str] | None]

# A failure this soon after an ensure finished retries without running the ensure again.
RERUN_AFTER = 10.0


@dataclass
class _Attempt:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    finished: float | None = None
    error: NoStreamForSubject | None = None


_attempts: weakref.WeakKeyDictionary[Connection, dict[tuple[str, ...], _Attempt]]
_attempts = weakref.WeakKeyDictionary()


def ensure_hint(config: BridgeConfig, subject: str) -> str:
    """Say who must run ``jetstream_ensure_topology`` so that a stream captures ``subject``."""
    peers = [peer for peer in config.destinations if config.subjects_for(peer).publish == subject]
    peer = f"; or the service {peers[0]!r} runs it with its own settings" if peers else ""
    return (
        "a service whose NATS user may manage streams must run "
        f"`manage.py jetstream_ensure_topology` with ENV={config.env!r}, "
        f"APP_NAME={config.app_name!r}, DESTINATION_APP={list(config.destinations)!r}, "
        f"STREAM_NAME={config.stream_name!r} (this service's settings){peer}"
    )


def refused_error(config: BridgeConfig, subject: str) -> NoStreamForSubject:
    """The error of a publish no stream captured while ``AUTO_PROVISION`` is off."""
    return NoStreamForSubject(
        f"no stream captures subject {subject!r} and AUTO_PROVISION is off for "
        f"{config.app_name!r}: {ensure_hint(config, subject)}",
        subject=subject,
    )


def _ours(config: BridgeConfig, subject: str) -> bool:
    return any(covers(wanted, subject) for wanted in desired_subjects(config))


async def provision_for(conn: Connection, config: BridgeConfig, error: NoStreamForSubject) -> None:
    """Make a stream capture ``error.subject``; return when a retry may succeed, else raise.

    Raises ``error`` for a subject these settings do not name, the ``AUTO_PROVISION``-off error,
    or the error of a failed ensure (with what to do instead).
    """
    subject = error.subject
    if not _ours(config, subject):
        raise error
    if not config.auto_provision:
        refused = refused_error(config, subject)
        raise refused from error
    attempt = _attempts.setdefault(conn, {}).setdefault(
        (config.stream_name, *desired_subjects(config)), _Attempt()
    )
    async with attempt.lock:
        now = asyncio.get_running_loop().time()
        if attempt.finished is None or now - attempt.finished >= RERUN_AFTER:
            attempt.error = await _ensure(conn, config, subject)
            attempt.finished = asyncio.get_running_loop().time()
    if attempt.error is not None:
        raise attempt.error from error


async def _ensure(
    conn: Connection, config: BridgeConfig, subject: str
) -> NoStreamForSubject | None:
    logger.info(
        "no stream captures %s; provisioning stream %s (AUTO_PROVISION)",
        subject,
        config.stream_name,
        extra={"subject": subject, "stream": config.stream_name},
    )
    try:
        await ensure_stream_async(conn, config)
    except JetStreamBridgeError as exc:
        logger.warning(
            "auto-provisioning stream %s failed: %s",
            config.stream_name,
            exc,
            extra={"subject": subject, "stream": config.stream_name},
        )
        return NoStreamForSubject(
            f"no stream captures subject {subject!r} and AUTO_PROVISION could not create it "
            f"({exc}); set AUTO_PROVISION to False if this service may not manage streams, "
            f"and {ensure_hint(config, subject)}",
            subject=subject,
        )
    return None


async def publish_provisioned(
    conn: Connection, config: BridgeConfig, publish: Callable[[Connection], Awaitable[T]]
) -> T:
    """Run ``publish``; when no stream captures its subject, provision and run it once more."""
    try:
        return await publish(conn)
    except NoStreamForSubject as exc:
        await provision_for(conn, config, exc)
    return await publish(conn)


async def republish_missing(
    conn: Connection,
    config: BridgeConfig,
    items: Sequence[Item],
    results: list[PubAck | Exception],
    *,
    max_in_flight: int,
) -> list[PubAck | Exception]:
    """Provision and publish again the ``items`` whose result says no stream captured them."""
    missing = {i: r for i, r in enumerate(results) if isinstance(r, NoStreamForSubject)}
    if not missing:
        return results
    refused: dict[str, Exception | None] = {}  # subject -> the error to record, None: retry
    for error in missing.values():
        if error.subject not in refused:
            try:
                await provision_for(conn, config, error)
                refused[error.subject] = None
            except NoStreamForSubject as exc:
                refused[error.subject] = exc
    retry = [i for i, error in missing.items() if refused[error.subject] is None]
    for index, error in missing.items():
        results[index] = refused[error.subject] or error
    if retry:
        again = await conn.publish_many([items[i] for i in retry], max_in_flight=max_in_flight)
        for index, result in zip(retry, again, strict=True):
            results[index] = result
    return results
