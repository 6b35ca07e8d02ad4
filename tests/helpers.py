"""Small helpers shared by the integration tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from jetstream_bridge.broker import Connection
from jetstream_bridge.core.errors import ConsumerNotFound, StreamNotFound
from jetstream_bridge.runtime import get_runtime

T = TypeVar("T")


def nats(job: Callable[[Connection], Awaitable[T]]) -> T:
    """Run ``job(connection)`` on the bridge's shared connection."""
    return get_runtime().call(job, timeout=30)


def stream_subjects(name: str) -> list[str]:
    info = nats(lambda c: c.jsm.stream_info(name))
    assert info is not None, f"stream {name} does not exist"
    return list(info.config.subjects)


def stream_answer(name: str) -> dict[str, Any] | None:
    """The server's own ``STREAM.INFO`` answer: every field, durations in nanoseconds."""

    async def read(conn: Connection) -> dict[str, Any] | None:
        try:
            return await conn.jsm.api(f"STREAM.INFO.{name}")
        except StreamNotFound:
            return None

    return nats(read)


def consumer_answer(stream: str, durable: str) -> dict[str, Any] | None:
    """The server's own ``CONSUMER.INFO`` answer: every field, durations in nanoseconds."""

    async def read(conn: Connection) -> dict[str, Any] | None:
        try:
            return await conn.jsm.api(f"CONSUMER.INFO.{stream}.{durable}")
        except ConsumerNotFound:
            return None

    return nats(read)


def stream_messages(name: str, *, concurrency: int = 64, retries: int = 5) -> list[Any]:
    """Every message stored in stream ``name``, in order (read concurrently).

    Each read is retried a few times: a cluster may be electing a stream leader meanwhile.
    """
    import asyncio

    async def read(conn: Connection) -> list[Any]:
        info = await conn.jsm.stream_info(name)
        assert info is not None, f"stream {name} does not exist"
        state = info.state
        if state.messages == 0:
            return []
        gate = asyncio.Semaphore(concurrency)

        async def one(seq: int) -> Any:
            async with gate:
                for attempt in range(retries):
                    try:
                        return await conn.jsm.get_message(name, seq)
                    except Exception:
                        if attempt == retries - 1:
                            raise
                        await asyncio.sleep(0.5)
            return None

        seqs = range(state.first_seq, state.last_seq + 1)
        return [m for m in await asyncio.gather(*(one(seq) for seq in seqs)) if m is not None]

    return get_runtime().call(read, timeout=600)


def manage(
    *args: str, env: dict[str, str], timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=check,
    )


def stream_count(name: str) -> int:
    """How many messages stream ``name`` stores (0 when it does not exist)."""
    info = nats(lambda c: c.jsm.stream_info(name))
    return info.state.messages if info else 0


def stream_msg_ids(name: str) -> list[str]:
    """The ``Nats-Msg-Id`` of every stored message, in stream order."""
    from jetstream_bridge.core.envelope import MSG_ID_HEADER

    return [m.headers.get(MSG_ID_HEADER, "") for m in stream_messages(name)]


def spawn(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``python -m django *args`` without waiting (for signals and concurrency)."""
    return subprocess.Popen(
        [sys.executable, "-m", "django", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def publish_incoming(
    config: Any,
    count: int,
    *,
    payload: dict[str, Any] | None = None,
    producer: str | None = None,
    start: int = 0,
) -> list[str]:
    """Publish ``count`` envelopes as the peer app would, to our subscribe subject."""
    from jetstream_bridge.core.envelope import build_envelope, encode

    envelopes = [
        build_envelope(
            producer=producer or config.destination_app,
            resource_type="order",
            event_type="created",
            payload={"id": start + i, **(payload or {})},
        )
        for i in range(count)
    ]
    items = [
        (config.subjects.subscribe, encode(e), {"Nats-Msg-Id": e["event_id"]}) for e in envelopes
    ]

    async def send(conn: Connection) -> None:
        results = await conn.publish_many(items)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[:3]

    nats(send)
    return [e["event_id"] for e in envelopes]


def publish_raw(config: Any, data: bytes, headers: dict[str, str] | None = None) -> int:
    return nats(lambda c: c.publish(config.subjects.subscribe, data, headers)).seq


def fast_retry_bridge(settings: Any, durable: str, **extra: Any) -> Any:
    """Point the bridge at short retries (3 deliveries, 200 ms apart), ensure ``durable``.

    Return the config. For tests that watch messages get retried and dead-lettered.
    """
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "MAX_DELIVER": 3,
        "ACK_WAIT": "2s",
        "BACKOFF": ["200ms", "200ms"],
        **extra,
    }
    from jetstream_bridge.conf import get_config
    from jetstream_bridge.topology import ensure_topology

    ensure_topology(durable=durable)
    return get_config()
