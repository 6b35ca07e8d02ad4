"""The one module that talks to nats-py.

Everything else in the bridge speaks to NATS through ``Connection`` and sees only our own
exceptions (``jetstream_bridge.core.errors``) and plain data. JetStream management calls go to
the JSON API directly (``$JS.API.*``) so a stream update can send back the server's complete
config with only the subject list changed: nats-py's dataclasses drop fields they do not know,
which would silently reset them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg

from .core.config import BridgeConfig, redact_url
from .core.errors import (
    AuthenticationFailed,
    ConsumerNotFound,
    JetStreamApiError,
    JetStreamBridgeError,
    NatsError,
    NatsUnavailable,
    PublishFailed,
    StreamNotFound,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
ERR_NO_MESSAGE_FOUND = 10037

_CREDENTIALS_IN_TEXT = re.compile(r"(\w+://)[^/@\s]+@")


def scrub(text: str) -> str:
    """Remove credentials that an underlying error message may have copied from a URL."""
    return _CREDENTIALS_IN_TEXT.sub(r"\1***@", text)


@dataclass(frozen=True)
class PubAck:
    """The stream's answer to a publish."""

    stream: str
    seq: int
    duplicate: bool


@dataclass(frozen=True)
class ServerInfo:
    version: str
    max_payload: int
    server_name: str
    connected_url: str


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
        self._conn: Connection | None = conn
        self._reply_subject: str = msg.reply
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] = dict(msg.headers or {})
        self.stream: str = meta.stream
        self.consumer: str = meta.consumer
        self.stream_seq: int = meta.sequence.stream
        self.deliveries: int = meta.num_delivered
        self.pending: int = meta.num_pending

    @classmethod
    def stored(
        cls,
        *,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        stream: str,
        consumer: str,
        stream_seq: int,
        deliveries: int,
    ) -> Delivery:
        """A delivery rebuilt from a stored inbox row (the admin's re-run).

        No message is in hand, so there is nothing to settle: the ack verbs raise.
        """
        delivery = cls.__new__(cls)
        delivery._conn = None
        delivery._reply_subject = ""
        delivery.subject = subject
        delivery.data = data
        delivery.headers = headers
        delivery.stream = stream
        delivery.consumer = consumer
        delivery.stream_seq = stream_seq
        delivery.deliveries = deliveries
        delivery.pending = 0
        return delivery

    async def _settle(self, body: bytes) -> None:
        if self._conn is None:
            raise RuntimeError("a stored delivery has no message to settle")
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


@dataclass(frozen=True)
class StoredMessage:
    """A message read back from a stream by sequence."""

    subject: str
    seq: int
    data: bytes
    headers: dict[str, str]
    time: str


def _tls_context(config: BridgeConfig) -> ssl.SSLContext | None:
    if not (config.tls_ca_file or config.tls_cert_file):
        return None
    # A missing, unreadable or mismatched file would otherwise escape ``connect()`` as a bare
    # OSError/ssl.SSLError, outside our exception tree; name the setting to fix instead.
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls_ca_file)
    except (OSError, ValueError) as exc:
        raise AuthenticationFailed(
            f"cannot load TLS_CA_FILE {config.tls_ca_file!r}: {exc}"
        ) from exc
    if config.tls_cert_file and config.tls_key_file:
        try:
            # An encrypted key must fail, not make OpenSSL prompt on the terminal (a hang).
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file, password=b"")
        except (OSError, ValueError) as exc:
            raise AuthenticationFailed(
                f"cannot load TLS_CERT_FILE {config.tls_cert_file!r} with TLS_KEY_FILE "
                f"{config.tls_key_file!r}: {exc} (the key must be unencrypted PEM and match "
                "the certificate)"
            ) from exc
    return context


