"""Stream settings on an existing stream: applied, reported, owned, audited (real nats-server)."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from jetstream_bridge.conf import get_config
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core.durations import to_nanos
from jetstream_bridge.health import check
from jetstream_bridge.topology import ensure_topology
from tests.helpers import nats, stream_answer

GIB = 1024**3

pytestmark = pytest.mark.django_db(transaction=True)


def configure(settings: Any, **keys: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, **keys}
    return get_config()


def ensure_command(*args: str) -> tuple[int, str]:
    """Run ``jetstream_ensure_topology`` in-process; return its exit code and output."""
    out = io.StringIO()
    try:
        call_command("jetstream_ensure_topology", *args, stdout=out)
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue()
    return 0, out.getvalue()


def server_config(name: str) -> dict[str, Any]:
    answer = stream_answer(name)
    assert answer is not None, f"stream {name} does not exist"
    return answer["config"]


def stream_state(name: str) -> dict[str, Any]:
    answer = stream_answer(name)
    assert answer is not None, f"stream {name} does not exist"
    return answer["state"]


def rewrite_stream(name: str, **changes: Any) -> None:
    """Update the stream as a service that writes no ownership records would."""
    body = {**server_config(name), **changes}
    nats(lambda c: c.jsm.update_stream(body))


def create_foreign_stream(config: Any, **fields: Any) -> None:
    """Create our stream as another tool would (the gem, an operator): every subject of ours."""
    s = config.subjects
    body = {
        "name": config.stream_name,
        "subjects": [s.publish, s.subscribe, s.dlq],
        "storage": "file",
        **fields,
    }
    nats(lambda c: c.jsm.create_stream(body))


@pytest.mark.parametrize(
    ("key", "value", "field", "wanted", "diff"),
    [
        ("STREAM_MAX_AGE", "7d", "max_age", to_nanos(7 * 86400), "max_age: unlimited -> 7d"),
        ("STREAM_MAX_BYTES", GIB, "max_bytes", GIB, "max_bytes: unlimited -> 1.0 GiB"),
        ("DUPLICATE_WINDOW", "10m", "duplicate_window", to_nanos(600), "2m -> 10m"),
    ],
)
def test_setting_changed_on_an_existing_stream__check_shows_the_diff_then_ensure_applies_it(
    jetstream_bridge: Any, settings: Any, key: str, value: Any, field: str, wanted: int, diff: str
) -> None:
    ensure_topology()  # created with the defaults: no age or byte limit, a 2-minute window
    before = server_config(jetstream_bridge.stream_name)
    config = configure(settings, **{key: value})

    code, out = ensure_command("--check")
    assert code == 1, out
    assert diff in out
    assert "differs from the settings" in out
    assert server_config(config.stream_name)[field] == before[field]  # --check changed nothing

    code, out = ensure_command("--dry-run")
    assert (code, "update stream" in out, diff in out) == (0, True, True), out
    assert server_config(config.stream_name)[field] == before[field]

    code, out = ensure_command()
    assert code == 0, out
    after = server_config(config.stream_name)
    assert after[field] == wanted
    assert after["metadata"][f"jetstream_bridge.{field}.owner"] == config.app_name
    assert sorted(after["subjects"]) == sorted(before["subjects"])
    for other in ("max_age", "max_bytes", "duplicate_window", "retention", "storage"):
        if other != field:
            assert after[other] == before[other], other
    code, out = ensure_command("--check")
    assert (code, "in sync" in out) == (0, True), out


def test_replicas_above_one_on_a_single_server__check_shows_it_and_ensure_says_why_not(
    jetstream_bridge: Any, settings: Any
) -> None:
    ensure_topology()
    configure(settings, STREAM_REPLICAS=3)
    code, out = ensure_command("--check")
    assert code == 1
    assert "num_replicas: 1 -> 3" in out
    with pytest.raises(CommandError) as raised:
        ensure_command()
    message = str(raised.value)
    assert "STREAM_REPLICAS is 3 but the NATS server is not clustered" in message
    assert "set STREAM_REPLICAS to 1" in message
    assert server_config(jetstream_bridge.stream_name)["num_replicas"] == 1


def test_a_max_age_below_the_servers_duplicate_window__says_what_to_set_and_changes_nothing(
    jetstream_bridge: Any, settings: Any
) -> None:
    ensure_topology()  # the server's window: 2m
    configure(settings, STREAM_MAX_AGE="90s")  # passes E015 against the 1m lease, not the server
    expected = (
        "the server refuses a duplicate window (2m) longer than the max age (90s); set "
        "DUPLICATE_WINDOW to at most 90s"
    )
    code, out = ensure_command("--check")
    assert code == 1
    assert expected in out
    with pytest.raises(CommandError, match=r"duplicate window \(2m\) longer than the max age"):
        ensure_command()
    assert server_config(jetstream_bridge.stream_name)["max_age"] == 0
    configure(settings, STREAM_MAX_AGE="90s", DUPLICATE_WINDOW="80s")
    assert ensure_command()[0] == 0
    after = server_config(jetstream_bridge.stream_name)
    assert (after["max_age"], after["duplicate_window"]) == (to_nanos(90), to_nanos(80))


@pytest.mark.parametrize(
    ("existing", "key", "value", "diff", "advice"),
    [
        (
            {"retention": "interest"},
            "STREAM_RETENTION",
            "limits",
            "retention: interest -> limits cannot be applied",
            'set "retention": "limits" in it',
        ),
        (
            {"retention": "workqueue"},
            "STREAM_RETENTION",
            "limits",
            "retention: workqueue -> limits cannot be applied",
            "nats stream backup",
        ),
        (
            {"storage": "memory"},
            "STREAM_STORAGE",
            "file",
            "storage: memory -> file cannot be applied",
            "--storage file --source",
        ),
    ],
)
def test_retention_and_storage_are_reported_with_what_to_do_and_never_changed(
    jetstream_bridge: Any,
    settings: Any,
    existing: dict[str, str],
    key: str,
    value: str,
    diff: str,
    advice: str,
) -> None:
    create_foreign_stream(jetstream_bridge, **existing)
    configure(settings, **{key: value})
    for args in (("--check",), ()):
        code, out = ensure_command(*args)
        assert code == (1 if args else 0)  # ensure applies what it can and reports the rest
        assert diff in out, out
        assert advice in out
        assert f"leave {key} unset" in out
    field, kept = next(iter(existing.items()))
    assert server_config(jetstream_bridge.stream_name)[field] == kept


def test_unset_keys_leave_an_existing_streams_limits_alone(
    jetstream_bridge: Any, settings: Any
) -> None:
    limits = {
        "max_age": to_nanos(3600),
        "max_bytes": 10_000_000,
        "duplicate_window": to_nanos(600),
        "storage": "memory",
    }
    create_foreign_stream(jetstream_bridge, **limits)
    report = ensure_topology()
    assert report.in_sync, report.actions
    assert ensure_command("--check")[0] == 0
    after = server_config(jetstream_bridge.stream_name)
    assert {name: after[name] for name in limits} == limits


def test_two_apps_enforcing_different_values__reported_not_overwritten_until_take_over(
    jetstream_bridge: Any, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    alpha = configure(settings, STREAM_MAX_AGE="7d")
    ensure_topology()
    stream = alpha.stream_name
    assert server_config(stream)["max_age"] == to_nanos(7 * 86400)

    configure(settings, APP_NAME="beta", DESTINATION_APP="alpha", STREAM_MAX_AGE="1d")
    with caplog.at_level(logging.WARNING, logger="jetstream_bridge"):
        code, out = ensure_command()
    assert code == 0
    expected = "max_age: app 'alpha' enforces 7d, app 'beta' wants 1d (STREAM_MAX_AGE)"
    assert expected in out
    assert any(expected in record.getMessage() for record in caplog.records)
    assert server_config(stream)["max_age"] == to_nanos(7 * 86400)
    code, out = ensure_command("--check")
    assert (code, expected in out) == (1, True)

    code, out = ensure_command("--take-over")
    assert code == 0, out
    after = server_config(stream)
    assert after["max_age"] == to_nanos(86400)
    assert after["metadata"]["jetstream_bridge.max_age.owner"] == "beta"
    assert ensure_command("--check")[0] == 0

    # Now alpha is the one told, and it does not fight back.
    configure(settings, APP_NAME="alpha", DESTINATION_APP="beta", STREAM_MAX_AGE="7d")
    code, out = ensure_command()
    assert "max_age: app 'beta' enforces 1d, app 'alpha' wants 7d" in out
    assert server_config(stream)["max_age"] == to_nanos(86400)


def test_a_reset_by_a_service_writing_no_metadata_is_drift_and_applied_again(
    jetstream_bridge: Any, settings: Any
) -> None:
    config = configure(settings, STREAM_MAX_AGE="7d", DUPLICATE_WINDOW="10m")
    ensure_topology()
    # A partial update as the gem sends it: limits back to the server defaults, no metadata.
    body = {
        "name": config.stream_name,
        "subjects": server_config(config.stream_name)["subjects"],
        "storage": "file",
    }
    nats(lambda c: c.jsm.update_stream(body))
    reset = server_config(config.stream_name)
    assert (reset["max_age"], reset["duplicate_window"]) == (0, to_nanos(120))

    code, out = ensure_command("--check")
    assert code == 1
    assert "max_age: unlimited -> 7d" in out
    assert "duplicate_window: 2m -> 10m" in out
    report = ensure_topology()
    assert [a.kind for a in report.actions if a.change] == ["update-stream", "update-stream"]
    after = server_config(config.stream_name)
    assert (after["max_age"], after["duplicate_window"]) == (to_nanos(7 * 86400), to_nanos(600))


def test_an_owner_value_reset_by_a_partial_update_stays_the_owners_to_restore(
    jetstream_bridge: Any, settings: Any
) -> None:
    configure(settings, STREAM_MAX_AGE="7d")
    ensure_topology()
    stream = jetstream_bridge.stream_name
    rewrite_stream(stream, max_age=0)  # metadata still says alpha enforces 7d
    configure(settings, APP_NAME="beta", DESTINATION_APP="alpha", STREAM_MAX_AGE="1d")
    report = ensure_topology()
    conflicts = [a.detail for a in report.actions if a.kind == "conflict"]
    assert len(conflicts) == 1, report.actions
    assert "app 'alpha' enforces" in conflicts[0]
    after = server_config(stream)
    assert after["max_age"] == 0  # beta did not claim what alpha lost
    assert after["metadata"]["jetstream_bridge.max_age.owner"] == "alpha"
    configure(settings, STREAM_MAX_AGE="7d")  # alpha's next ensure restores its value
    ensure_topology()
    assert server_config(stream)["max_age"] == to_nanos(7 * 86400)


def test_a_matching_value_with_no_owner_is_claimed_so_a_later_app_cannot_silently_change_it(
    jetstream_bridge: Any, settings: Any
) -> None:
    stream = jetstream_bridge.stream_name
    ensure_topology()  # created with STREAM_MAX_AGE unset: no owner recorded
    rewrite_stream(stream, max_age=to_nanos(7 * 86400))  # set by hand, as before this release
    configure(settings, STREAM_MAX_AGE="7d")
    report = ensure_topology()
    assert [a.kind for a in report.actions if a.kind == "record-owner"] == ["record-owner"]
    assert report.in_sync  # recording the owner is not a difference
    assert server_config(stream)["metadata"]["jetstream_bridge.max_age.owner"] == "alpha"
    configure(settings, APP_NAME="beta", DESTINATION_APP="alpha", STREAM_MAX_AGE="1d")
    report = ensure_topology()
    assert [a.kind for a in report.actions if a.kind == "conflict"] == ["conflict"]
    assert server_config(stream)["max_age"] == to_nanos(7 * 86400)


def test_a_limit_that_would_delete_stored_messages_is_held_back_unless_allowed(
    jetstream_bridge: Any, settings: Any
) -> None:
    from jetstream_bridge import Publisher

    configure(settings, USE_OUTBOX=False)
    ensure_topology()
    stream = jetstream_bridge.stream_name
    for number in range(40):
        Publisher().publish(resource_type="order", event_type="created", payload={"n": number})
    stored = stream_state(stream)
    assert stored["messages"] == 40
    configure(settings, USE_OUTBOX=False, STREAM_MAX_BYTES=stored["bytes"] // 2)
    code, out = ensure_command()
    assert code == 0
    assert "held" in out
    assert "would delete about" in out
    assert "--allow-discard" in out
    assert stream_state(stream)["messages"] == 40
    assert ensure_command("--check")[0] == 1
    code, out = ensure_command("--allow-discard")
    assert code == 0
    assert stream_state(stream)["messages"] < 40
    assert ensure_command("--check")[0] == 0


def test_interest_retention_is_reported_by_check_health_admin_and_consumer_start(
    jetstream_bridge: Any, settings: Any, caplog: pytest.LogCaptureFixture, admin_client: Any
) -> None:
    create_foreign_stream(jetstream_bridge, retention="interest")
    consequence = "messages published while no consumer is interested in their subject are "
    headline = f"stream {jetstream_bridge.stream_name} stores"

    code, out = ensure_command("--check")
    assert code == 1
    assert headline in out
    assert "with interest retention" in out
    assert consequence in out

    report = check()
    assert any(consequence in warning for warning in report.warnings), report.warnings
    assert report.to_dict()["warnings"] == list(report.warnings)

    out = io.StringIO()
    try:
        call_command("jetstream_health", stdout=out)
    except SystemExit:
        pass  # health may be unhealthy for other reasons here; the warning is what we check
    assert "warnings" in out.getvalue()
    assert consequence in out.getvalue()

    page = admin_client.get("/admin/jetstream_bridge/outboxevent/status/").content.decode()
    assert 'id="jsb-stream-warnings"' in page
    assert "with interest retention" in page

    with caplog.at_level(logging.WARNING, logger="jetstream_bridge"):
        Consumer(durable_name="alpha-events", stop_when_idle=True, handler=lambda *a: None).run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(consequence in w and w.startswith("consumer:") for w in warnings), warnings


def test_workqueue_retention_on_another_stream_holding_our_subject_is_reported(
    jetstream_bridge: Any,
) -> None:
    wildcard = f"{jetstream_bridge.env}.data.sync.>"
    nats(
        lambda c: c.jsm.create_stream(
            {"name": "GEM-QUEUE", "subjects": [wildcard], "retention": "workqueue"}
        )
    )
    try:
        code, out = ensure_command("--check")
        assert code == 1
        assert "stream GEM-QUEUE stores" in out
        assert "one consumer, and a message is removed as soon as it is acknowledged" in out
    finally:
        nats(lambda c: c.jsm.delete_stream("GEM-QUEUE"))


def test_e015_is_checked_against_the_servers_duplicate_window(
    jetstream_bridge: Any, settings: Any
) -> None:
    create_foreign_stream(jetstream_bridge, duplicate_window=to_nanos(30))
    # DUPLICATE_WINDOW unset: the settings pass E015 (2m > 1m), the server's 30s does not.
    code, out = ensure_command("--check")
    assert code == 1
    expected = (
        f"E015: stream {jetstream_bridge.stream_name} has a duplicate window of 30s, not "
        "longer than RELAY_LEASE (1m)"
    )
    assert expected in out
    assert any(expected in warning for warning in check().warnings)

    configure(settings, DUPLICATE_WINDOW="5m")
    ensure_topology()
    assert not check().warnings
    assert ensure_command("--check")[0] == 0


def test_relay_start_warns_about_an_interest_stream(
    jetstream_bridge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from jetstream_bridge.relay import Relay

    create_foreign_stream(jetstream_bridge, retention="interest")
    relay = Relay()
    relay.stop.set()  # start, warn, and leave the loop at once
    with caplog.at_level(logging.WARNING, logger="jetstream_bridge"):
        relay.run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("relay: stream ") and "interest retention" in w for w in warnings)


def test_check_shows_consumer_differences_in_human_units(jetstream_bridge: Any) -> None:
    config = jetstream_bridge
    ensure_topology()
    stale = {
        "durable_name": "alpha-events",
        "ack_policy": "explicit",
        "filter_subject": config.subjects.subscribe,
        "ack_wait": to_nanos(5),
        "max_deliver": 5,
        "backoff": [to_nanos(5), to_nanos(60)],
    }
    nats(lambda c: c.jsm.create_consumer(config.stream_name, stale))
    code, out = ensure_command("--check", "--durable", "alpha-events")
    assert code == 1
    assert "ack_wait: 5s -> 30s" in out
    assert "backoff: [5s, 1m] -> []" in out
