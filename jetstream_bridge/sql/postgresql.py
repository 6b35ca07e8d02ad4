"""The PostgreSQL-only statements: the outbox's NOTIFY/LISTEN, a relay transaction's settings,
marking a batch sent with two array parameters, and the inbox's lookup of seen messages.

Each function takes the Django connection or alias (or, for LISTEN, a psycopg connection of its
own) and runs one statement; the callers decide when (``outbox.OutboxStore``, ``relay``,
``inbox.Inbox``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections, models

from . import array_literal, quoted_column

# The channel the publisher notifies (without the fast path) and an idle relay listens on.
NOTIFY_CHANNEL = "jetstream_bridge_outbox"


def notify_outbox(connection: Any, payload: str = "") -> None:
    """``pg_notify`` the outbox channel; delivered at commit, dropped on rollback."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [NOTIFY_CHANNEL, payload])


def listen_outbox(raw_connection: Any) -> None:
    """``LISTEN`` on the outbox channel (an autocommit psycopg connection of the relay's own)."""
    raw_connection.execute(f"LISTEN {NOTIFY_CHANNEL}")


def relay_transaction_settings(connection: Any, idle_limit_ms: int) -> None:
    """Bound how long a relay's transaction may sit idle, and skip its WAL flush at commit.

    ``idle_in_transaction_session_timeout``: a relay that stalls while publishing (a stopped
    process, a hung network) must not hold its row locks forever; PostgreSQL ends the session
    after ``idle_limit_ms``, which releases them, and another relay sends the rows.

    ``synchronous_commit = off``: should PostgreSQL crash right after the commit, the rows it
    recorded as sent are pending again and published once more, which the stream drops as
    duplicates (``Nats-Msg-Id``) and an inbox would too. Only in a transaction of the relay's
    own (``savepoint_ids`` is empty in the outermost atomic block only): a caller's writes
    keep their durability.
    """
    sql = "SELECT set_config('idle_in_transaction_session_timeout', %s, true)"
    if not connection.savepoint_ids:
        sql += ", set_config('synchronous_commit', 'off', true)"
    with connection.cursor() as cursor:
        cursor.execute(sql, [str(idle_limit_ms)])


@dataclass(frozen=True)
class SentUpdate:
    """What marking rows sent writes, and which rows it may touch."""

    pairs: Sequence[tuple[Any, int | None]]  # (key, stream sequence or None)
    values: dict[str, Any]  # field -> value set on every row (None writes NULL)
    seq_field: str | None  # the field taking each row's stream sequence, if any
    increment: str | None  # a counter to add one to (attempts, counted at recording)
    fence: tuple[str, str, Any] | None  # (field, "=" or "<>", value) a row must match


def mark_sent(model: type[models.Model], alias: str, update: SentUpdate) -> int:
    """Mark rows sent as one statement joining two arrays (keys, stream sequences).

    The ORM's ``pk IN (...)`` plus a ``CASE`` per row sent ~1,500 parameters per 500-row
    batch, and psycopg parsed that query text anew each time: recording took a third of a
    relay's time (docs/benchmarks.md). Two array parameters keep the query text constant.
    """
    connection = connections[alias]

    def column(name: str) -> str:
        return quoted_column(model, alias, name)

    sets, params = [], []
    for name, value in update.values.items():
        if value is None:
            sets.append(f"{column(name)} = NULL")
        else:
            sets.append(f"{column(name)} = %s")
            params.append(value)
    if update.seq_field:
        seq = column(update.seq_field)
        sets.append(f"{seq} = COALESCE(v.seq, t.{seq})")
    if update.increment:
        counter = column(update.increment)
        sets.append(f"{counter} = t.{counter} + 1")
    where, fence_params = "TRUE", []
    if update.fence is not None:
        name, operator, value = update.fence
        if operator not in ("=", "<>"):
            raise ValueError(f"unsupported fence operator {operator!r}")
        where, fence_params = f"t.{column(name)} {operator} %s", [value]
    pk_type = model._meta.pk.rel_db_type(connection)
    table = connection.ops.quote_name(model._meta.db_table)
    # Only quoted names, the key's type and a checked operator are interpolated; values are
    # parameters.
    sql = (
        f"UPDATE {table} AS t SET {', '.join(sets)} "  # noqa: S608
        f"FROM unnest(%s::{pk_type}[], %s::bigint[]) AS v(pk, seq) "
        f"WHERE t.{column('pk')} = v.pk AND {where}"
    )
    # Array literals as text: psycopg's list adaptation ran in Python, ~1 ms per 500 keys.
    keys = array_literal(pk for pk, _ in update.pairs)
    seqs = array_literal(seq for _, seq in update.pairs)
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, keys, seqs, *fence_params])
        return int(cursor.rowcount)


@dataclass(frozen=True)
class SeenQuery:
    """Which inbox rows to look up: by event id, or by (stream, sequences)."""

    ids: set[str]
    by_stream: dict[str, list[int]]  # stream -> stream sequences
    columns: list[str]  # the fields to return for each row
    scope: dict[str, str]  # field -> value every row must have (the consumer's own rows)


def inbox_seen(model: type[models.Model], alias: str, query: SeenQuery) -> list[dict[str, Any]]:
    """Return the inbox rows matching ``query``, with arrays for the id and sequence lists.

    Through the ORM, each ``IN`` list is a parameter per message: Django compiled and psycopg
    parsed a new ~200-parameter statement for every batch (~9% of its time). With arrays the
    query text stays constant.
    """
    connection = connections[alias]

    def column(name: str) -> str:
        return quoted_column(model, alias, name)

    alternatives, params = [], []
    if query.ids:
        alternatives.append(f"{column('event_id')} = ANY(%s::text[])")
        params.append(array_literal(sorted(query.ids)))
    for stream, numbers in query.by_stream.items():
        alternatives.append(
            f"({column('stream')} = %s AND {column('stream_seq')} = ANY(%s::bigint[]))"
        )
        params += [stream, array_literal(numbers)]
    where = f"({' OR '.join(alternatives)})"
    for name, value in query.scope.items():
        where = f"{column(name)} = %s AND {where}"
        params.insert(0, value)
    selected = ", ".join(column(name) for name in query.columns)
    table = connection.ops.quote_name(model._meta.db_table)
    # Only quoted column and table names are interpolated; every value is a parameter.
    sql = f"SELECT {selected} FROM {table} WHERE {where}"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [dict(zip(query.columns, row, strict=True)) for row in cursor.fetchall()]