def _auth_options(config: BridgeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if config.user and config.password:
        options["user"] = config.user
        options["password"] = config.password.reveal()
    if config.token:
        options["token"] = config.token.reveal()
    if config.nkey_seed:
        # nats-py only decodes the seed mid-connect, and a bad one then surfaces as "could not
        # connect ... is the server running?". Check it here; ``from None`` keeps the decoder's
        # own exceptions (which could quote the input) out of every traceback.
        try:
            import nkeys

            nkeys.from_seed(bytearray(config.nkey_seed.reveal().strip().encode())).wipe()
        except ImportError:
            raise AuthenticationFailed(
                "NKEY_SEED needs the nkeys package: pip install nkeys"
            ) from None
        except Exception:
            raise AuthenticationFailed(
                "NKEY_SEED in JETSTREAM_BRIDGE is not a valid nkey seed (a user seed starts "
                "with 'SU')."
            ) from None
        options["nkeys_seed_str"] = config.nkey_seed.reveal()
    if config.creds_file:
        # nats-py reads the file on every (re)connect; an unreadable one would look like an
        # unreachable server until CONNECT_TIMEOUT. Fail at once, naming the setting.
        try:
            with open(config.creds_file, "rb"):
                pass
        except OSError as exc:
            raise AuthenticationFailed(
                f"cannot read CREDS_FILE {config.creds_file!r}: {exc.strerror or exc}"
            ) from None
        options["user_credentials"] = config.creds_file
    tls = _tls_context(config)
    if tls is not None:
        options["tls"] = tls
    return options


def _api_error(error: Mapping[str, Any]) -> JetStreamApiError:
    err_code = int(error.get("err_code") or 0)
    kind: type[JetStreamApiError] = JetStreamApiError
    if err_code == ERR_STREAM_NOT_FOUND:
        kind = StreamNotFound
    elif err_code == ERR_CONSUMER_NOT_FOUND:
        kind = ConsumerNotFound
    return kind(
        str(error.get("description", "unknown error")),
        code=int(error.get("code") or 0),
        err_code=err_code,
    )


class _PullChannel:
    """One inbox subscription that receives the messages pulled for one durable consumer."""

    def __init__(self, nc: NatsClient, stream: str, durable: str) -> None:
        self.nc = nc
        self.durable = durable
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self.queue: asyncio.Queue[NatsMsg] = asyncio.Queue()

    @classmethod
    async def open(cls, nc: NatsClient, stream: str, durable: str) -> _PullChannel:
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


def _pub_ack(subject: str, data: bytes, headers: Mapping[str, str] | None = None) -> PubAck:
    """Turn the stream's answer to a publish into a ``PubAck``; raise ``PublishFailed``."""
    if not data and (headers or {}).get("Status") == "503":
        raise PublishFailed(
            f"no stream captures subject {subject!r}; run `manage.py jetstream_ensure_topology`"
        )
    answer = json.loads(data)
    if "error" in answer:
        error = _api_error(answer["error"])
        raise PublishFailed(f"publish to {subject} rejected: {error}") from error
    return PubAck(
        stream=answer["stream"],
        seq=int(answer["seq"]),
        duplicate=bool(answer.get("duplicate", False)),
    )


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


class Connection:
    """One NATS connection with the JetStream operations the bridge needs.

    It is bound to the event loop it connected on; sync code reaches it through
    ``jetstream_bridge.runtime``.
    """

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self._nc: NatsClient | None = None
        self._connect_lock = asyncio.Lock()
        self._last_error: BaseException | None = None
        self._subscriptions: dict[tuple[str, str], _PullChannel] = {}
        self._closing = False
        self._failure: NatsError | None = None
        self._retry_after = 0.0
        # publish_many's acks: one wildcard inbox per client, futures keyed by a counter.
        self._acks: dict[str, asyncio.Future[NatsMsg]] = {}
        self._ack_client: NatsClient | None = None
        self._ack_prefix = ""
        self._ack_seq = 0

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

    async def connect(self) -> None:
        """Connect once; fail within ``CONNECT_TIMEOUT`` with an error naming the server.

        After the first success the client reconnects forever on its own: a restarted server
        or a cluster failover must not need a process restart.
        """
        async with self._connect_lock:
            if self._nc is not None and not self._nc.is_closed:
                return
            if self._failure is not None and time.monotonic() < self._retry_after:
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
            # During the first connect nats-py reports the server's "-ERR 'Authorization
            # Violation'" as a plain nats.errors.Error, not AuthorizationError, and then retries
            # forever: without the text check, wrong credentials looked like a dead server.
            refused_login = isinstance(exc, nats.errors.Error) and any(
                marker in str(exc).lower()
                for marker in (
                    "authorization violation",
                    "authentication expired",
                    "authentication revoked",
                )
            )
            if refused_login or isinstance(exc, (nats.errors.AuthorizationError, ssl.SSLError)):
                auth_failed.set()
            logger.warning(
                "nats error: %s",
                scrub(str(exc) or type(exc).__name__),
                extra={"servers": self.urls_for_humans},
            )

        async def on_disconnected() -> None:
            if self._closing:
                return
            logger.warning("nats disconnected", extra={"servers": self.urls_for_humans})

        async def on_reconnected() -> None:
            logger.info("nats reconnected", extra={"servers": self.urls_for_humans})

        nc = NatsClient()
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
                **_auth_options(config),
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
        cause = cause or self._last_error
        reason = scrub(str(cause) or type(cause).__name__) if cause else "no answer"
        if auth_failed.is_set():
            raise AuthenticationFailed(
                f"NATS at {self.urls_for_humans} refused the connection: {reason}. Check USER/"
                "PASSWORD, TOKEN, NKEY_SEED, CREDS_FILE or the TLS files in JETSTREAM_BRIDGE."
            ) from None
        raise NatsUnavailable(
            f"could not connect to NATS at {self.urls_for_humans} within "
            f"{config.connect_timeout:g}s ({reason}). Is the server running and NATS_URLS right?"
        ) from None

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

    @asynccontextmanager
    async def _translated(self, what: str) -> Any:
        try:
            yield
        except (JetStreamApiError, NatsError):
            raise
        except Exception as exc:
            translated = self._translate(exc, what)
            if translated is None:
                raise
            raise translated from exc

    def _translate(self, exc: BaseException, what: str) -> JetStreamBridgeError | None:
        """Our error for a nats-py (or socket) error; None for anything else."""
        if isinstance(exc, nats.errors.NoRespondersError):
            return NatsError(
                f"{what}: no responders; is JetStream enabled on {self.urls_for_humans}?"
            )
        if isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError)):
            return NatsUnavailable(f"{what}: timed out talking to {self.urls_for_humans}")
        if isinstance(exc, nats.errors.AuthorizationError):
            return AuthenticationFailed(f"{what}: authorization violation")
        if isinstance(
            exc,
            (
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.StaleConnectionError,
                nats.errors.OutboundBufferLimitError,
                OSError,
            ),
        ):
            return NatsUnavailable(
                f"{what}: connection to {self.urls_for_humans} unavailable ({type(exc).__name__})"
            )
        if isinstance(exc, nats.errors.MaxPayloadError):
            return PublishFailed(f"{what}: message larger than the server's max payload")
        if isinstance(exc, nats.errors.Error):
            return NatsError(f"{what}: {scrub(str(exc))}")
        return None

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

    # -- JetStream API -----------------------------------------------------------------------

    async def api(self, endpoint: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call ``$JS.API.<endpoint>`` and return the JSON answer; raise on an API error."""
        nc = await self._client()
        data = json.dumps(body).encode() if body is not None else b""
        async with self._translated(f"JetStream API {endpoint.split('.')[0]}"):
            reply = await nc.request(
                f"$JS.API.{endpoint}", data, timeout=self.config.request_timeout
            )
        answer: dict[str, Any] = json.loads(reply.data)
        if "error" in answer:
            raise _api_error(answer["error"])
        return answer

    async def stream_info(
        self, stream: str, *, subjects_filter: str | None = None
    ) -> dict[str, Any] | None:
        """Return the stream's info (``config`` and ``state``), or ``None`` when absent.

        With ``subjects_filter`` the state also holds ``subjects``: the message count of each
        stored subject that the filter matches.
        """
        body = {"subjects_filter": subjects_filter} if subjects_filter else None
        try:
            return await self.api(f"STREAM.INFO.{stream}", body)
        except StreamNotFound:
            return None

    async def create_stream(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return await self.api(f"STREAM.CREATE.{config['name']}", config)

    async def update_stream(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return await self.api(f"STREAM.UPDATE.{config['name']}", config)

    async def delete_stream(self, stream: str) -> None:
        await self.api(f"STREAM.DELETE.{stream}")

    async def purge_stream(
        self, stream: str, subject: str | None = None, *, before_seq: int | None = None
    ) -> int:
        """Purge the stream (only ``subject`` with it; only sequences below ``before_seq``)."""
        body: dict[str, Any] = {}
        if subject:
            body["filter"] = subject
        if before_seq is not None:
            body["seq"] = before_seq
        answer = await self.api(f"STREAM.PURGE.{stream}", body or None)
        return int(answer.get("purged", 0))

    async def stream_names(self, subject: str | None = None) -> list[str]:
        """Return the names of all streams, or of those whose subjects collide with ``subject``.

        The server answers the subject question itself, so this never trusts a stale cache.
        """
        names: list[str] = []
        offset = 0
        while True:
            body: dict[str, Any] = {"offset": offset}
            if subject:
                body["subject"] = subject
            answer = await self.api("STREAM.NAMES", body)
            page = answer.get("streams") or []
            names.extend(page)
            offset += len(page)
            if not page or offset >= int(answer.get("total", 0)):
                return names

    async def consumer_info(self, stream: str, durable: str) -> dict[str, Any] | None:
        try:
            return await self.api(f"CONSUMER.INFO.{stream}.{durable}")
        except ConsumerNotFound:
            return None

    async def create_consumer(
        self, stream: str, config: Mapping[str, Any], *, action: str = ""
    ) -> dict[str, Any]:
        """Create (``action="create"``), update (``"update"``) or upsert (``""``) a durable."""
        body: dict[str, Any] = {"stream_name": stream, "config": dict(config)}
        if action:
            body["action"] = action
        name = config["durable_name"]
        return await self.api(f"CONSUMER.CREATE.{stream}.{name}", body)

    async def delete_consumer(self, stream: str, durable: str) -> None:
        await self.api(f"CONSUMER.DELETE.{stream}.{durable}")

    async def consumer_names(self, stream: str) -> list[str]:
        answer = await self.api(f"CONSUMER.NAMES.{stream}", {"offset": 0})
        return list(answer.get("consumers") or [])

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        """Read one stored message by stream sequence, or ``None`` when it is gone."""
        try:
            answer = await self.api(f"STREAM.MSG.GET.{stream}", {"seq": seq})
        except JetStreamApiError as exc:
            if exc.err_code == ERR_NO_MESSAGE_FOUND:
                return None
            raise
        return self._stored(answer["message"])

    async def next_message(self, stream: str, seq: int, subject: str) -> StoredMessage | None:
        """Read the first message at or after ``seq`` on ``subject``, or ``None``."""
        try:
            answer = await self.api(
                f"STREAM.MSG.GET.{stream}", {"seq": seq, "next_by_subj": subject}
            )
        except JetStreamApiError as exc:
            if exc.err_code == ERR_NO_MESSAGE_FOUND:
                return None
            raise
        return self._stored(answer["message"])

    async def delete_message(self, stream: str, seq: int) -> None:
        await self.api(f"STREAM.MSG.DELETE.{stream}", {"seq": seq, "no_erase": True})

    @staticmethod
    def _stored(message: Mapping[str, Any]) -> StoredMessage:
        import base64

        headers: dict[str, str] = {}
        raw_headers = message.get("hdrs")
        if raw_headers:
            lines = base64.b64decode(raw_headers).decode("utf-8", "replace").split("\r\n")
            for line in lines[1:]:
                if ":" in line:
                    key, _, value = line.partition(":")
                    headers[key.strip()] = value.strip()
        return StoredMessage(
            subject=message["subject"],
            seq=int(message["seq"]),
            data=base64.b64decode(message.get("data") or b""),
            headers=headers,
            time=str(message.get("time", "")),
        )

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
                raise PublishFailed(
                    f"no stream captures subject {subject!r}; run "
                    "`manage.py jetstream_ensure_topology`"
                ) from exc
        return _pub_ack(subject, reply.data)

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
        # Acks come back on one wildcard inbox, matched by a counter. A gather of publish()
        # calls cost a task, a semaphore wait, a timer and a NUID per message: more CPU than
        # the publish itself, which held the relay to ~0.4x of nats-py's publish_async
        # (benchmarks/). Here a message costs one future, and the oldest one is awaited only
        # when the window is full.
        nc = await self._client()
        prefix = await self._ack_inbox(nc)
        loop = asyncio.get_running_loop()
        wait = timeout or self.config.request_timeout
        results: list[PubAck | Exception | None] = [None] * len(items)
        window: deque[tuple[int, str, str, asyncio.Future[NatsMsg], float]] = deque()

        async def settle_oldest() -> None:
            index, subject, token, future, deadline = window.popleft()
            if not future.done():
                await asyncio.wait((future,), timeout=max(0.0, deadline - loop.time()))
            self._acks.pop(token, None)
            if future.done():
                msg = future.result()
                try:
                    results[index] = _pub_ack(subject, msg.data, msg.headers)
                except (PublishFailed, NatsError) as exc:
                    results[index] = exc
            else:
                future.cancel()
                results[index] = NatsUnavailable(
                    f"publish to {subject}: timed out talking to {self.urls_for_humans}"
                )

        for index, (subject, data, headers) in enumerate(items):
            while len(window) >= max_in_flight:
                await settle_oldest()
            self._ack_seq += 1
            token = str(self._ack_seq)
            future: asyncio.Future[NatsMsg] = loop.create_future()
            self._acks[token] = future
            try:
                # No `async with self._translated()` here: an async context manager per message
                # was a measurable share of a relay's CPU; errors are translated only when
                # they happen.
                await nc.publish(
                    subject, data, reply=prefix + token, headers=dict(headers) if headers else None
                )
            except Exception as exc:
                translated = self._translate(exc, f"publish to {subject}")
                if translated is None:
                    raise
                self._acks.pop(token, None)
                results[index] = translated
                continue
            window.append((index, subject, token, future, loop.time() + wait))
        while window:
            await settle_oldest()
        return cast("list[PubAck | Exception]", results)  # settle_oldest() filled every slot

    async def _ack_inbox(self, nc: NatsClient) -> str:
        """Return the reply prefix whose wildcard subscription resolves ``self._acks``."""
        if self._ack_client is not nc:
            prefix = nc.new_inbox() + "."
            acks = self._acks

            async def on_ack(msg: NatsMsg) -> None:
                future = acks.pop(msg.subject[len(prefix) :], None)
                if future is not None and not future.done():
                    future.set_result(msg)

            async with self._translated("subscribe for publish acks"):
                await nc.subscribe(prefix + "*", cb=on_ack)
            self._ack_client, self._ack_prefix = nc, prefix
        return self._ack_prefix

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
                channel = await _PullChannel.open(nc, stream, durable)
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


__all__ = ["Connection", "Delivery", "PubAck", "ServerInfo", "StoredMessage", "scrub"]
