"""Plain SQL for the bridge's hot paths, where the ORM's Python cost more than the database.

``Model.objects.create()`` and ``bulk_create()`` cost more Python than the database spends on
the rows: the ORM took 0.68 ms of the 1 ms a ``publish()`` may add to the caller's transaction
(one INSERT: ~0.3 ms), and ``bulk_create`` on PostgreSQL sends one array per column, whose
dumping in psycopg's Python code was a third of a consumer batch (docs/benchmarks.md).
``insert_rows`` builds one statement per model and set of given fields. Fields a row leaves out
get what the ORM would give them (``auto_now``/``auto_now_add`` now, else the field's default;
the database fills an auto-increment key, a ``db_default`` or a generated column). ``save()``
and model signals do not run, as with ``bulk_create``. A unique-key conflict raises
``IntegrityError``.

``array_literal`` writes a PostgreSQL array as one text parameter: psycopg adapts a Python
list in Python, element by element, and a query with an ``IN`` list of hundreds of parameters
is parsed again on every call. ``case_by_pk`` sets a value per row in one UPDATE elsewhere.

SQL that only one database runs lives in a module per vendor (``sql.postgresql``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connections, models
from django.db.models.expressions import RawSQL
from django.db.models.fields import NOT_PROVIDED
from django.utils import timezone


class RawJson:
    """JSON text for a JSON column, stored as it is instead of being encoded again."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def param(self, vendor: str) -> Any:
        if vendor == "postgresql":
            from django.db.backends.postgresql.psycopg_any import Jsonb

            return Jsonb(self.text, dumps=_as_is)
        return self.text  # SQLite and MySQL/MariaDB store JSON columns as text


def _as_is(text: str) -> str:
    return text


