"""A test peer that behaves on the wire as a Ruby ``jetstream_bridge`` service does.

Written for the interop tests from facts read in the gem's public source (nothing of it is
copied here), at tag ``v2.0.0`` of github.com/attaradev/jetstream_bridge: the last release
whose subjects are ``{env}.data.sync.{app}.{dest}``, like this bridge's (``v1.1.6`` to
``v2.0.0`` share them; ``v2.1.0`` moved to ``{env}.{app}.sync.{dest}``). The gem talks to
NATS through nats-pure 2.5.0 (its ``Gemfile.lock``), whose JetStream manager decides what
reaches the server. What the peer does, and where the fact comes from:

* **names** (``core/config.rb``): stream ``{env}-jetstream-bridge-stream``; publishes on
  ``{env}.data.sync.{app}.{dest}``, consumes ``{env}.data.sync.{dest}.{app}``; dead letters
  on ``{env}.data.sync.dlq``; durable ``{env}-{app}-workers``.
* **stream ensure** (``topology/topology.rb``, ``topology/stream.rb``, ``overlap_guard.rb``),
  run on every connect: wants the two subjects plus the DLQ subject (``use_dlq``, default on).
  Subjects that collide with another stream are skipped. A missing stream is created with
  only ``name``, ``subjects``, ``retention: interest`` and ``storage: file``. An existing one
  that lacks a subject gets an update whose body holds only ``name`` and the subject list
  (nats-pure's ``update_stream`` sends the config struct with nil fields dropped): every
  other field is left to the server's defaults. A subjects-overlap error (10065, or any
  status 400) is retried once after 50 ms, then the stream is left as it is.
* **consumer** (``consumer/consumer_config.rb``, ``subscription_manager.rb``, ``core/duration.rb``
  and nats-pure's ``add_consumer``): durable pull consumer, ``ack_policy: explicit``,
  ``filter_subject`` = the consumed subject, ``max_deliver`` 5, ``ack_wait`` and ``backoff``
  converted to *milliseconds* by the gem (``"30s"`` -> 30000; a bare integer below 1000
  counts as seconds). nats-pure then multiplies ``ack_wait`` (not ``backoff``) by 10**9, so
  the server receives ``ack_wait`` = 30000 s and ``backoff`` = [1000, 5000, ...] read as
  *nanoseconds*. A durable whose filter differs is deleted and created again.
* **publish** (``publisher/publisher.rb``): a JetStream publish (waits for the ack) of the
  JSON envelope ``event_id`` (UUID v4 unless given), ``schema_version`` 1, ``event_type``,
  ``producer`` (app name), ``resource_id`` (``payload["id"]`` as a string), ``occurred_at``
  (ISO 8601 UTC, whole seconds, ``Z``), ``trace_id`` (16 hex), ``resource_type``,
  ``payload``, in that order, with one header ``Nats-Msg-Id: <event_id>``.
* **consume** (``consumer/consumer.rb``, ``message_processor.rb``, ``inbox/*``): fetches batches of
  25; the handler gets ``(event, subject, deliveries)``. Body not JSON: dead letter, ack.
  Handler raised: dead letter and ack when ``deliveries >= max_deliver``, else a plain NAK
  (no delay: the server's ``backoff`` applies). With ``use_inbox`` (off by default) a
  message whose id (``Nats-Msg-Id``, else the body's ``event_id``) is marked processed is
  acked unhandled; the mark is set after the processor returns, which it also does after
  NAKing a failure.
* **dead letters**: ``v2.0.0`` (``message_processor.rb``) publishes the original body with
  the original headers only, ``Nats-Msg-Id`` included. From ``v2.4.0`` on
  (``consumer/dlq_publisher.rb``, same header set through ``v7.1.3``) it adds
  ``x-dead-letter: true``, ``x-dlq-reason`` (``malformed_json``, ``unrecoverable``,
  ``max_deliver_exceeded``), ``x-deliveries`` and ``x-dlq-context``: JSON with
  ``event_id``, ``reason``, ``error_class``, ``error_message``, ``deliveries``,
  ``original_subject``, ``sequence``, ``consumer``, ``stream``, ``published_at``. Those
  releases read the event id under the lower-case name ``nats-msg-id``, which nats-pure
  does not fold, so for a ``Nats-Msg-Id`` message the context's ``event_id`` is a random
  UUID; and ``sequence`` is nats-pure's (stream, consumer) pair struct, which JSON renders
  as its ``#<struct ... stream=N, consumer=M>`` text. ``dlq_headers`` picks the format:
  ``"v2.0"`` (default: the format of the releases whose subjects match ours) or ``"v2.4"``
  (the later format, which those releases write on other subjects: ``{env}.sync.dlq``).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

ERR_SUBJECTS_OVERLAP = 10065
_MULTIPLIER = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", re.IGNORECASE)

Handler = Callable[[Any, str, int], Any]


def to_millis(value: int | float | str) -> int:
    """The gem's duration rule: ints >= 1000 are ms, smaller ints seconds; '30s', '500ms'."""
    if isinstance(value, int):
        return value if value >= 1_000 else value * 1_000
    if isinstance(value, float):
        return round(value * 1_000)
    text = value.strip()
    if text.isdigit():
        return to_millis(int(text))
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"invalid duration: {value!r}")
    return round(float(match.group(1)) * _MULTIPLIER[match.group(2).lower()])


