"""Overlap-safe topology against a real nats-server."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

from jetstream_bridge.broker import Connection
from jetstream_bridge.core.durations import to_nanos
from jetstream_bridge.topology import ensure_topology
from tests.helpers import consumer_answer, manage, nats, stream_answer, stream_subjects

DURABLE = "beta-events"


def subjects(config: Any) -> dict[str, str]:
    """The subjects of the events' stream (dead letters have a stream of their own)."""
    s = config.subjects
    return {"publish": s.publish, "subscribe": s.subscribe}


def test_ensure__fresh_server_creates_stream_and_consumer_then_is_a_no_op(
    jetstream_bridge: Any,
) -> None:
    config = jetstream_bridge
    first = ensure_topology(durable=DURABLE)
    assert not first.in_sync
    assert sorted(stream_subjects(config.stream_name)) == sorted(subjects(config).values())
    dlq_stream = stream_answer(config.dlq_stream_name)["config"]
    assert dlq_stream["subjects"] == [config.subjects.dlq]
    assert (dlq_stream["retention"], dlq_stream["discard"]) == ("limits", "old")
    assert (dlq_stream["max_age"], dlq_stream["max_bytes"]) == (to_nanos(30 * 86400), -1)
    info = consumer_answer(config.stream_name, DURABLE)
    assert info["config"]["filter_subject"] == config.subjects.subscribe
    assert info["config"]["ack_policy"] == "explicit"
    assert info["config"]["max_deliver"] == 5

    second = ensure_topology(durable=DURABLE)
    assert second.in_sync, second.actions
    assert [a.kind for a in second.actions] == ["skip", "skip", "skip", "skip"]


def test_ensure__consumer_gets_ack_wait_in_nanoseconds_and_no_server_backoff(
    jetstream_bridge: Any, settings: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "ACK_WAIT": "45s",
        "BACKOFF": ["1s", "3s", "10s"],
        "MAX_DELIVER": 4,
        "MAX_ACK_PENDING": 200,
    }
    from jetstream_bridge.conf import get_config

    config = get_config()
    ensure_topology(durable=DURABLE)
    info = consumer_answer(config.stream_name, DURABLE)
    assert info["config"]["ack_wait"] == 45_000_000_000
    assert info["config"]["max_deliver"] == 4
    assert info["config"]["max_ack_pending"] == 200
    # BACKOFF is applied with delayed NAKs; a server backoff would override ack_wait.
    assert "backoff" not in info["config"]


