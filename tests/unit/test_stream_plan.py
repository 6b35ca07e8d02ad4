"""Pure stream-settings decisions: what is given, what differs, who owns it, how it reads."""

from __future__ import annotations

from typing import Any

from jetstream_bridge.core.durations import to_nanos
from jetstream_bridge.core.settings import BridgeConfig, parse_config
from jetstream_bridge.core.stream_plan import (
    MANAGED,
    Holding,
    creation_metadata,
    format_bytes,
    plan_settings,
    retention_warning,
    window_problem,
)

DAY = 86400


def config(**keys: Any) -> BridgeConfig:
    parsed, problems = parse_config({"DESTINATION_APP": "beta", **keys})
    assert parsed is not None, problems
    return parsed


def server(**fields: Any) -> dict[str, Any]:
    return {
        "name": "S",
        "subjects": ["a"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": 1,
        "max_age": 0,
        "max_bytes": -1,
        "duplicate_window": to_nanos(120),
        **fields,
    }


def test_explicit__only_the_keys_given_with_a_value() -> None:
    given = config(STREAM_MAX_AGE="7d", STREAM_MAX_BYTES=None)
    assert given.explicit == frozenset({"DESTINATION_APP", "STREAM_MAX_AGE"})


def test_plan__unset_keys_are_never_compared() -> None:
    plan = plan_settings(config(), server(max_age=to_nanos(60), retention="interest"))
    assert (plan.apply, plan.conflicts, plan.fixed) == ((), (), ())


def test_plan__a_given_limit_that_differs_is_applied_and_recorded() -> None:
    plan = plan_settings(config(APP_NAME="alpha", STREAM_MAX_AGE="7d"), server())
    assert [str(d) for d in plan.apply] == ["max_age: unlimited -> 7d"]
    body = plan.updated(server(metadata={"team": "x"}), ["a", "b"])
    assert body["max_age"] == to_nanos(7 * DAY)
    assert body["subjects"] == ["a", "b"]
    assert body["metadata"] == {
        "jetstream_bridge.max_age.owner": "alpha",
        "jetstream_bridge.max_age.value": str(to_nanos(7 * DAY)),
    }


def test_plan__metadata_of_others_survives_an_update() -> None:
    raw = server(metadata={"team": "x", "_nats.req.level": "0"})
    plan = plan_settings(config(STREAM_MAX_BYTES=1024), raw)
    assert plan.updated(raw, ["a"])["metadata"]["team"] == "x"
    assert plan.updated(raw, ["a"])["metadata"]["_nats.req.level"] == "0"


def owned_by(app: str, field: str, value: int) -> dict[str, str]:
    return {f"jetstream_bridge.{field}.owner": app, f"jetstream_bridge.{field}.value": str(value)}


def test_plan__another_apps_value_still_in_force_is_a_conflict() -> None:
    week = to_nanos(7 * DAY)
    raw = server(max_age=week, metadata=owned_by("alpha", "max_age", week))
    plan = plan_settings(config(APP_NAME="beta", STREAM_MAX_AGE="1d"), raw)
    assert plan.apply == ()
    [conflict] = plan.conflicts
    assert str(conflict).startswith("max_age: app 'alpha' enforces 7d, app 'beta' wants 1d")
    taken = plan_settings(config(APP_NAME="beta", STREAM_MAX_AGE="1d"), raw, take_over=True)
    assert [str(d) for d in taken.apply] == ["max_age: 7d -> 1d"]
    assert taken.metadata["jetstream_bridge.max_age.owner"] == "beta"


def test_plan__a_value_reset_behind_its_owner_is_the_owners_drift_not_anothers_claim() -> None:
    raw = server(max_age=0, metadata=owned_by("alpha", "max_age", to_nanos(7 * DAY)))
    plan = plan_settings(config(APP_NAME="beta", STREAM_MAX_AGE="1d"), raw)
    assert plan.apply == ()
    assert [str(c.difference) for c in plan.conflicts] == ["max_age: unlimited -> 1d"]
    owner = plan_settings(config(APP_NAME="alpha", STREAM_MAX_AGE="7d"), raw)
    assert [str(d) for d in owner.apply] == ["max_age: unlimited -> 7d"]


def test_plan__an_agreeing_value_with_no_owner_is_claimed_without_a_difference() -> None:
    raw = server(max_age=to_nanos(7 * DAY))
    plan = plan_settings(config(APP_NAME="alpha", STREAM_MAX_AGE="7d"), raw)
    assert plan.apply == ()
    assert [s.field for s in plan.claimed] == ["max_age"]
    assert plan.metadata["jetstream_bridge.max_age.owner"] == "alpha"
    assert plan.updated(raw, ["a.b"])["metadata"] == plan.metadata


def test_plan__a_limit_below_what_is_stored_is_held_unless_discard_is_allowed() -> None:
    stored = Holding(messages=100, bytes=10_000, oldest_age=3 * DAY)
    raw = server()
    smaller = config(STREAM_MAX_BYTES=4_000, STREAM_MAX_AGE="1d")
    plan = plan_settings(smaller, raw, holding=stored)
    assert plan.apply == ()
    assert sorted(h.difference.setting.field for h in plan.held) == ["max_age", "max_bytes"]
    assert all("--allow-discard" in str(h) for h in plan.held)
    allowed = plan_settings(smaller, raw, holding=stored, allow_discard=True)
    assert sorted(d.setting.field for d in allowed.apply) == ["max_age", "max_bytes"]
    roomy = plan_settings(config(STREAM_MAX_BYTES=20_000, STREAM_MAX_AGE="7d"), raw, holding=stored)
    assert sorted(d.setting.field for d in roomy.apply) == ["max_age", "max_bytes"]


def test_plan__own_records_never_conflict() -> None:
    week = to_nanos(7 * DAY)
    raw = server(max_age=week, metadata=owned_by("alpha", "max_age", week))
    plan = plan_settings(config(APP_NAME="alpha", STREAM_MAX_AGE="1d"), raw)
    assert [str(d) for d in plan.apply] == ["max_age: 7d -> 1d"]


def test_plan__retention_and_storage_are_fixed_never_applied() -> None:
    raw = server(retention="interest", storage="memory")
    plan = plan_settings(config(STREAM_RETENTION="limits", STREAM_STORAGE="file"), raw)
    assert [str(d) for d in plan.fixed] == [
        "retention: interest -> limits",
        "storage: memory -> file",
    ]
    assert plan.apply == ()
    assert plan.updated(raw, ["a"])["retention"] == "interest"


def test_creation_metadata__records_only_the_given_limits() -> None:
    given = config(APP_NAME="alpha", DUPLICATE_WINDOW="10m", STREAM_REPLICAS=1)
    assert creation_metadata(given) == {
        **owned_by("alpha", "duplicate_window", to_nanos(600)),
        **owned_by("alpha", "num_replicas", 1),
    }
    assert [s.key for s in MANAGED] == [
        "STREAM_MAX_AGE",
        "STREAM_MAX_BYTES",
        "DUPLICATE_WINDOW",
        "STREAM_REPLICAS",
    ]


def test_format_bytes__human_units() -> None:
    assert [format_bytes(n) for n in (512, 2048, 10_000_000, 1024**3)] == [
        "512 B",
        "2.0 KiB",
        "9.5 MiB",
        "1.0 GiB",
    ]


def test_retention_warning__only_interest_and_workqueue() -> None:
    assert retention_warning("S", "limits", ["a"]) is None
    assert "dropped at once" in (retention_warning("S", "interest", ["a"]) or "")
    assert "only one consumer" in (retention_warning("S", "workqueue", ["a"]) or "")


def test_window_problem__e015_on_the_servers_window() -> None:
    assert window_problem("S", 120.0, 60.0) is None
    problem = window_problem("S", 60.0, 60.0)
    assert problem is not None
    assert problem.startswith("E015: stream S has a duplicate window of 1m")


def test_plan__max_age_zero_is_given_and_enforces_no_limit() -> None:
    plan = plan_settings(config(STREAM_MAX_AGE=0), server(max_age=to_nanos(3600)))
    assert [str(d) for d in plan.apply] == ["max_age: 1h -> unlimited"]


def test_limits_problem__a_window_longer_than_the_max_age() -> None:
    from jetstream_bridge.core.stream_plan import limits_problem

    assert limits_problem(server()) is None  # no age limit
    assert limits_problem(server(max_age=to_nanos(120))) is None
    problem = limits_problem(server(max_age=to_nanos(60)))
    assert problem is not None
    assert "duplicate window (2m) longer than the max age (1m)" in problem


def test_plan__max_bytes_zero_is_given_and_enforces_no_limit() -> None:
    plan = plan_settings(config(STREAM_MAX_BYTES=0), server(max_bytes=10_000_000))
    assert [str(d) for d in plan.apply] == ["max_bytes: 9.5 MiB -> unlimited"]
