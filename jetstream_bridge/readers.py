"""This app's durable consumers, as the server shows them.

The durables are discovered, never derived from a naming convention: a durable is ours when
its filter subject(s) meet one of our subscribe subjects (one per peer), on any stream that
captures one of them; a durable without a filter on such a stream reads our subjects too. The
consumer may use one durable for every peer (several filter subjects) or one per peer; both
are found. Health, metrics, the admin status page and the DLQ tool read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .broker import Connection, ConsumerInfo
from .core.settings import BridgeConfig
from .core.subjects import collide


@dataclass(frozen=True)
class Reader:
    """A durable consumer reading at least one of this app's subscribe subjects."""

    stream: str
    durable: str
    info: ConsumerInfo

    @property
    def filters(self) -> tuple[str, ...]:
        return self.info.config.filters


def subscribe_subjects(config: BridgeConfig) -> list[str]:
    """What every peer sends us, in settings order."""
    return list(dict.fromkeys(peer.subscribe for peer in config.peer_subjects))


def reads_ours(info: ConsumerInfo, subjects: list[str]) -> bool:
    """Tell whether the durable ``info`` reads any of ``subjects`` (no filter reads all)."""
    filters = info.config.filters
    return not filters or any(collide(f, subject) for f in filters for subject in subjects)


async def consumer_streams(conn: Connection, config: BridgeConfig) -> list[str]:
    """The streams capturing any of our subscribe subjects, ours first."""
    names: dict[str, None] = {}
    for subject in subscribe_subjects(config):
        for name in await conn.jsm.stream_names(subject=subject):
            names[name] = None
    return sorted(names, key=lambda name: (name != config.stream_name, name))


async def find_readers(conn: Connection, config: BridgeConfig) -> list[Reader]:
    """Every durable consumer reading one of our subscribe subjects, by stream and name."""
    subjects = subscribe_subjects(config)
    found: list[Reader] = []
    for stream in await consumer_streams(conn, config):
        for name in sorted(await conn.jsm.consumer_names(stream)):
            info = await conn.jsm.consumer_info(stream, name)
            if info is None or not info.config.durable_name:
                continue
            if reads_ours(info, subjects):
                found.append(Reader(stream, name, info))
    return found


async def find_durable(
    conn: Connection, config: BridgeConfig, durable: str
) -> tuple[str | None, ConsumerInfo | None]:
    """Return the stream holding ``durable`` among our consumer streams, and its info.

    When no such stream has it: the first stream capturing our subjects (or None) and None.
    """
    streams = await consumer_streams(conn, config)
    for stream in streams:
        info = await conn.jsm.consumer_info(stream, durable)
        if info is not None:
            return stream, info
    return (streams[0] if streams else None), None
