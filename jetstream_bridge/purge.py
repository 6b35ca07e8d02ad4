"""Deleting old rows in batches: the one way the outbox and inbox stores purge their tables.

A purge may meet millions of rows on a table that consumers and relays write all the time, so
it never deletes them in one statement (one long transaction holding every row lock, a huge
undo log on MySQL, a long write lock on SQLite). Each batch reads up to ``batch_size`` keys
that match, in key order and after the previous batch's last key (so a batch does not scan
again what the one before it left), then deletes those keys in one ``DELETE ... WHERE pk IN
(...)`` that is its own short transaction. The keys are read into Python first: MySQL and
MariaDB refuse ``LIMIT`` in a subquery of a ``DELETE`` on the same table, and one code path
serves every database. The DELETE repeats the purge's condition, so a row that changed
between the read and the delete (a failed inbox row processed meanwhile) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import models

DEFAULT_BATCH_SIZE = 1000


@dataclass(frozen=True)
class Purged:
    """What a purge deleted, or with ``dry_run`` would delete, and in how many batches."""

    rows: int
    batches: int
    dry_run: bool = False


def delete_in_batches(
    queryset: models.QuerySet[Any], *, batch_size: int = DEFAULT_BATCH_SIZE, dry_run: bool = False
) -> Purged:
    """Delete the rows of ``queryset`` (of one database alias), ``batch_size`` per statement."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, not {batch_size}")
    if dry_run:
        count = queryset.count()
        return Purged(count, -(-count // batch_size), dry_run=True)
    label = queryset.model._meta.label
    keys = queryset.order_by("pk").values_list("pk", flat=True)
    rows = batches = 0
    after: Any = None
    while True:
        page = keys if after is None else keys.filter(pk__gt=after)
        pks = list(page[:batch_size])
        if not pks:
            return Purged(rows, batches)
        _, deleted = queryset.filter(pk__in=pks).delete()
        rows += deleted.get(label, 0)
        batches += 1
        after = pks[-1]
