"""Pulling from a durable consumer: the inbox channel and ``Delivery`` with its ack verbs."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg

from ..core.errors import ConsumerNotFound

if TYPE_CHECKING:
    from .client import Connection


class Delivery:
    """A message delivered by a pull consumer, with the ack verbs the bridge uses."""

    __slots__ = (
        "_conn",
        "_reply_subject",
        "consumer",
        "data",
        "deliveries",
        "headers",
        "pending",
        "stream",
        "stream_seq",
        "subject",
    )

    def __init__(self, conn: Connection, msg: NatsMsg) -> None:
        meta = msg.metadata
        self._conn: Connection = conn
        self._reply_subject: str = msg.reply
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] = dict(msg.headers or {})
        self.stream: str = meta.stream
        self.consumer: str = meta.consumer
        self.stream_seq: int = meta.sequence.stream
        self.deliveries: int = meta.num_delivered
        self.pending: int = meta.num_pending

    async def _settle(self, body: bytes) -> None:
        await self._conn._reply_to(self._reply_subject, body)

    def __repr__(self) -> str:
        return (
            f"Delivery(subject={self.subject!r}, stream={self.stream!r}, "
            f"seq={self.stream_seq}, deliveries={self.deliveries})"
        )

    async def ack(self) -> None:
        await self._settle(b"+ACK")

    async def nak(self, delay: float = 0.0) -> None:
        """Negatively acknowledge; with ``delay`` the server waits that long to redeliver."""
        body = b"-NAK"
        if delay > 0:
            body += b" " + json.dumps({"delay": round(delay * 1e9)}).encode()
        await self._settle(body)

    async def term(self, reason: str = "") -> None:
        """Stop redelivery for good; the reason shows up in the server's advisory."""
        body = b"+TERM"
        if reason:
            body += b" " + reason.replace("\n", " ")[:200].encode()
        await self._settle(body)

    async def in_progress(self) -> None:
        """Reset the server's ack timer for a message whose handler is still running."""
        await self._settle(b"+WPI")


class PullChannel:
    """One inbox subscription that receives the messages pulled for one durable consumer."""

    def __init__(self, nc: NatsClient, stream: str, durable: str) -> None:
        self.nc = nc
        self.durable = durable
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self.queue: asyncio.Queue[NatsMsg] = asyncio.Queue()

    @classmethod
    async def open(cls, nc: NatsClient, stream: str, durable: str) -> PullChannel:
        channel = cls(nc, stream, durable)

        async def deliver(msg: NatsMsg) -> None:
            channel.queue.put_nowait(msg)

        await nc.subscribe(channel.inbox, cb=deliver)
        return channel

    def leftovers(self, limit: int) -> list[NatsMsg]:
        """Take messages that arrived after an earlier pull gave up; drop stale statuses."""
        msgs: list[NatsMsg] = []
        while len(msgs) < limit and not self.queue.empty():
            msg = self.queue.get_nowait()
            if not _status(msg):
                msgs.append(msg)
        return msgs

    async def pull(self, count: int, timeout: float, *, wait: bool = False) -> list[NatsMsg]:
        body: dict[str, Any] = {"batch": count}
        if wait:
            body["expires"] = max(1, round(timeout * 1e9) - 50_000_000)
        else:
            body["no_wait"] = True
        await self.nc.publish(self.next_subject, json.dumps(body).encode(), reply=self.inbox)
        msgs: list[NatsMsg] = []
        deadline = time.monotonic() + timeout + (0.5 if wait else 0.0)
        while len(msgs) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            status = _status(msg)
            if not status:
                msgs.append(msg)
            elif status == "100":  # idle heartbeat
                continue
            elif status == "409" and "deleted" in _description(msg).lower():
                raise ConsumerNotFound(f"consumer {self.durable} was deleted", code=409)
            elif status == "503":
                raise ConsumerNotFound(f"consumer {self.durable} is not available", code=503)
            else:  # 404 no messages, 408 request expired, 409 limits: this pull is over
                break
        return msgs


def _status(msg: NatsMsg) -> str:
    # The server's status messages (no messages, request expired, heartbeat) have no body and
    # no reply subject, while a stored message always has its $JS.ACK reply. Judged by the body
    # alone, a message published with an empty body and a "Status" header of its own was taken
    # for a status, dropped on every delivery and lost at max_deliver.
    if msg.data or msg.reply:
        return ""
    return str((msg.headers or {}).get("Status", ""))


def _description(msg: NatsMsg) -> str:
    return str((msg.headers or {}).get("Description", ""))
