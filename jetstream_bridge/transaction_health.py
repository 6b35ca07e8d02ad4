"""Whether the batch transaction is still usable after a handler ran in it.

``processing.BatchProcessor`` runs a batch's handlers without a savepoint each (the default)
and asks ``TransactionHealth`` after each one whether a database error, caught or not, left
the transaction unusable; if so, the batch is redone with a savepoint per message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError, connections

_PG_TRANSACTION_INERROR = 3  # libpq PQTRANS_INERROR; PQTRANS_UNKNOWN (4) is worse


class TransactionHealth:
    """Tell whether the batch transaction on ``using`` is still usable after a handler ran."""

    def __init__(self, using: str) -> None:
        self.using = using
        self._query_errors: list[BaseException] = []

    @contextlib.contextmanager
    def watching(self, enabled: bool) -> Iterator[None]:
        """Note every failed query while the batch runs without savepoints.

        A handler may catch a database error itself. Inside its own savepoint that is harmless,
        but without one it can leave the batch transaction aborted (PostgreSQL) or, on MySQL, a
        deadlock may have rolled it back: the next handler would then fail for an error that
        is not its own. ``spoiled`` reads these notes after each handler.

        Not on PostgreSQL, where ``spoiled`` reads the transaction's state from libpq instead:
        a wrapper around every query of the batch would be work for nothing.
        """
        if not enabled:
            yield
            return
        self._query_errors = []
        connection = connections[self.using]
        if connection.vendor == "postgresql":
            yield
            return

        def note(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
            try:
                return execute(sql, params, many, context)
            except Exception as exc:
                self._query_errors.append(exc)
                raise

        with connection.execute_wrapper(note):
            yield

    def forget_errors(self) -> None:
        """Start noting failed queries afresh (before the next handler runs)."""
        self._query_errors.clear()

    def spoiled(self) -> bool:
        """Tell whether a query failed since ``forget_errors``, leaving the batch in doubt."""
        connection = connections[self.using]
        if connection.vendor == "postgresql":
            # Exact and free (libpq keeps it): an error aborts the transaction, nothing else
            # does. A database error the handler caught inside its own savepoint is harmless.
            raw = connection.connection
            if raw is None:
                return True
            return int(raw.info.transaction_status) >= _PG_TRANSACTION_INERROR
        # SQLite and MySQL keep a transaction going after most failed statements, but not
        # after all (a MySQL deadlock rolls it back): any failed query makes the batch redo.
        return bool(self._query_errors)

    def broken(self) -> bool:
        """Tell whether the batch transaction cannot go on (marked for rollback or unusable)."""
        connection = connections[self.using]
        if connection.needs_rollback:
            return True
        try:
            return not connection.is_usable()
        except Exception:
            return True


def database_unavailable(error: BaseException) -> bool:
    """Tell whether ``error`` says the database is unavailable rather than refusing the batch.

    A lost connection, a lock or statement timeout, a serialisation failure or a deadlock are
    ``OperationalError``s (``InterfaceError`` once the connection is closed): the batch waits
    for the database and comes back whole. A bare ``DatabaseError`` (the driver could not
    classify it) is taken as an outage too, which is what every ``DatabaseError`` was before.
    """
    return isinstance(error, (OperationalError, InterfaceError)) or type(error) is DatabaseError
