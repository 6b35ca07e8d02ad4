"""What the streams holding the bridge's subjects do that its settings cannot fix.

One place for the four faces that report it (``jetstream_ensure_topology --check``,
``jetstream_health``, the admin status page, the consumer's and relay's start):

* a stream with ``interest`` or ``workqueue`` retention capturing one of our subjects, ours or
  another (a Ruby jetstream_bridge service creates its stream with interest retention);
* E015 against the server: the duplicate window of the stream storing our published events is
  not longer than ``RELAY_LEASE``, whatever ``DUPLICATE_WINDOW`` says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .broker import Connection, StreamInfo
from .core.errors import NatsError
from .core.settings import BridgeConfig
from .core.stream_plan import retention_warning, window_problem
from .core.topology_plan import desired_subjects

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamFinding:
    stream: str
    kind: str  # "retention" or "duplicate-window"
    message: str


async def _capturing(conn: Connection, config: BridgeConfig) -> dict[str, list[str]]:
    """Return stream name -> the subjects of ours it captures, in subject order."""
    streams: dict[str, list[str]] = {}
    for subject in desired_subjects(config):
        for name in await conn.jsm.stream_names(subject=subject):
            streams.setdefault(name, []).append(subject)
    return streams


async def audit_streams_async(conn: Connection, config: BridgeConfig) -> list[StreamFinding]:
    """Return what is wrong with the streams capturing our subjects (nothing is changed)."""
    findings: list[StreamFinding] = []
    for name, subjects in sorted((await _capturing(conn, config)).items()):
        info: StreamInfo | None = await conn.jsm.stream_info(name)
        if info is None:  # deleted meanwhile
            continue
        warning = retention_warning(name, info.config.retention, subjects)
        if warning:
            findings.append(StreamFinding(name, "retention", warning))
        if any(peer.publish in subjects for peer in config.peer_subjects):
            problem = window_problem(name, info.config.duplicate_window, config.relay_lease)
            if problem:
                findings.append(StreamFinding(name, "duplicate-window", problem))
    return findings


def warn_at_start(config: BridgeConfig, role: str) -> list[StreamFinding]:
    """Log each finding as a warning when a consumer or relay starts; never raise for NATS."""
    from .runtime import get_runtime

    try:
        findings = get_runtime().call(lambda conn: audit_streams_async(conn, config))
    except (NatsError, TimeoutError) as exc:
        logger.info("could not inspect the streams at %s start: %s", role, exc)
        return []
    log_findings(findings, role)
    return findings


def log_findings(findings: list[StreamFinding], role: str) -> None:
    for finding in findings:
        logger.warning(
            "%s: %s",
            role,
            finding.message,
            extra={"stream": finding.stream, "finding": finding.kind},
        )
