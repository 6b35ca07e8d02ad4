"""Publishing to JetStream: reading the stream's ack, and many publishes with a window of acks."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg

from ..core.errors import NatsError, NatsUnavailable, PublishFailed
from .errors import api_error, no_stream_for, translate, translated
from .types import PubAck

Item = tuple[str, bytes, Mapping[str, str] | None]


def pub_ack(subject: str, data: bytes, headers: Mapping[str, str] | None = None) -> PubAck:
    """Turn the stream's answer to a publish into a ``PubAck``; raise ``PublishFailed``."""
    if not data and (headers or {}).get("Status") == "503":
        raise no_stream_for(subject)
    answer = json.loads(data)
    if "error" in answer:
        error = api_error(answer["error"])
        raise PublishFailed(f"publish to {subject} rejected: {error}") from error
    return PubAck.from_response(answer)


@dataclass(slots=True)
class _Pending:
    """One publish whose ack is awaited."""

    index: int
    subject: str
    token: str
    future: asyncio.Future[NatsMsg]
    deadline: float


class AckInbox:
    """The acks of ``publish_many``: one wildcard inbox per client, futures keyed by a counter.

    A gather of single publishes cost a task, a semaphore wait, a timer and a NUID per message:
    more CPU than the publish itself, which held the relay to ~0.4x of nats-py's publish_async
    (benchmarks/). Here a message costs one future, and the oldest one is awaited only when the
    window is full.
    """

    def __init__(self, servers: str) -> None:
        self._servers = servers
        self._acks: dict[str, asyncio.Future[NatsMsg]] = {}
        self._client: NatsClient | None = None
        self._prefix = ""
        self._seq = 0

    async def publish_many(
        self, nc: NatsClient, items: Sequence[Item], *, max_in_flight: int, wait: float
    ) -> list[PubAck | Exception]:
        """Publish ``items`` with up to ``max_in_flight`` acks outstanding, each given ``wait``."""
        prefix = await self._inbox(nc)
        loop = asyncio.get_running_loop()
        results: list[PubAck | Exception | None] = [None] * len(items)
        window: deque[_Pending] = deque()
        for index, (subject, data, headers) in enumerate(items):
            while len(window) >= max_in_flight:
                oldest = window.popleft()
                results[oldest.index] = await self._settle(oldest, loop)
            self._seq += 1
            token = str(self._seq)
            future: asyncio.Future[NatsMsg] = loop.create_future()
            self._acks[token] = future
            try:
                # No `async with translated()` here: an async context manager per message was
                # a measurable share of a relay's CPU; errors are translated only when they
                # happen.
                await nc.publish(
                    subject, data, reply=prefix + token, headers=dict(headers) if headers else None
                )
            except Exception as exc:
                ours = translate(exc, f"publish to {subject}", self._servers)
                if ours is None:
                    raise
                self._acks.pop(token, None)
                results[index] = ours
                continue
            window.append(_Pending(index, subject, token, future, loop.time() + wait))
        while window:
            oldest = window.popleft()
            results[oldest.index] = await self._settle(oldest, loop)
        return cast("list[PubAck | Exception]", results)  # _settle() filled every slot

    async def _settle(
        self, pending: _Pending, loop: asyncio.AbstractEventLoop
    ) -> PubAck | Exception:
        future = pending.future
        if not future.done():
            await asyncio.wait((future,), timeout=max(0.0, pending.deadline - loop.time()))
        self._acks.pop(pending.token, None)
        if not future.done():
            future.cancel()
            return NatsUnavailable(
                f"publish to {pending.subject}: timed out talking to {self._servers}"
            )
        msg = future.result()
        try:
            return pub_ack(pending.subject, msg.data, msg.headers)
        except (PublishFailed, NatsError) as exc:
            return exc

    async def _inbox(self, nc: NatsClient) -> str:
        """Return the reply prefix whose wildcard subscription resolves the pending acks."""
        if self._client is not nc:
            prefix = nc.new_inbox() + "."
            acks = self._acks

            async def on_ack(msg: NatsMsg) -> None:
                future = acks.pop(msg.subject[len(prefix) :], None)
                if future is not None and not future.done():
                    future.set_result(msg)

            async with translated("subscribe for publish acks", self._servers):
                await nc.subscribe(prefix + "*", cb=on_ack)
            self._client, self._prefix = nc, prefix
        return self._prefix
