"""The plain SQL helpers (``jetstream_bridge.sql``) against the test database.

They replace ORM calls on the hot paths, so each is checked against what the ORM would have
stored or matched.
"""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection, transaction

from jetstream_bridge.sql import RawJson, array_literal, insert_rows
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

AWKWARD = ["plain", 'with "quotes"', "back\\slash", "comma,brace{}", "NULL", "", "ünï"]


def test_array_literal__round_trips_awkward_text_numbers_and_nulls() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("array literals are PostgreSQL's")
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::text[], %s::bigint[]", [array_literal(AWKWARD), "{}"])
        texts, empty = cursor.fetchone()
        cursor.execute("SELECT %s::bigint[]", [array_literal([1, None, 2**40])])
        (numbers,) = cursor.fetchone()
    assert texts == AWKWARD
    assert empty == []
    assert numbers == [1, None, 2**40]


def test_insert_rows__fills_defaults_stores_raw_json_and_returns_keys() -> None:
    rows = [
        {"event_id": event_id, "payload": RawJson(f'{{"n": {index}, "s": "x\\"y"}}')}
        for index, event_id in enumerate(AWKWARD)
    ]
    keys = insert_rows(Effect, "default", rows, returning=True)
    stored = {effect.pk: effect for effect in Effect.objects.all()}
    assert sorted(stored) == sorted(keys)
    for index, (key, event_id) in enumerate(zip(keys, AWKWARD, strict=True)):
        effect = stored[key]
        assert (effect.event_id, effect.payload) == (event_id, {"n": index, "s": 'x"y'})
        assert effect.consumer == ""  # the field's default
        assert effect.created_at is not None  # auto_now_add


def test_insert_rows__many_rows_in_one_statement_and_a_conflict_is_an_integrity_error() -> None:
    rows = [{"event_id": f"e-{index}", "payload": {"i": index}} for index in range(250)]
    assert insert_rows(Effect, "default", rows) == []
    assert Effect.objects.count() == 250
    assert Effect.objects.get(event_id="e-249").payload == {"i": 249}
    # Effect has no unique key of its own; the primary key gives a conflict to provoke.
    taken = Effect.objects.values_list("pk", flat=True).first()
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_rows(
            Effect, "default", [{"id": taken, "event_id": "x"}, {"id": 10**9, "event_id": "y"}]
        )
    assert Effect.objects.count() == 250
