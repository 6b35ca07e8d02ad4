"""Paging through the dead letters for a screen: one page at a time, never the whole DLQ.

``dlq.list_dead_letters`` reads from the first letter until it has ``limit`` matches, which
suits a command. A page in the admin starts where the previous one stopped (``after``) and
reads at most ``scan_limit`` letters, so that a filter matching few of many letters still
answers within a request; the page then says where to go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from .broker import Connection
from .conf import get_config
from .core import dead_letter as core_dlq
from .core.settings import BridgeConfig
from .dlq import DeadLetterMessage, Depth, Selection, depth_async
from .runtime import get_runtime


@dataclass(frozen=True)
class Page:
    """One page of dead letters, oldest first.

    ``next_after`` is the sequence to pass as ``after`` for the next page, or ``None`` when
    the page reached the end of the DLQ.
    """

    depth: Depth
    messages: list[DeadLetterMessage]
    next_after: int | None = None


async def page_async(
    conn: Connection,
    config: BridgeConfig,
    selection: Selection | None = None,
    *,
    after: int = 0,
    limit: int = 50,
    scan_limit: int = 1000,
) -> Page:
    """Return up to ``limit`` selected dead letters stored after sequence ``after``.

    At most ``scan_limit`` letters are read, matching or not: the page may then hold fewer
    than ``limit`` and ``next_after`` says where the next one starts.
    """
    selection = selection or Selection()
    depth = await depth_async(conn, config)
    if depth.stream is None or depth.messages == 0:
        return Page(depth, [])
    now = datetime.now(timezone.utc)
    key = core_dlq.signing_key(config.dlq_signing_key)
    found: list[DeadLetterMessage] = []
    seq = max(after, 0) + 1
    for _ in range(max(scan_limit, 1)):
        # Letters stored after the depth was read belong to a later page load.
        stored = await conn.jsm.next_message(depth.stream, seq, depth.subject)
        if stored is None or stored.seq > depth.last_seq:
            return Page(depth, found)
        message = DeadLetterMessage.from_stored(depth.stream, stored, key)
        if selection.matches(message, now):
            if len(found) == limit:  # one more matches: there is a next page
                return Page(depth, found, found[-1].seq)
            found.append(message)
        if stored.seq >= depth.last_seq:
            return Page(depth, found)
        seq = stored.seq + 1
    return Page(depth, found, seq - 1)


def page(
    selection: Selection | None = None,
    *,
    after: int = 0,
    limit: int = 50,
    scan_limit: int = 1000,
) -> Page:
    """Return one page of dead letters (``page_async`` on the shared connection)."""
    config = get_config()
    return get_runtime().call(
        lambda conn: page_async(
            conn, config, selection, after=after, limit=limit, scan_limit=scan_limit
        )
    )