def test_ensure__another_stream_owning_the_wildcard_keeps_its_subjects(
    jetstream_bridge: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = jetstream_bridge
    wildcard = f"{config.env}.data.sync.>"
    nats(
        lambda c: c.jsm.create_stream(
            {"name": "TEAM-WIDE", "subjects": [wildcard], "storage": "memory"}
        )
    )
    try:
        with caplog.at_level(logging.WARNING, logger="jetstream_bridge"):
            report = ensure_topology(durable=DURABLE)
        assert nats(lambda c: c.jsm.stream_info(config.stream_name)) is None  # nothing to add
        assert stream_subjects("TEAM-WIDE") == [wildcard]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("TEAM-WIDE" in w and config.subjects.subscribe in w for w in warnings)
        assert report.consumer_stream == "TEAM-WIDE"

        async def publish_and_fetch(conn: Connection) -> list[bytes]:
            await conn.publish(config.subjects.subscribe, b'{"hello":1}')
            deliveries = await conn.fetch("TEAM-WIDE", DURABLE, 10, timeout=2)
            for delivery in deliveries:
                await delivery.ack()
            return [d.data for d in deliveries]

        assert nats(publish_and_fetch) == [b'{"hello":1}']
    finally:
        nats(lambda c: c.jsm.delete_stream("TEAM-WIDE"))


def test_ensure__stream_owning_only_the_dlq_leaves_the_other_two(jetstream_bridge: Any) -> None:
    config = jetstream_bridge
    nats(
        lambda c: c.jsm.create_stream(
            {"name": "DLQ-OWNER", "subjects": [config.subjects.dlq], "storage": "memory"}
        )
    )
    try:
        report = ensure_topology(durable=DURABLE)
        assert sorted(stream_subjects(config.stream_name)) == sorted(
            [config.subjects.publish, config.subjects.subscribe]
        )
        assert report.consumer_stream == config.stream_name
        assert any(a.kind == "skip" and "DLQ-OWNER" in a.detail for a in report.actions)
    finally:
        nats(lambda c: c.jsm.delete_stream("DLQ-OWNER"))


def test_ensure__adding_a_subject_preserves_the_streams_own_settings(
    jetstream_bridge: Any,
) -> None:
    config = jetstream_bridge
    custom = {
        "name": config.stream_name,
        "subjects": [config.subjects.publish],
        "storage": "file",
        "num_replicas": 1,
        "max_age": to_nanos(3600),
        "max_bytes": 10_000_000,
        "duplicate_window": to_nanos(600),
        "description": "owned by the platform team",
        "metadata": {"team": "platform"},
    }
    nats(lambda c: c.jsm.create_stream(custom))
    ensure_topology()
    after = stream_answer(config.stream_name)["config"]
    assert sorted(after["subjects"]) == sorted(subjects(config).values())
    assert after["max_age"] == to_nanos(3600)
    assert after["max_bytes"] == 10_000_000
    assert after["duplicate_window"] == to_nanos(600)
    assert after["num_replicas"] == 1
    assert after["description"] == "owned by the platform team"
    assert after["metadata"]["team"] == "platform"


def test_ensure__covered_subjects_are_not_added_again(jetstream_bridge: Any) -> None:
    config = jetstream_bridge
    nats(
        lambda c: c.jsm.create_stream(
            {
                "name": config.stream_name,
                "subjects": [f"{config.env}.data.sync.*.*"],
                "storage": "memory",
            }
        )
    )
    report = ensure_topology()
    # publish and subscribe (5 tokens) are covered; the 4-token DLQ subject goes to its own.
    assert stream_subjects(config.stream_name) == [f"{config.env}.data.sync.*.*"]
    assert stream_subjects(config.dlq_stream_name) == [config.subjects.dlq]
    covered = [a.target for a in report.actions if "covered by" in a.detail]
    assert covered == [config.subjects.publish, config.subjects.subscribe]
    assert ensure_topology().in_sync


@pytest.mark.parametrize(
    ("existing", "difference"),
    [
        ({"filter_subject": "{env}.data.sync.other.alpha"}, "filter_subject"),
        ({"max_deliver": 9}, "max_deliver"),
        ({"backoff": [to_nanos(30), to_nanos(40)], "ack_wait": to_nanos(30)}, "backoff"),
        ({"ack_wait": to_nanos(5)}, "ack_wait"),
    ],
)
def test_ensure__existing_durable_is_reconciled_with_the_settings(
    jetstream_bridge: Any,
    existing: dict[str, Any],
    difference: str,
) -> None:
    config = jetstream_bridge
    ensure_topology()
    stale = {
        "durable_name": DURABLE,
        "ack_policy": "explicit",
        "filter_subject": config.subjects.subscribe,
        "ack_wait": to_nanos(30),
        "max_deliver": 5,
    }
    stale.update(
        {k: v.format(env=config.env) if isinstance(v, str) else v for k, v in existing.items()}
    )
    nats(lambda c: c.jsm.create_consumer(config.stream_name, stale))
    report = ensure_topology(durable=DURABLE)
    assert any(a.kind == "update-consumer" and difference in a.detail for a in report.actions)
    info = consumer_answer(config.stream_name, DURABLE)["config"]
    assert info["filter_subject"] == config.subjects.subscribe
    assert info["max_deliver"] == 5
    assert info["ack_wait"] == to_nanos(30)
    assert "backoff" not in info
    assert ensure_topology(durable=DURABLE).in_sync


def test_ensure__durable_the_server_cannot_update_is_recreated_from_its_ack_floor(
    jetstream_bridge: Any,
) -> None:
    config = jetstream_bridge
    ensure_topology()

    async def prepare(conn: Connection) -> None:
        # A push consumer cannot become a pull consumer: the server refuses the update.
        await conn.jsm.create_consumer(
            config.stream_name,
            {
                "durable_name": DURABLE,
                "ack_policy": "explicit",
                "deliver_subject": "push.here",
                "filter_subject": config.subjects.subscribe,
            },
        )

    nats(prepare)
    report = ensure_topology(durable=DURABLE)
    assert [a.kind for a in report.actions if a.change] == ["update-consumer", "recreate-consumer"]
    info = consumer_answer(config.stream_name, DURABLE)["config"]
    assert not info.get("deliver_subject")
    assert ensure_topology(durable=DURABLE).in_sync


def test_ensure_command__check_exit_codes(subprocess_env: dict[str, str]) -> None:
    differs = manage(
        "jetstream_ensure_topology", "--check", "--durable", DURABLE, env=subprocess_env
    )
    assert differs.returncode == 1, differs.stderr
    assert "create stream" in differs.stdout
    applied = manage("jetstream_ensure_topology", "--durable", DURABLE, env=subprocess_env)
    assert applied.returncode == 0, applied.stderr
    in_sync = manage(
        "jetstream_ensure_topology", "--check", "--durable", DURABLE, env=subprocess_env
    )
    assert in_sync.returncode == 0, in_sync.stderr
    assert "in sync" in in_sync.stdout
    down = manage(
        "jetstream_ensure_topology",
        "--check",
        env={**subprocess_env, "NATS_URLS": "nats://ops:hunter2@127.0.0.1:1"},
        timeout=30,
    )
    assert down.returncode == 2
    assert "127.0.0.1:1" in down.stderr
    assert "hunter2" not in down.stderr + down.stdout


def test_ensure_command__dry_run_changes_nothing(
    subprocess_env: dict[str, str], jetstream_bridge: Any
) -> None:
    result = manage("jetstream_ensure_topology", "--dry-run", env=subprocess_env)
    assert result.returncode == 0, result.stderr
    assert "plan (nothing changed)" in result.stdout
    assert nats(lambda c: c.jsm.stream_info(jetstream_bridge.stream_name)) is None


@pytest.mark.slow
def test_ensure__eight_processes_for_two_apps_converge_on_one_stream(
    subprocess_env: dict[str, str],
    jetstream_bridge: Any,
) -> None:
    config = jetstream_bridge
    processes = []
    for index in range(8):
        app, dest = ("alpha", "beta") if index % 2 else ("beta", "alpha")
        env = {**subprocess_env, "APP_NAME": app, "DESTINATION_APP": dest}
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "django",
                    "jetstream_ensure_topology",
                    "--durable",
                    f"{app}-events",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in processes]
    for process in processes:
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
    assert [code for code, _ in results] == [0] * 8, results
    streams = nats(lambda c: c.jsm.stream_names(subject=f"{config.env}.>"))
    assert sorted(streams) == sorted([config.stream_name, config.dlq_stream_name])
    assert sorted(stream_subjects(config.stream_name)) == sorted(
        [
            f"{config.env}.data.sync.alpha.beta",
            f"{config.env}.data.sync.beta.alpha",
        ]
    )
    assert stream_subjects(config.dlq_stream_name) == [f"{config.env}.data.sync.dlq"]
    for app in ("alpha", "beta"):
        assert nats(lambda c, a=app: c.jsm.consumer_info(config.stream_name, f"{a}-events"))
