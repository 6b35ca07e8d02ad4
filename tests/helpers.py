"""Small helpers shared by the integration tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from jetstream_bridge.connection import Connection
from jetstream_bridge.runtime import get_runtime

T = TypeVar("T")


def nats(job: Callable[[Connection], Awaitable[T]]) -> T:
    """Run ``job(connection)`` on the bridge's shared connection."""
    return get_runtime().call(job, timeout=30)


def stream_subjects(name: str) -> list[str]:
    info = nats(lambda c: c.stream_info(name))
    assert info is not None, f"stream {name} does not exist"
    return list(info["config"]["subjects"])


def stream_messages(name: str) -> list[Any]:
    """Every message stored in stream ``name``, in order."""

    async def read(conn: Connection) -> list[Any]:
        info = await conn.stream_info(name)
        assert info is not None
        if info["state"]["messages"] == 0:
            return []
        first, last = info["state"]["first_seq"], info["state"]["last_seq"]
        messages = []
        for seq in range(first, last + 1):
            message = await conn.get_message(name, seq)
            if message is not None:
                messages.append(message)
        return messages

    return nats(read)


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