def insert_rows(
    model: type[models.Model],
    alias: str,
    rows: Sequence[dict[str, Any]],
    *,
    returning: bool = False,
) -> list[Any]:
    """INSERT ``rows`` (field name -> value, all naming the same fields) into ``model``'s table.

    With ``returning``, return the new rows' keys in order (one row at a time where the
    database cannot return them from a multi-row INSERT).
    """
    if not rows:
        return []
    connection = connections[alias]
    statement = _statement(model, alias, frozenset(rows[0]))
    values = _prepared(statement, connection, rows)
    with connection.cursor() as cursor:
        if returning:
            if not statement.returning:
                keys = []
                for row in values:
                    cursor.execute(statement.head + statement.row, row)
                    pk = statement.pk_column
                    keys.append(connection.ops.last_insert_id(cursor, statement.table, pk))
                return keys
            cursor.execute(
                statement.head + ", ".join([statement.row] * len(values)) + statement.returning,
                [value for row in values for value in row],
            )
            return [row[0] for row in cursor.fetchall()]
        raw = _psycopg_cursor(cursor)
        if raw is not None and len(values) > 1:
            # psycopg 3: COPY, whose rows psycopg formats in C. A multi-row INSERT with
            # parameters made psycopg re-parse the whole statement, placeholder by placeholder,
            # on every call (it caches statements of up to 50 parameters only): most of the
            # INSERT's time for a consumer batch of 100 rows. COPY fails on a unique-key
            # conflict as the INSERT does.
            with connection.wrap_database_errors, raw.copy(statement.copy) as copy:
                for row in values:
                    copy.write_row(row)
            return []
        limit = connection.features.max_query_params or 65535
        per_statement = max(1, limit // len(statement.fields))
        for start in range(0, len(values), per_statement):
            chunk = values[start : start + per_statement]
            cursor.execute(
                statement.head + ", ".join([statement.row] * len(chunk)),
                [value for row in chunk for value in row],
            )
    return []


# How each column of a statement gets its value (see _Statement.plan).
_GIVEN, _NOW, _TODAY, _PER_ROW_DEFAULT, _CONSTANT = range(5)


def _prepared(
    statement: _Statement, connection: Any, rows: Sequence[dict[str, Any]]
) -> list[list[Any]]:
    """Each row's database values, in the statement's column order."""
    now = timezone.now()
    stamps = {  # one prepared timestamp for every auto_now/auto_now_add column of the call
        _NOW: connection.ops.adapt_datetimefield_value(now),
        _TODAY: connection.ops.adapt_datefield_value(now.date()),
    }
    vendor = connection.vendor
    constants = statement.constants(connection)
    prepared_rows = []
    for row in rows:
        prepared = []
        for (kind, field), constant in zip(statement.plan, constants, strict=True):
            if kind == _CONSTANT:
                prepared.append(constant)
                continue
            if kind in stamps:
                prepared.append(stamps[kind])
                continue
            value = row[field.name] if kind == _GIVEN else field.get_default()
            if value is None:
                pass
            elif isinstance(value, RawJson):
                value = value.param(vendor)
            elif isinstance(value, str) and field.name in statement.plain:
                pass  # what get_db_prep_save returns for a str in a CharField or TextField
            elif (
                isinstance(value, datetime)
                and value.tzinfo is not None
                and (field.name in statement.datetimes)
            ):
                # An aware datetime needs no conversion before the backend adapts it.
                value = connection.ops.adapt_datetimefield_value(value)
            else:
                value = field.get_db_prep_save(value, connection)
            prepared.append(value)
        prepared_rows.append(prepared)
    return prepared_rows


def _psycopg_cursor(cursor: Any) -> Any:
    """The psycopg 3 cursor under Django's cursor wrapper, or None (psycopg2, other databases)."""
    if cursor.db.vendor != "postgresql":
        return None
    try:
        from psycopg import Cursor
    except ImportError:  # psycopg2
        return None
    raw = cursor.cursor
    return raw if isinstance(raw, Cursor) else None


@dataclass(frozen=True)
class _Statement:
    fields: tuple[models.Field[Any, Any], ...]
    table: str
    pk_column: str
    head: str  # INSERT INTO table (columns) VALUES
    copy: str  # COPY table (columns) FROM STDIN
    row: str  # (%s, %s, ...)
    returning: str  # " RETURNING key" where the database supports it, else ""
    plain: frozenset[str]  # text fields whose str values go to the database as they are
    datetimes: frozenset[str]  # DateTimeFields (an aware value needs only the backend's adapt)
    plan: tuple[tuple[int, models.Field[Any, Any]], ...]  # (how its value is found, field)
    _constants: list[Any] = dataclasses.field(default_factory=list, compare=False)

    def constants(self, connection: Any) -> list[Any]:
        """Per column, the prepared default of a column whose default never changes."""
        if not self._constants:
            self._constants.extend(
                field.get_db_prep_save(field.get_default(), connection)
                if kind == _CONSTANT
                else None
                for kind, field in self.plan
            )
        return self._constants


_statements: dict[tuple[type[models.Model], str, frozenset[str]], _Statement] = {}


def _statement(model: type[models.Model], alias: str, given: frozenset[str]) -> _Statement:
    """The INSERT for ``model`` on ``alias`` when rows give the fields named in ``given``."""
    key = (model, alias, given)
    statement = _statements.get(key)
    if statement is None:
        connection = connections[alias]
        quote = connection.ops.quote_name
        fields = tuple(
            field
            for field in model._meta.concrete_fields
            if not getattr(field, "generated", False)
            and (
                field.name in given
                or not (
                    # the database fills these: an auto-increment key, a db_default
                    (field.primary_key and getattr(field, "db_returning", False))
                    or _has_db_default(field)
                )
            )
        )
        pk = model._meta.pk
        pk_column = quote(pk.column or pk.name)
        columns = ", ".join(quote(field.column or field.name) for field in fields)
        table = quote(model._meta.db_table)
        can_return = connection.features.can_return_rows_from_bulk_insert
        statement = _Statement(
            fields=fields,
            table=model._meta.db_table,
            pk_column=pk.column or pk.name,
            # Only quoted names from the model go into the SQL; every value is a parameter.
            head=f"INSERT INTO {table} ({columns}) VALUES ",  # noqa: S608
            copy=f"COPY {table} ({columns}) FROM STDIN",
            row="(" + ", ".join(["%s"] * len(fields)) + ")",
            returning=f" RETURNING {pk_column}" if can_return else "",
            plain=frozenset(
                field.name
                for field in fields
                if type(field) in (models.CharField, models.TextField)
            ),
            datetimes=frozenset(
                field.name for field in fields if type(field) is models.DateTimeField
            ),
            plan=tuple((_how(field, given), field) for field in fields),
        )
        _statements[key] = statement
    return statement


def _how(field: models.Field[Any, Any], given: frozenset[str]) -> int:
    """How a column's value is found when rows give the fields in ``given``."""
    if field.name in given:
        return _GIVEN
    if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
        return _NOW if isinstance(field, models.DateTimeField) else _TODAY
    if field.has_default() and callable(field.default):
        return _PER_ROW_DEFAULT  # a uuid4 primary key, say: one value per row
    return _CONSTANT


def _has_db_default(field: models.Field[Any, Any]) -> bool:
    return getattr(field, "db_default", NOT_PROVIDED) is not NOT_PROVIDED


def array_literal(values: Iterable[Any]) -> str:
    """A PostgreSQL array literal of ``values`` (numbers or text; None is NULL).

    Bind it as one parameter and cast it: ``col = ANY(%s::bigint[])``.
    """
    items = []
    for value in values:
        if value is None:
            items.append("NULL")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items.append(str(value))
        else:
            text = str(value).replace("\\", "\\\\").replace('"', '\\"')
            items.append(f'"{text}"')
    return "{" + ",".join(items) + "}"


def quoted_column(model: type[models.Model], alias: str, name: str) -> str:
    """The quoted column of ``model``'s field ``name`` (``"pk"``: its primary key) on ``alias``.

    The only names the plain SQL of this package, outbox.py and inbox.py interpolates.
    """
    field = model._meta.pk if name == "pk" else model._meta.get_field(name)
    column = getattr(field, "column", None)
    if not isinstance(column, str):
        raise TypeError(f"{model._meta.label}.{name} has no column")
    return str(connections[alias].ops.quote_name(column))


def case_by_pk(
    model: type[models.Model], alias: str, name: str, mapping: Sequence[tuple[Any, Any]]
) -> RawSQL:
    """``CASE pk WHEN .. THEN .. ELSE <name> END`` for an integer field, as raw SQL.

    The ORM's ``Case(When(...))`` costs about 0.2 ms of Python per branch to build; a relay
    batch of 500 rows spent ~100 ms there against ~10 ms in the database.
    """
    column = quoted_column(model, alias, name)
    branches = " ".join(["WHEN %s THEN %s"] * len(mapping))
    params = [value for pair in mapping for value in pair]
    # Only quoted column names are interpolated; every value is a bound parameter.
    return RawSQL(  # noqa: S611
        f"CASE {quoted_column(model, alias, 'pk')} {branches} ELSE {column} END",
        params,
        output_field=models.BigIntegerField(),
    )
