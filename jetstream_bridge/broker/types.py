"""Typed views of what the server answers: publish acks, stored messages, stream and consumer info.

Each view is built once from the server's JSON by ``from_response``; durations arrive in
nanoseconds and are converted to seconds there, so no caller divides by ``1e9``. Only
``StreamConfig`` keeps the server's full config (``raw``): a stream update must send it back
whole, or fields this client does not know would be reset.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..core.durations import NANOS_PER_SECOND, parse_server_time, to_nanos


def _seconds(nanos: Any) -> float:
    return int(nanos or 0) / NANOS_PER_SECOND


@dataclass(frozen=True)
class PubAck:
    """The stream's answer to a publish."""

    stream: str
    seq: int
    duplicate: bool

    @classmethod
    def from_response(cls, answer: Mapping[str, Any]) -> PubAck:
        return cls(
            stream=answer["stream"],
            seq=int(answer["seq"]),
            duplicate=bool(answer.get("duplicate", False)),
        )


@dataclass(frozen=True)
class ServerInfo:
    version: str
    max_payload: int
    server_name: str
    connected_url: str


@dataclass(frozen=True)
class StoredMessage:
    """A message read back from a stream by sequence."""

    subject: str
    seq: int
    data: bytes
    headers: dict[str, str]
    time: str

    @classmethod
    def from_response(cls, message: Mapping[str, Any]) -> StoredMessage:
        """Build from the ``message`` of a ``STREAM.MSG.GET`` answer (base64 body and headers)."""
        headers: dict[str, str] = {}
        raw_headers = message.get("hdrs")
        if raw_headers:
            lines = base64.b64decode(raw_headers).decode("utf-8", "replace").split("\r\n")
            for line in lines[1:]:  # the first line is the "NATS/1.0" status line
                if ":" in line:
                    key, _, value = line.partition(":")
                    headers[key.strip()] = value.strip()
        return cls(
            subject=message["subject"],
            seq=int(message["seq"]),
            data=base64.b64decode(message.get("data") or b""),
            headers=headers,
            time=str(message.get("time", "")),
        )


@dataclass(frozen=True)
class StreamConfig:
    """A stream's config as the server holds it; durations in seconds."""

    name: str
    subjects: tuple[str, ...]
    retention: str = ""
    storage: str = ""
    num_replicas: int = 1
    max_age: float = 0.0
    max_bytes: int = -1
    max_msgs: int = -1
    duplicate_window: float = 0.0
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_response(cls, config: Mapping[str, Any]) -> StreamConfig:
        return cls(
            name=str(config.get("name", "")),
            subjects=tuple(config.get("subjects") or ()),
            retention=str(config.get("retention", "")),
            storage=str(config.get("storage", "")),
            num_replicas=int(config.get("num_replicas") or 1),
            max_age=_seconds(config.get("max_age")),
            max_bytes=int(config.get("max_bytes", -1)),
            max_msgs=int(config.get("max_msgs", -1)),
            duplicate_window=_seconds(config.get("duplicate_window")),
            raw=dict(config),
        )

    def with_subjects(self, subjects: list[str]) -> dict[str, Any]:
        """Return the server's full config with only the subject list replaced, for an update.

        Starting from the server's own config keeps replicas, limits, retention, the duplicate
        window and any field this client does not know.
        """
        return {**self.raw, "subjects": list(subjects)}


@dataclass(frozen=True)
class StreamState:
    """What a stream holds. ``subjects`` (message count per subject) is filled only when the
    info was asked with a ``subjects_filter``."""

    messages: int = 0
    bytes: int = 0
    first_seq: int = 0
    last_seq: int = 0
    consumer_count: int = 0
    subjects: dict[str, int] = field(default_factory=dict)
    first_time: datetime | None = None  # when the first stored message was stored

    @classmethod
    def from_response(cls, state: Mapping[str, Any]) -> StreamState:
        return cls(
            first_time=parse_server_time(state.get("first_ts")) if state.get("messages") else None,
            messages=int(state.get("messages", 0)),
            bytes=int(state.get("bytes", 0)),
            first_seq=int(state.get("first_seq", 0)),
            last_seq=int(state.get("last_seq", 0)),
            consumer_count=int(state.get("consumer_count", 0)),
            subjects={str(k): int(v) for k, v in (state.get("subjects") or {}).items()},
        )


@dataclass(frozen=True)
class StreamInfo:
    """The answer to ``STREAM.INFO``."""

    config: StreamConfig
    state: StreamState

    @classmethod
    def from_response(cls, answer: Mapping[str, Any]) -> StreamInfo:
        return cls(
            config=StreamConfig.from_response(answer.get("config") or {}),
            state=StreamState.from_response(answer.get("state") or {}),
        )