@dataclass(frozen=True)
class GemConfig:
    env: str
    app_name: str
    destination_app: str
    max_deliver: int = 5
    ack_wait: int | float | str = "30s"
    backoff: tuple[int | float | str, ...] = ("1s", "5s", "15s", "30s", "60s")
    use_dlq: bool = True
    use_inbox: bool = False
    dlq_headers: str = "v2.0"  # what the tag with our subject scheme writes; "v2.4": x-dlq-*

    @property
    def stream_name(self) -> str:
        return f"{self.env}-jetstream-bridge-stream"

    @property
    def source_subject(self) -> str:
        return f"{self.env}.data.sync.{self.app_name}.{self.destination_app}"

    @property
    def destination_subject(self) -> str:
        return f"{self.env}.data.sync.{self.destination_app}.{self.app_name}"

    @property
    def dlq_subject(self) -> str:
        return f"{self.env}.data.sync.dlq"

    @property
    def durable_name(self) -> str:
        return f"{self.env}-{self.app_name}-workers"

    def wanted_subjects(self) -> list[str]:
        subjects = [self.source_subject, self.destination_subject]
        if self.use_dlq:
            subjects.append(self.dlq_subject)
        return list(dict.fromkeys(subjects))

    def consumer_config(self) -> dict[str, Any]:
        """The consumer config as it reaches the server (nats-pure scales only ack_wait)."""
        return {
            "name": self.durable_name,
            "durable_name": self.durable_name,
            "filter_subject": self.destination_subject,
            "ack_policy": "explicit",
            "max_deliver": self.max_deliver,
            "ack_wait": to_millis(self.ack_wait) * 1_000_000_000,
            "backoff": [to_millis(d) for d in self.backoff],
        }


def _tokens_match(pattern: str, subject: str) -> bool:
    # The gem's own matcher: '*' one token, '>' the rest (zero tokens included).
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return True
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def _overlap(a: str, b: str) -> bool:
    x, y = a.split("."), b.split(".")
    for xt, yt in zip(x, y):
        if ">" in (xt, yt):
            return True
        if xt != yt and "*" not in (xt, yt):
            return False
    if len(x) != len(y):
        return ">" in x[len(y) :] or ">" in y[len(x) :]
    return True


class ApiError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("description", "JetStream API error"))
        self.code = int(error.get("code", 0))
        self.err_code = int(error.get("err_code", 0))


@dataclass
class PeerStats:
    handled: list[str] = field(default_factory=list)  # event ids, per handler success
    deliveries: int = 0  # messages fetched, redeliveries included
    acked_as_seen: int = 0
    naks: int = 0
    dead_letters: list[dict[str, Any]] = field(default_factory=list)  # the PubAcks


