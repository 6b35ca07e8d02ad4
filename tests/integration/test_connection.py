"""The connection layer against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import pytest

from jetstream_bridge.broker import Connection
from jetstream_bridge.core.errors import NatsUnavailable, PublishFailed
from jetstream_bridge.core.settings import parse_config
from jetstream_bridge.runtime import get_runtime


def make_config(url: str, **extra: Any):  # type: ignore[no-untyped-def]
    config, problems = parse_config(
        {"DESTINATION_APP": "b", "NATS_URLS": [url], "CONNECT_TIMEOUT": "3s", **extra}
    )
    assert config is not None, problems
    return config


async def _with_stream(conn: Connection, name: str, subject: str) -> None:
    await conn.jsm.create_stream({"name": name, "subjects": [subject], "storage": "memory"})


def test_connection__publishes_and_reads_back(nats_server: Any) -> None:
    async def scenario() -> None:
        conn = Connection(make_config(nats_server.url))
        try:
            await _with_stream(conn, "RT", "rt.>")
            ack = await conn.publish("rt.one", b'{"a":1}', {"Nats-Msg-Id": "m-1"})
            again = await conn.publish("rt.one", b'{"a":1}', {"Nats-Msg-Id": "m-1"})
            stored = await conn.jsm.get_message("RT", ack.seq)
            info = await conn.jsm.stream_info("RT")
        finally:
            await conn.jsm.delete_stream("RT")
            await conn.close()
        assert (ack.stream, ack.seq, ack.duplicate) == ("RT", 1, False)
        assert again.duplicate is True  # the server deduplicated on Nats-Msg-Id
        assert stored is not None
        assert stored.data == b'{"a":1}'
        assert stored.headers["Nats-Msg-Id"] == "m-1"
        assert info is not None
        assert info.state.messages == 1

    asyncio.run(scenario())


def test_connection__publish_without_a_stream_says_to_ensure_topology(nats_server: Any) -> None:
    async def scenario() -> None:
        conn = Connection(make_config(nats_server.url))
        try:
            with pytest.raises(PublishFailed, match="jetstream_ensure_topology"):
                await conn.publish("nobody.listens.here", b"{}")
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_connection__publish_many_reports_each_result_in_its_own_slot(nats_server: Any) -> None:
    async def ignore(subject: str, data: bytes, headers: dict[str, str]) -> None:
        pass

    async def scenario() -> list[Any]:
        conn = Connection(make_config(nats_server.url))
        stream = {"name": "PM", "subjects": ["pm.>"], "storage": "memory", "max_msgs": 5}
        try:
            await conn.jsm.create_stream({**stream, "discard": "new"})
            await conn.subscribe("silent.answer", ignore)  # receives, never replies
            items: list[tuple[str, bytes, dict[str, str] | None]] = [
                (f"pm.{i}", b"{}", {"Nats-Msg-Id": f"m-{i}"}) for i in range(4)
            ]
            items += [
                ("pm.0", b"{}", {"Nats-Msg-Id": "m-0"}),  # a duplicate
                ("nobody.listens.here", b"{}", None),  # no stream captures it
                ("silent.answer", b"{}", None),  # no ack ever comes
                ("pm.5", b"{}", None),  # the fifth message fills the stream
                ("pm.6", b"{}", None),  # refused: the stream discards new messages
            ]
            return await conn.publish_many(items, max_in_flight=2, timeout=0.5)
        finally:
            await conn.jsm.delete_stream("PM")
            await conn.close()

    results = asyncio.run(scenario())
    acks = [(r.seq, r.duplicate) for r in results[:5]]
    assert acks == [(1, False), (2, False), (3, False), (4, False), (1, True)]
    assert isinstance(results[5], PublishFailed)
    assert "jetstream_ensure_topology" in str(results[5])
    assert isinstance(results[6], NatsUnavailable)
    assert "timed out" in str(results[6])
    assert results[7].seq == 5
    assert isinstance(results[8], PublishFailed)
    assert "rejected" in str(results[8])


def test_connection__unreachable_url_fails_fast_and_redacts_the_password() -> None:
    async def scenario() -> None:
        conn = Connection(make_config("nats://user:secret@127.0.0.1:1"))
        started = time.monotonic()
        with pytest.raises(NatsUnavailable) as info:
            await conn.connect()
        elapsed = time.monotonic() - started
        message = str(info.value)
        assert elapsed < 5
        assert "127.0.0.1:1" in message
        assert "secret" not in message
        assert "user:***@" in message

    asyncio.run(scenario())


def test_runtime__sync_callers_share_one_connection(
    nats_server: Any, jetstream_bridge: Any
) -> None:
    runtime = get_runtime()

    async def create(conn: Connection) -> None:
        await _with_stream(conn, "SHARED", "shared.>")

    runtime.call(create)
    first = runtime.call(lambda conn: asyncio.sleep(0, conn))
    second = runtime.call(lambda conn: asyncio.sleep(0, conn))
    assert first is second
    ack = runtime.call(lambda conn: conn.publish("shared.x", b"1"))
    assert ack.seq == 1

    async def from_another_loop() -> Any:
        return await runtime.run(lambda conn: conn.publish("shared.x", b"2"))

    assert asyncio.run(from_another_loop()).seq == 2
    runtime.call(lambda conn: conn.jsm.delete_stream("SHARED"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_runtime__publish_from_a_forked_child_works(
    nats_server: Any, jetstream_bridge: Any
) -> None:
    runtime = get_runtime()
    runtime.call(lambda conn: _with_stream(conn, "FORK", "fork.>"))
    runtime.call(lambda conn: conn.publish("fork.parent", b"parent"))  # parent is connected
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            child_runtime = get_runtime()
            ack = child_runtime.call(lambda conn: conn.publish("fork.child", b"child"), timeout=10)
            os.write(write, json.dumps({"seq": ack.seq}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = json.loads(os.read(read, 1000) or b"{}")
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == {"seq": 2}
    # The parent's connection still works after the child used its own.
    assert runtime.call(lambda conn: conn.publish("fork.parent", b"again")).seq == 3
    runtime.call(lambda conn: conn.jsm.delete_stream("FORK"))
