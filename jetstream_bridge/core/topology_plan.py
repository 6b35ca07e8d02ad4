"""Pure topology decisions: which subjects to add, where the consumer binds, what differs.

The async side (``jetstream_bridge.topology``) reads the server, asks these functions what to
do, and applies the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .durations import NANOS_PER_SECOND, format_duration, to_nanos
from .errors import UnknownPeer
from .settings import BridgeConfig
from .stream_plan import creation_metadata
from .subjects import covers, is_reserved

# JetStream API error codes the bridge branches on.
ERR_CONSUMER_CANNOT_UPDATE = 10012
ERR_STREAM_NAME_IN_USE = 10058  # created concurrently with another config
ERR_SUBJECTS_OVERLAP = 10065
ERR_CONSUMER_EXISTS = 10148
ERR_REPLICAS_NOT_SUPPORTED = 10074  # replicas > 1 on a server that is not clustered
RETRYABLE_STREAM_ERRORS = frozenset({ERR_STREAM_NAME_IN_USE, ERR_SUBJECTS_OVERLAP})


@dataclass(frozen=True)
class SubjectPlan:
    """What to do with each wanted subject."""

    add: tuple[str, ...] = ()
    covered: dict[str, str] = field(default_factory=dict)  # subject -> own subject covering it
    elsewhere: dict[str, tuple[str, ...]] = field(default_factory=dict)  # subject -> streams

    @property
    def changes(self) -> bool:
        return bool(self.add)


def desired_subjects(config: BridgeConfig) -> list[str]:
    """Every subject the events' stream must capture: each peer's publish and subscribe, then
    the DLQ when it shares the events' stream (``DLQ_STREAM_NAME`` equal to ``STREAM_NAME``).

    With one peer this is today's list, in today's order.
    """
    subjects = [
        subject for peer in config.peer_subjects for subject in (peer.publish, peer.subscribe)
    ]
    if config.use_dlq and not config.separate_dlq_stream:
        subjects.append(config.subjects.dlq)
    for subject in subjects:
        if is_reserved(subject):  # settings validation makes this unreachable; belt and braces
            raise ValueError(f"refusing to manage reserved subject {subject!r}")
    return list(dict.fromkeys(subjects))


def plan_subjects(
    wanted: Sequence[str],
    own_subjects: Sequence[str],
    colliding_streams: Mapping[str, Sequence[str]],
) -> SubjectPlan:
    """Decide per subject: already covered by our stream, owned by another stream, or add.

    ``colliding_streams`` maps a wanted subject to the *other* streams whose subjects collide
    with it, as the server reports them.
    """
    add: list[str] = []
    covered: dict[str, str] = {}
    elsewhere: dict[str, tuple[str, ...]] = {}
    for subject in wanted:
        owner = next((own for own in own_subjects if covers(own, subject)), None)
        if owner is not None:
            covered[subject] = owner
        elif colliding_streams.get(subject):
            elsewhere[subject] = tuple(colliding_streams[subject])
        else:
            add.append(subject)
    return SubjectPlan(add=tuple(add), covered=covered, elsewhere=elsewhere)


def stream_config(config: BridgeConfig, subjects: Sequence[str]) -> dict[str, Any]:
    """The full config for a new stream (updates start from the server's own config)."""
    return {
        "name": config.stream_name,
        "subjects": list(subjects),
        "retention": config.stream_retention,
        "storage": config.stream_storage,
        "num_replicas": config.stream_replicas,
        "max_age": to_nanos(config.stream_max_age) if config.stream_max_age else 0,
        "max_bytes": config.stream_max_bytes or -1,
        "max_msgs": -1,
        "max_msg_size": -1,
        "discard": "old",
        "duplicate_window": to_nanos(config.duplicate_window),
        "allow_direct": True,
        # Who enforces which limit, for services sharing the stream (core/stream_plan.py).
        "metadata": creation_metadata(config),
    }


def consumer_peers(config: BridgeConfig, peers: Sequence[str] | None = None) -> tuple[str, ...]:
    """Return the peers to consume from: ``peers`` (validated) or every destination."""
    if not peers:
        return config.destinations
    unknown = [peer for peer in peers if peer not in config.destinations]
    if unknown:
        raise UnknownPeer(
            f"{', '.join(map(repr, unknown))} is not a configured peer; DESTINATION_APP names "
            f"{', '.join(config.destinations)}. Name one of those, or add the peer to "
            "DESTINATION_APP (after the existing ones)."
        )
    return tuple(dict.fromkeys(peers))


def peer_durable(config: BridgeConfig, durable: str, peer: str) -> str:
    """The durable consuming what ``peer`` sends us.

    The default peer (the first destination) keeps ``durable`` itself, so a single-peer service
    and the Ruby gem keep their consumer; every other peer gets ``{durable}-{peer}``, its own
    durable with its own position, pending limit and inbox key.
    """
    return durable if peer == config.destination_app else f"{durable}-{peer}"


def peer_durables(
    config: BridgeConfig, durable: str, peers: Sequence[str] | None = None
) -> dict[str, str]:
    """``peer_durable`` for each of ``consumer_peers(config, peers)``, in that order."""
    return {peer: peer_durable(config, durable, peer) for peer in consumer_peers(config, peers)}


def foreign_filter_problem(
    config: BridgeConfig, durable: str, wanted: str, current: str | None
) -> str | None:
    """Say why re-filtering ``durable`` from ``current`` to ``wanted`` must not happen.

    When the durable already consumes another configured peer's subject, the settings changed
    which peer is the default (the first of DESTINATION_APP): re-filtering would skip the new
    default peer's history and give the old one a fresh durable replaying all of its events.
    """
    if not current or current == wanted:
        return None
    for peer in config.destinations:
        if config.subjects_for(peer).subscribe == current:
            return (
                f"consumer {durable} consumes from peer {peer!r} ({current}), but the first "
                f"DESTINATION_APP is now {config.destination_app!r}. Keep {peer!r} first in "
                "DESTINATION_APP (the first peer keeps the durable's name) and add new peers "
                "after it."
            )
    return None


def dlq_stream_config(config: BridgeConfig) -> dict[str, Any]:
    """The full config for the DLQ's own stream: only the DLQ subject, its own limits.

    ``discard: old`` so that, at ``DLQ_MAX_BYTES``, the oldest dead letters make room and the
    consumer's DLQ publish never fails for lack of space.
    """
    return {
        "name": config.dlq_stream_name,
        "subjects": [config.subjects.dlq],
        "retention": "limits",
        "storage": config.stream_storage,
        "num_replicas": config.stream_replicas,
        "max_age": to_nanos(config.dlq_max_age) if config.dlq_max_age else 0,
        "max_bytes": config.dlq_max_bytes or -1,
        "max_msgs": -1,
        "max_msg_size": -1,
        "discard": "old",
        "duplicate_window": to_nanos(config.duplicate_window),
        "allow_direct": True,
    }


def dlq_limit_differences(config: BridgeConfig, max_age: float, max_bytes: int) -> list[str]:
    """Return ``"field: server -> wanted"`` for each DLQ stream limit that differs.

    ``DLQ_MAX_BYTES`` left unset leaves the server's byte limit alone.
    """
    want_age = config.dlq_max_age or 0.0
    differences = []
    if abs(max_age - want_age) > 1e-6:
        differences.append(f"max_age: {max_age:g}s -> {want_age:g}s")
    want_bytes = config.dlq_max_bytes
    if want_bytes is not None and max_bytes != want_bytes:
        differences.append(f"max_bytes: {max_bytes} -> {want_bytes}")
    return differences


def consumer_config(config: BridgeConfig, durable: str, filter_subject: str) -> dict[str, Any]:
    """The durable's config: explicit acks, ``ACK_WAIT``, ``MAX_DELIVER``, and no server backoff.

    ``BACKOFF`` is applied by the consumer through delayed NAKs, which the server honours
    exactly. A server-side ``backoff`` is deliberately left out: the server then replaces
    ``ack_wait`` with its first value and shifts NAK delays (measured on nats-server 2.15: a
    0.5 s NAK came back after 3.5 s with backoff [1s, 4s]), so neither setting would mean what
    it says. A message whose worker died comes back after ``ACK_WAIT``.
    """
    return {
        "durable_name": durable,
        "filter_subject": filter_subject,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": to_nanos(config.ack_wait),
        "max_deliver": config.max_deliver,
        "max_ack_pending": config.max_ack_pending,
    }


# Fields compared when reconciling an existing durable with the settings.
RECONCILED_FIELDS = (
    "filter_subject",
    "ack_policy",
    "ack_wait",
    "max_deliver",
    "backoff",
    "max_ack_pending",
)


def _show(name: str, value: Any) -> str:
    """Render a consumer field for the diff: durations as a user writes them (``30s``)."""
    if name == "ack_wait" and isinstance(value, int):
        return format_duration(value / NANOS_PER_SECOND)
    if name == "backoff":
        return "[" + ", ".join(format_duration(n / NANOS_PER_SECOND) for n in value) + "]"
    return repr(value)


def consumer_differences(desired: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Return ``"field: server -> wanted"`` for each reconciled field that differs."""
    differences = []
    for name in RECONCILED_FIELDS:
        want, have = desired.get(name), current.get(name)
        if name == "backoff":
            want, have = list(want or []), list(have or [])
        if name == "filter_subject" and not have and current.get("filter_subjects"):
            have = current["filter_subjects"]
        if want != have:
            differences.append(f"{name}: {_show(name, have)} -> {_show(name, want)}")
    if current.get("deliver_subject"):
        differences.append("deliver_subject: push consumer -> pull consumer")
    return differences