@dataclass(frozen=True)
class ConsumerConfig:
    """A durable's config as the server holds it; durations in seconds.

    A field the server left out is ``None``, so that ``as_dict()`` leaves it out too.
    """

    durable_name: str | None = None
    filter_subject: str | None = None
    filter_subjects: tuple[str, ...] | None = None
    ack_policy: str | None = None
    deliver_policy: str | None = None
    deliver_subject: str | None = None
    ack_wait: float | None = None
    max_deliver: int | None = None
    max_ack_pending: int | None = None
    backoff: tuple[float, ...] | None = None

    @classmethod
    def from_response(cls, config: Mapping[str, Any]) -> ConsumerConfig:
        def seconds(name: str) -> float | None:
            return _seconds(config[name]) if config.get(name) is not None else None

        backoff = config.get("backoff")
        filters = config.get("filter_subjects")
        return cls(
            durable_name=config.get("durable_name"),
            filter_subject=config.get("filter_subject"),
            filter_subjects=tuple(filters) if filters is not None else None,
            ack_policy=config.get("ack_policy"),
            deliver_policy=config.get("deliver_policy"),
            deliver_subject=config.get("deliver_subject"),
            ack_wait=seconds("ack_wait"),
            max_deliver=config.get("max_deliver"),
            max_ack_pending=config.get("max_ack_pending"),
            backoff=tuple(_seconds(n) for n in backoff) if backoff is not None else None,
        )

    @property
    def filters(self) -> tuple[str, ...]:
        """Return the subjects this consumer reads: ``filter_subjects``, else ``filter_subject``."""
        if self.filter_subjects:
            return self.filter_subjects
        return (self.filter_subject,) if self.filter_subject else ()

    def as_dict(self) -> dict[str, Any]:
        """Return the fields the server sent, in its own shape (durations in nanoseconds)."""
        result: dict[str, Any] = {}
        for name in (
            "durable_name",
            "filter_subject",
            "ack_policy",
            "deliver_policy",
            "deliver_subject",
            "max_deliver",
            "max_ack_pending",
        ):
            if (value := getattr(self, name)) is not None:
                result[name] = value
        if self.filter_subjects is not None:
            result["filter_subjects"] = list(self.filter_subjects)
        if self.ack_wait is not None:
            result["ack_wait"] = to_nanos(self.ack_wait)
        if self.backoff is not None:
            result["backoff"] = [to_nanos(delay) for delay in self.backoff]
        return result


@dataclass(frozen=True)
class SequenceInfo:
    """A position in a consumer: its own sequence and the stream's."""

    consumer_seq: int = 0
    stream_seq: int = 0

    @classmethod
    def from_response(cls, position: Mapping[str, Any]) -> SequenceInfo:
        return cls(
            consumer_seq=int(position.get("consumer_seq") or 0),
            stream_seq=int(position.get("stream_seq") or 0),
        )


@dataclass(frozen=True)
class ConsumerInfo:
    """The answer to ``CONSUMER.INFO``."""

    stream_name: str
    name: str
    config: ConsumerConfig
    delivered: SequenceInfo = SequenceInfo()
    ack_floor: SequenceInfo = SequenceInfo()
    num_pending: int = 0
    num_ack_pending: int = 0
    num_redelivered: int = 0
    num_waiting: int = 0

    @classmethod
    def from_response(cls, answer: Mapping[str, Any]) -> ConsumerInfo:
        return cls(
            stream_name=str(answer.get("stream_name", "")),
            name=str(answer.get("name", "")),
            config=ConsumerConfig.from_response(answer.get("config") or {}),
            delivered=SequenceInfo.from_response(answer.get("delivered") or {}),
            ack_floor=SequenceInfo.from_response(answer.get("ack_floor") or {}),
            num_pending=int(answer.get("num_pending", 0)),
            num_ack_pending=int(answer.get("num_ack_pending", 0)),
            num_redelivered=int(answer.get("num_redelivered", 0)),
            num_waiting=int(answer.get("num_waiting", 0)),
        )


@dataclass(frozen=True)
class AccountInfo:
    """The answer to ``INFO``: what this account holds in JetStream."""

    streams: int = 0
    consumers: int = 0
    memory: int = 0
    storage: int = 0

    @classmethod
    def from_response(cls, answer: Mapping[str, Any]) -> AccountInfo:
        return cls(
            streams=int(answer.get("streams", 0)),
            consumers=int(answer.get("consumers", 0)),
            memory=int(answer.get("memory", 0)),
            storage=int(answer.get("storage", 0)),
        )
