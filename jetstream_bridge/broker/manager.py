"""JetStream management over the JSON API (``$JS.API.*``): one method per API call.

The calls go to the JSON API directly, not through nats-py's JetStream manager, so that a
stream update can send back the server's complete config with only the subject list changed:
nats-py's dataclasses drop fields they do not know, which would silently reset them. Answers
come back as the typed views of ``jetstream_bridge.broker.types``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..core.errors import ConsumerNotFound, JetStreamApiError, StreamNotFound
from .errors import ERR_NO_MESSAGE_FOUND, api_error
from .types import AccountInfo, ConsumerInfo, StoredMessage, StreamInfo

if TYPE_CHECKING:
    from .client import Connection


class JetStreamManager:
    """Streams, consumers and stored messages of one connection (``conn.jsm``)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def api(self, endpoint: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call ``$JS.API.<endpoint>`` and return the raw JSON answer; raise on an API error."""
        data = json.dumps(body).encode() if body is not None else b""
        reply = await self._conn.request(
            f"$JS.API.{endpoint}", data, what=f"JetStream API {endpoint.split('.')[0]}"
        )
        answer: dict[str, Any] = json.loads(reply)
        if "error" in answer:
            raise api_error(answer["error"])
        return answer

    async def account_info(self) -> AccountInfo:
        """Return this account's JetStream usage; raise when JetStream is not available."""
        return AccountInfo.from_response(await self.api("INFO"))

    # -- streams ------------------------------------------------------------------------------

    async def stream_info(
        self, stream: str, *, subjects_filter: str | None = None
    ) -> StreamInfo | None:
        """Return the stream's info, or ``None`` when absent.

        With ``subjects_filter`` the state also holds ``subjects``: the message count of each
        stored subject that the filter matches.
        """
        body = {"subjects_filter": subjects_filter} if subjects_filter else None
        try:
            return StreamInfo.from_response(await self.api(f"STREAM.INFO.{stream}", body))
        except StreamNotFound:
            return None

    async def create_stream(self, config: Mapping[str, Any]) -> StreamInfo:
        return StreamInfo.from_response(await self.api(f"STREAM.CREATE.{config['name']}", config))

    async def update_stream(self, config: Mapping[str, Any]) -> StreamInfo:
        """Replace the stream's config with ``config`` (send the server's full config back)."""
        return StreamInfo.from_response(await self.api(f"STREAM.UPDATE.{config['name']}", config))

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

    # -- consumers ----------------------------------------------------------------------------

    async def consumer_info(self, stream: str, durable: str) -> ConsumerInfo | None:
        """Return the durable's info, or ``None`` when absent."""
        try:
            return ConsumerInfo.from_response(await self.api(f"CONSUMER.INFO.{stream}.{durable}"))
        except ConsumerNotFound:
            return None

    async def create_consumer(
        self, stream: str, config: Mapping[str, Any], *, action: str = ""
    ) -> ConsumerInfo:
        """Create (``action="create"``), update (``"update"``) or upsert (``""``) a durable."""
        body: dict[str, Any] = {"stream_name": stream, "config": dict(config)}
        if action:
            body["action"] = action
        name = config["durable_name"]
        return ConsumerInfo.from_response(await self.api(f"CONSUMER.CREATE.{stream}.{name}", body))

    async def delete_consumer(self, stream: str, durable: str) -> None:
        await self.api(f"CONSUMER.DELETE.{stream}.{durable}")

    async def consumer_names(self, stream: str) -> list[str]:
        answer = await self.api(f"CONSUMER.NAMES.{stream}", {"offset": 0})
        return list(answer.get("consumers") or [])

    # -- stored messages ----------------------------------------------------------------------

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        """Read one stored message by stream sequence, or ``None`` when it is gone."""
        return await self._message(stream, {"seq": seq})

    async def next_message(self, stream: str, seq: int, subject: str) -> StoredMessage | None:
        """Read the first message at or after ``seq`` on ``subject``, or ``None``."""
        return await self._message(stream, {"seq": seq, "next_by_subj": subject})

    async def delete_message(self, stream: str, seq: int) -> None:
        await self.api(f"STREAM.MSG.DELETE.{stream}", {"seq": seq, "no_erase": True})

    async def _message(self, stream: str, body: Mapping[str, Any]) -> StoredMessage | None:
        try:
            answer = await self.api(f"STREAM.MSG.GET.{stream}", body)
        except JetStreamApiError as exc:
            if exc.err_code == ERR_NO_MESSAGE_FOUND:
                return None
            raise
        return StoredMessage.from_response(answer["message"])
