"""The NATS connection: lifecycle, publishing, pulling and plain subscriptions.

``Connection`` is the bridge's one client of nats-py. It connects failing fast with an error
that names the server, reconnects forever once connected, and translates every nats-py error
into ours (``jetstream_bridge.core.errors``). JetStream management calls live on ``conn.jsm``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg

from ..core.errors import AuthenticationFailed, NatsError, NatsUnavailable
from ..core.redaction import scrub
from ..core.settings import BridgeConfig, redact_url
from .errors import is_refused_login, no_stream_for, translated
from .manager import JetStreamManager
from .options import auth_options
from .publish import AckInbox, pub_ack
from .pull import Delivery, PullChannel
from .tls import GuardedClient, TlsNotOffered, expects_tls
from .types import PubAck, ServerInfo

logger = logging.getLogger(__name__)


class Connection:
    """One NATS connection with the JetStream operations the bridge needs.

    It is bound to the event loop it connected on; sync code reaches it through
    ``jetstream_bridge.runtime``.
    """

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.jsm = JetStreamManager(self)
        self._nc: NatsClient | None = None
        self._connect_lock = asyncio.Lock()
        self._last_error: BaseException | None = None
        self._subscriptions: dict[tuple[str, str], PullChannel] = {}
        self._closing = False
        self._failure: NatsError | None = None
        self._retry_after = 0.0
        self._acks = AckInbox(self.urls_for_humans)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def server_max_payload(self) -> int | None:
        """The server's max payload once connected (readable from any thread)."""
        nc = self._nc
        return int(nc.max_payload) if nc is not None and nc.is_connected else None

    @property
    def urls_for_humans(self) -> str:
        return ", ".join(self.config.redacted_urls)

    async def connect(self, *, now: bool = False) -> None:
        """Connect once; fail within ``CONNECT_TIMEOUT`` with an error naming the server.

        After the first success the client reconnects forever on its own: a restarted server
        or a cluster failover must not need a process restart. Right after a failure, callers
        get that failure again for a moment without a new attempt; ``now`` always tries.
        """
        async with self._connect_lock:
            if self._nc is not None and not self._nc.is_closed:
                return
            if not now and self._failure is not None and time.monotonic() < self._retry_after:
                # Fail fast while the server is known to be down instead of queueing a full
                # connect timeout behind every caller.
                raise type(self._failure)(str(self._failure))
            self._closing = False
            try:
                self._nc = await self._open()
            except NatsError as exc:
                self._failure = exc
                self._retry_after = time.monotonic() + min(self.config.connect_timeout, 2.0)
                raise
            self._failure = None

    async def _open(self) -> NatsClient:
        config = self.config
        auth_failed = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            self._last_error = exc
            if is_refused_login(exc) or isinstance(exc, TlsNotOffered):
                auth_failed.set()
            logger.warning(
                "nats error: %s",
                scrub(str(exc) or type(exc).__name__),
                extra={"servers": self.urls_for_humans},
            )

        async def on_disconnected() -> None:
            if not self._closing:
                logger.warning("nats disconnected", extra={"servers": self.urls_for_humans})

        async def on_reconnected() -> None:
            logger.info("nats reconnected", extra={"servers": self.urls_for_humans})

        nc = GuardedClient(require_tls=expects_tls(config))
        connect = asyncio.ensure_future(
            nc.connect(
                servers=list(config.nats_urls),
                name=config.connection_name,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=max(1, round(config.connect_timeout)),
                **auth_options(config),
            )
        )
        watcher = asyncio.ensure_future(auth_failed.wait())
        done, _ = await asyncio.wait(
            {connect, watcher}, timeout=config.connect_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        watcher.cancel()
        if connect in done and connect.exception() is None:
            logger.info(
                "nats connected",
                extra={
                    "servers": self.urls_for_humans,
                    "server_version": nc.connected_server_version,
                },
            )
            return nc
        connect.cancel()
        await asyncio.gather(connect, watcher, return_exceptions=True)
        await self._close_quietly(nc)
        cause = connect.exception() if connect.done() and not connect.cancelled() else None
        raise self._connect_error(cause or self._last_error, refused=auth_failed.is_set()) from None

    def _connect_error(self, cause: BaseException | None, *, refused: bool) -> NatsError:
        reason = scrub(str(cause) or type(cause).__name__) if cause else "no answer"
        if isinstance(cause, TlsNotOffered):
            return AuthenticationFailed(
                f"NATS at {self.urls_for_humans} did not start TLS, but the settings require it "
                "(TLS_CA_FILE, TLS_CERT_FILE, TLS_HANDSHAKE_FIRST or a tls:// URL); no "
                "credentials were sent. Enable TLS on the server (a `tls` block), or check for "
                "a proxy or a man in the middle between this host and the server."
            )
        if refused:
            return AuthenticationFailed(
                f"NATS at {self.urls_for_humans} refused the connection: {reason}. Check USER/"
                "PASSWORD, TOKEN, NKEY_SEED, CREDS_FILE or the TLS files in JETSTREAM_BRIDGE."
            )
        return NatsUnavailable(
            f"could not connect to NATS at {self.urls_for_humans} within "
            f"{self.config.connect_timeout:g}s ({reason}). Is the server running and NATS_URLS "
            "right?"
        )

    @staticmethod
    async def _close_quietly(nc: NatsClient) -> None:
        try:
            await asyncio.wait_for(nc.close(), timeout=2)
        except Exception:
            logger.debug("ignored error while closing a failed nats client", exc_info=True)

    async def close(self) -> None:
        """Flush what is buffered and close; safe to call twice."""
        nc, self._nc = self._nc, None
        self._subscriptions.clear()
        self._closing = True
        if nc is None or nc.is_closed:
            return
        try:
            if nc.is_connected:
                await asyncio.wait_for(nc.flush(), timeout=2)
        except Exception:
            logger.debug("flush before close failed", exc_info=True)
        await self._close_quietly(nc)

    async def _client(self) -> NatsClient:
        if self._nc is None or self._nc.is_closed:
            await self.connect()
        assert self._nc is not None
        return self._nc

    def _translated(self, what: str) -> AbstractAsyncContextManager[None]:
        return translated(what, self.urls_for_humans)

    # -- server ------------------------------------------------------------------------------

    async def server_info(self) -> ServerInfo:
        nc = await self._client()
        url = nc.connected_url
        return ServerInfo(
            # The raw "2.11.4"; nats-py's version object renders as "<nats server v2.11.4>".
            version=str((nc._server_info or {}).get("version", "")) if nc.is_connected else "",
            max_payload=nc.max_payload,
            server_name=str((nc._server_info or {}).get("server_name", "")),
            connected_url=redact_url(url.geturl()) if url else "",
        )

    async def max_payload(self) -> int:
        nc = await self._client()
        return int(nc.max_payload)

    async def round_trip(self) -> float:
        """Return the seconds one PING/PONG takes."""
        nc = await self._client()
        started = time.perf_counter()
        async with self._translated("ping"):
            await nc.flush(timeout=max(1, round(self.config.request_timeout)))
        return time.perf_counter() - started

    async def request(self, subject: str, data: bytes, *, what: str) -> bytes:
        """Send a request and return the reply's body; ``what`` names it in errors."""
        nc = await self._client()
        async with self._translated(what):
            reply = await nc.request(subject, data, timeout=self.config.request_timeout)
        return reply.data

    # -- publishing --------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> PubAck:
        """Publish to JetStream and wait for the stream's ack."""
        nc = await self._client()
        async with self._translated(f"publish to {subject}"):
            try:
                reply = await nc.request(
                    subject,
                    data,
                    timeout=timeout or self.config.request_timeout,
                    headers=dict(headers) if headers else None,
                )
            except nats.errors.NoRespondersError as exc:
                raise no_stream_for(subject) from exc
        return pub_ack(subject, reply.data)

    async def publish_many(
        self,
        items: Sequence[tuple[str, bytes, Mapping[str, str] | None]],
        *,
        max_in_flight: int = 256,
        timeout: float | None = None,
    ) -> list[PubAck | Exception]:
        """Publish many messages with up to ``max_in_flight`` acks outstanding.

        Each publish has its own timeout, so one unanswered ack cannot hang the batch; the
        result list matches ``items`` and holds an exception where that publish failed.
        """
        nc = await self._client()
        wait = timeout or self.config.request_timeout
        return await self._acks.publish_many(nc, items, max_in_flight=max_in_flight, wait=wait)

    async def publish_core(self, subject: str, data: bytes) -> None:
        """Publish a plain NATS message (no stream ack); used for replies and wake-ups."""
        nc = await self._client()
        async with self._translated(f"publish to {subject}"):
            await nc.publish(subject, data)

    # -- consuming ---------------------------------------------------------------------------

    async def fetch(self, stream: str, durable: str, batch: int, timeout: float) -> list[Delivery]:
        """Pull up to ``batch`` messages; wait at most ``timeout`` only when none are ready.

        Unlike nats-py's ``fetch``, this returns as soon as something is available instead of
        waiting for the batch to fill: first a ``no_wait`` pull for whatever is ready, then,
        if nothing was, a long pull for one message followed by a ``no_wait`` top-up.
        """
        nc = await self._client()
        channel = self._subscriptions.get((stream, durable))
        if channel is None:
            async with self._translated(f"subscribe for consumer {durable}"):
                channel = await PullChannel.open(nc, stream, durable)
            self._subscriptions[(stream, durable)] = channel
        async with self._translated(f"fetch from {durable}"):
            msgs = channel.leftovers(batch)
            if len(msgs) < batch:
                msgs += await channel.pull(batch - len(msgs), self.config.request_timeout)
            if not msgs:
                msgs = await channel.pull(1, timeout, wait=True)
                if msgs and batch > 1:
                    msgs += await channel.pull(batch - 1, self.config.request_timeout)
        if not msgs and not nc.is_connected:
            raise NatsUnavailable(f"fetch from {durable}: not connected to {self.urls_for_humans}")
        return [Delivery(self, msg) for msg in msgs]

    async def _reply_to(self, reply: str, body: bytes) -> None:
        nc = await self._client()
        async with self._translated("acknowledge"):
            await nc.publish(reply, body)

    async def flush(self) -> None:
        nc = await self._client()
        async with self._translated("flush"):
            await nc.flush(timeout=max(1, round(self.config.request_timeout)))

    # -- plain subscriptions (tests, DLQ tooling) --------------------------------------------

    async def subscribe(
        self, subject: str, callback: Callable[[str, bytes, dict[str, str]], Awaitable[None]]
    ) -> Any:
        nc = await self._client()

        async def handle(msg: NatsMsg) -> None:
            await callback(msg.subject, msg.data, dict(msg.headers or {}))

        async with self._translated(f"subscribe to {subject}"):
            return await nc.subscribe(subject, cb=handle)