class GemPeer:
    """One gem service's JetStream behaviour over one nats-py connection."""

    def __init__(self, nc: Client, config: GemConfig) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.config = config
        self.processed: set[str] = set()  # the inbox's processed ids (use_inbox)
        self.ensured = ""  # what the ensure on connect did

    @classmethod
    async def connect(cls, url: str, config: GemConfig) -> GemPeer:
        """Connect and run the stream ensure, as the gem's ``Connection.connect!`` does."""
        peer = cls(await nats.connect(url), config)
        peer.ensured = await peer.ensure_topology()
        return peer

    async def close(self) -> None:
        await self.nc.close()

    async def api(self, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        reply = await self.nc.request(f"$JS.API.{endpoint}", data, timeout=5)
        answer: dict[str, Any] = json.loads(reply.data)
        if "error" in answer:
            raise ApiError(answer["error"])
        return answer

    # -- topology -----------------------------------------------------------------------------

    async def _streams(self) -> dict[str, list[str]]:
        names = (await self.api("STREAM.NAMES", {"offset": 0})).get("streams") or []
        result = {}
        for name in names:
            info = await self.api(f"STREAM.INFO.{name}")
            result[name] = list(info["config"].get("subjects") or [])
        return result

    async def _allowed(self, subjects: list[str]) -> tuple[list[str], list[str]]:
        others = {n: s for n, s in (await self._streams()).items() if n != self.config.stream_name}
        blocked = [s for s in subjects if any(_overlap(s, o) for os in others.values() for o in os)]
        return [s for s in subjects if s not in blocked], blocked

    async def ensure_topology(self) -> str:
        """Return what was done: created, updated, covered, blocked or overlap-left."""
        for attempt in (1, 2):
            try:
                return await self._ensure_once()
            except ApiError as exc:
                if exc.err_code != ERR_SUBJECTS_OVERLAP and exc.code != 400:
                    raise
                if attempt == 2:
                    return "overlap-left"
                await asyncio.sleep(0.05)
        raise AssertionError("unreachable")

    async def _ensure_once(self) -> str:
        name, wanted = self.config.stream_name, self.config.wanted_subjects()
        try:
            info = await self.api(f"STREAM.INFO.{name}")
        except ApiError as exc:
            if exc.code != 404:
                raise
            allowed, _ = await self._allowed(wanted)
            if not allowed:
                return "blocked"
            body = {"name": name, "subjects": allowed, "retention": "interest", "storage": "file"}
            await self.api(f"STREAM.CREATE.{name}", body)
            return "created"
        existing = list(info["config"].get("subjects") or [])
        missing = [s for s in wanted if not any(_tokens_match(e, s) for e in existing)]
        if not missing:
            return "covered"
        allowed, _ = await self._allowed(missing)
        if not allowed:
            return "blocked"
        # The partial update: name and subjects only; the server fills in the rest.
        await self.api(f"STREAM.UPDATE.{name}", {"name": name, "subjects": existing + allowed})
        return "updated"

    async def ensure_consumer(self) -> dict[str, Any]:
        c = self.config
        try:
            info = await self.api(f"CONSUMER.INFO.{c.stream_name}.{c.durable_name}")
            if info["config"].get("filter_subject") == c.destination_subject:
                return info
            await self.api(f"CONSUMER.DELETE.{c.stream_name}.{c.durable_name}")
        except ApiError as exc:
            if exc.code != 404:
                raise
        endpoint = f"CONSUMER.CREATE.{c.stream_name}.{c.durable_name}.{c.destination_subject}"
        body = {"stream_name": c.stream_name, "config": c.consumer_config()}
        return await self.api(endpoint, body)

    # -- publish ------------------------------------------------------------------------------

    def envelope(
        self, resource_type: str, event_type: str, payload: dict[str, Any], **options: Any
    ) -> dict[str, Any]:
        occurred = options.get("occurred_at") or datetime.now(timezone.utc)
        return {
            "event_id": options.get("event_id") or str(uuid.uuid4()),
            "schema_version": 1,
            "event_type": event_type,
            "producer": self.config.app_name,
            "resource_id": str(payload.get("id", "")),
            "occurred_at": occurred.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "trace_id": options.get("trace_id") or secrets.token_hex(8),
            "resource_type": resource_type,
            "payload": payload,
        }

    async def publish(
        self, resource_type: str, event_type: str, payload: dict[str, Any], **options: Any
    ) -> tuple[dict[str, Any], Any]:
        """Publish one event as the gem's ``Publisher#publish``; return (envelope, PubAck)."""
        envelope = self.envelope(resource_type, event_type, payload, **options)
        data = json.dumps(envelope, separators=(",", ":")).encode()
        ack = await self.js.publish(
            self.config.source_subject, data, headers={"Nats-Msg-Id": envelope["event_id"]}
        )
        return envelope, ack

    # -- consume ------------------------------------------------------------------------------

    async def consume(
        self, handler: Handler, *, batch_size: int = 25, idle_fetches: int = 2
    ) -> PeerStats:
        """Fetch and process until ``idle_fetches`` fetches in a row come back empty."""
        await self.ensure_consumer()
        c = self.config
        sub = await self.js.pull_subscribe_bind(c.durable_name, c.stream_name)
        stats, idle = PeerStats(), 0
        try:
            while idle < idle_fetches:
                try:
                    msgs = await sub.fetch(batch_size, timeout=1)
                except NatsTimeout:
                    idle += 1
                    continue
                idle = 0
                for msg in msgs:
                    stats.deliveries += 1
                    await self._process(msg, handler, stats)
        finally:
            await sub.unsubscribe()
        return stats

    def _inbox_id(self, msg: Msg) -> str:
        headers = {k.lower(): v for k, v in (msg.headers or {}).items()}
        ident = headers.get("nats-msg-id") or ""
        if not ident:
            try:
                ident = str(json.loads(msg.data).get("event_id") or "")
            except (ValueError, AttributeError):
                ident = ""
        return ident.strip() or f"seq:{msg.metadata.sequence.stream}"

    async def _process(self, msg: Msg, handler: Handler, stats: PeerStats) -> None:
        if not self.config.use_inbox:
            await self._handle(msg, handler, stats)
            return
        ident = self._inbox_id(msg)
        if ident in self.processed:
            stats.acked_as_seen += 1
            await msg.ack()
            return
        await self._handle(msg, handler, stats)
        self.processed.add(ident)

    async def _handle(self, msg: Msg, handler: Handler, stats: PeerStats) -> None:
        deliveries = msg.metadata.num_delivered
        try:
            event = json.loads(msg.data)
        except ValueError as exc:
            await self._dead_letter(msg, stats, "malformed_json", exc)
            await msg.ack()
            return
        try:
            result = handler(event, msg.subject, deliveries)
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:
            if deliveries >= self.config.max_deliver:
                await self._dead_letter(msg, stats, "max_deliver_exceeded", exc)
                await msg.ack()
            else:
                stats.naks += 1
                await msg.nak()
            return
        stats.handled.append(str(event.get("event_id")) if isinstance(event, dict) else "")
        await msg.ack()

    def dead_letter_headers(self, msg: Msg, reason: str, error: Exception) -> dict[str, str]:
        headers = dict(msg.headers or {})
        if self.config.dlq_headers == "v2.0":
            return headers
        meta = msg.metadata
        context = {
            # Read under 'nats-msg-id' without folding case: a random UUID for 'Nats-Msg-Id'.
            "event_id": headers.get("nats-msg-id") or str(uuid.uuid4()),
            "reason": reason,
            "error_class": type(error).__name__,
            "error_message": str(error),
            "deliveries": meta.num_delivered,
            "original_subject": msg.subject,
            "sequence": "#<struct NATS::JetStream::Msg::Ack::SequencePair "
            f"stream={meta.sequence.stream}, consumer={meta.sequence.consumer}>",
            "consumer": meta.consumer,
            "stream": meta.stream,
            "published_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        headers.update(
            {
                "x-dead-letter": "true",
                "x-dlq-reason": reason,
                "x-deliveries": str(meta.num_delivered),
                "x-dlq-context": json.dumps(context, separators=(",", ":")),
            }
        )
        return headers

    async def _dead_letter(self, msg: Msg, stats: PeerStats, reason: str, error: Exception) -> None:
        if not self.config.use_dlq:
            return
        headers = self.dead_letter_headers(msg, reason, error)
        try:
            ack = await self.js.publish(self.config.dlq_subject, msg.data, headers=headers)
        except Exception as exc:  # the gem logs a failed DLQ publish and acks anyway
            stats.dead_letters.append({"error": str(exc)})
            return
        stats.dead_letters.append(
            {"seq": ack.seq, "stream": ack.stream, "duplicate": ack.duplicate}
        )


def run(url: str, config: GemConfig, job: Callable[[GemPeer], Any]) -> Any:
    """Connect a peer (running its ensure), run ``job(peer)`` (a coroutine), close."""

    async def main() -> Any:
        peer = await GemPeer.connect(url, config)
        try:
            return await job(peer)
        finally:
            await peer.close()

    return asyncio.run(main())
