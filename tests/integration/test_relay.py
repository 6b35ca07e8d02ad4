"""The relay (``manage.py jetstream_relay``) against a real nats-server and a real database.

Every test judges outcomes only: what the stream stores (read back through the JetStream API)
and the outbox rows' final state. Relays run as subprocesses wherever a process boundary is the
point (a crash, a signal, several instances at once).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import DatabaseError, connection, connections, transaction
from django.db.models import Max
from django.utils import timezone

from jetstream_bridge import Publisher
from jetstream_bridge.broker import Connection
from jetstream_bridge.conf import get_config
from jetstream_bridge.core.envelope import build_envelope
from jetstream_bridge.core.errors import NatsError
from jetstream_bridge.core.settings import BridgeConfig
from jetstream_bridge.fast_path import fast_path
from jetstream_bridge.models import OutboxEvent, OutboxStatus
from jetstream_bridge.outbox import ClaimedRow, LeaseFieldsMissing, OutboxStore
from jetstream_bridge.relay import Relay
from jetstream_bridge.runtime import reset_runtime
from jetstream_bridge.testing.server import NatsServer
from jetstream_bridge.topology import ensure_topology
from tests.helpers import manage, nats, spawn, stream_count, stream_messages, stream_msg_ids

pytestmark = pytest.mark.django_db(transaction=True)

# Relay timings short enough for tests. DUPLICATE_WINDOW must outlast RELAY_LEASE (E015): it
# is what turns a re-sent expired lease into a server-side duplicate instead of a second copy.
FAST_RELAY = {
    "RELAY_LEASE": "1s",
    "DUPLICATE_WINDOW": "2m",
    "RELAY_RETRY_BACKOFF": ["100ms"],
    "RELAY_POLL_INTERVAL": "100ms",
}


def configure(settings: Any, **overrides: Any) -> BridgeConfig:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, **overrides}
    return get_config()


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> BridgeConfig:
    """The session server, a unique ENV, fast relay timings and the stream in place."""
    config = configure(settings, **FAST_RELAY)
    ensure_topology()
    return config


@pytest.fixture
def own_nats(jetstream_bridge: Any, settings: Any) -> Iterator[NatsServer]:
    """A nats-server of this test's own, to stop and start again on the same port and store."""
    server = NatsServer().start()
    try:
        configure(
            settings,
            **FAST_RELAY,
            NATS_URLS=[server.url],
            CONNECT_TIMEOUT="1s",
            REQUEST_TIMEOUT="1s",
        )
        ensure_topology()
        yield server
    finally:
        reset_runtime()
        server.cleanup()


class RelayCli:
    """Run ``jetstream_relay`` in a subprocess configured like this test's bridge right now.

    ``subprocess_env`` captures the settings when the fixture is set up; tests here change
    them later (their own server's URL, the lease), so each start passes the current ones.
    """

    def __init__(self, base_env: dict[str, str]) -> None:
        self.base_env = base_env

    def env(self) -> dict[str, str]:
        overrides = json.dumps(dict(django_settings.JETSTREAM_BRIDGE))
        return {**self.base_env, "JSB_TEST_OVERRIDES": overrides}

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return manage("jetstream_relay", *args, env=self.env(), timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return spawn("jetstream_relay", *args, env=self.env())


@pytest.fixture
def relay_cli(subprocess_env: dict[str, str]) -> RelayCli:
    return RelayCli(subprocess_env)


def outbox_row(
    config: BridgeConfig, resource_id: str, *, subject: str | None = None, **fields: Any
) -> OutboxEvent:
    """An unsaved outbox row, as ``Publisher.publish`` would have written it."""
    envelope = build_envelope(
        producer=config.app_name,
        resource_type="user",
        event_type="updated",
        payload={"id": resource_id},
    )
    return OutboxEvent(
        event_id=envelope["event_id"],
        subject=subject or config.subjects.publish,
        payload=envelope,
        resource_type="user",
        resource_id=resource_id,
        event_type="updated",
        **fields,
    )


def write_backlog(config: BridgeConfig, count: int) -> None:
    OutboxEvent.objects.bulk_create(
        (outbox_row(config, f"u-{index}") for index in range(count)), batch_size=2000
    )


def wait_for(predicate: Callable[[], bool], *, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


def nats_answers() -> bool:
    try:
        nats(lambda c: c.round_trip())
    except NatsError:
        return False
    return True


def wait_until_due() -> None:
    """Sleep until every unsent row is due again: retry backoff over, leases expired."""
    latest = OutboxEvent.objects.exclude(status=OutboxStatus.SENT).aggregate(
        available=Max("available_at"), locked=Max("locked_until")
    )
    moments = [moment for moment in latest.values() if moment is not None]
    if moments:
        time.sleep(max(0.0, (max(moments) - timezone.now()).total_seconds()) + 0.05)


def wait_for_other_database_sessions_to_end() -> None:
    """Wait until the server has finished what a killed process had already sent it.

    PostgreSQL completes (and in autocommit, commits) a statement whose client died mid-way,
    and it and MySQL/MariaDB hold a dead client's transaction, row locks included, until they
    notice the closed socket; SQLite has no server, so a dead writer's work is already
    complete or rolled back.
    """
    others = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        "mysql": "SELECT count(*) FROM information_schema.processlist "
        "WHERE db = DATABASE() AND id <> CONNECTION_ID()",
    }.get(connection.vendor)
    if others is None:
        return

    def alone() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(others)
            return bool(cursor.fetchone()[0] == 0)

    wait_for(alone, timeout=10, what="the killed relay's database sessions to end")


def relayed(output: str) -> int:
    match = re.search(r"relayed (\d+) event\(s\), 0 failed", output)
    assert match, output
    return int(match.group(1))


def assert_each_row_in_the_stream_once(config: BridgeConfig, rows: int) -> None:
    """Every row is sent (none left pending, failed or publishing) and streamed exactly once."""
    statuses = Counter(OutboxEvent.objects.values_list("status", flat=True))
    assert statuses == {OutboxStatus.SENT: rows}
    assert stream_count(config.stream_name) == rows
    in_stream = stream_msg_ids(config.stream_name)
    assert len(set(in_stream)) == len(in_stream), "an event reached the stream twice"
    assert set(in_stream) == set(OutboxEvent.objects.values_list("event_id", flat=True))


@pytest.mark.parametrize("where", ["subprocess", "in_process"])
def test_relay__delivers_what_was_committed_while_nats_was_down(
    own_nats: NatsServer, relay_cli: RelayCli, where: str
) -> None:
    config = get_config()
    own_nats.stop()
    for batch in range(4):
        with transaction.atomic():
            for index in range(5):
                result = Publisher().publish(
                    resource_type="order", event_type="created", payload={"id": f"{batch}-{index}"}
                )
                assert result.status == "queued"
    assert fast_path().wait_idle(timeout=30)
    # The fast path tried after each commit, failed, and left every row to the relay.
    rows = list(OutboxEvent.objects.values_list("status", "last_error"))
    assert len(rows) == 20
    assert {status for status, _ in rows} == {OutboxStatus.FAILED}
    assert all(error for _, error in rows)

    own_nats.start()
    wait_until_due()
    if where == "subprocess":
        result = relay_cli.run("--once")
        assert result.returncode == 0, result.stderr
        assert relayed(result.stdout) == 20
        wait_for(nats_answers, what="the test's own connection to reconnect")
    else:
        wait_for(nats_answers, what="the shared connection to reconnect")
        stats = Relay().run(once=True)
        assert (stats.sent, stats.failed) == (20, 0)
    assert_each_row_in_the_stream_once(config, 20)


def test_relay__reclaims_expired_lease(bridge: BridgeConfig, settings: Any) -> None:
    # A longer lease here so "before expiry" cannot race a slow machine.
    config = configure(settings, RELAY_LEASE="2s")
    write_backlog(config, 50)
    # A relay claims a batch and publishes it, then dies before recording anything.
    token, claimed = OutboxStore(config).claim(100)
    assert len(claimed) == 50
    acks = nats(lambda c: c.publish_many([(row.subject, row.body, row.headers) for row in claimed]))
    original_seq = {row.pk: ack.seq for row, ack in zip(claimed, acks, strict=True)}
    assert stream_count(config.stream_name) == 50

    # While the lease holds, another relay leaves the rows alone.
    assert Relay().run(once=True).sent == 0
    assert OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHING, locked_by=token).count() == 50

    wait_until_due()
    stats = Relay().run(once=True)
    assert (stats.sent, stats.failed) == (50, 0)
    assert_each_row_in_the_stream_once(config, 50)
    # The re-send was a server-side duplicate: each row records its original stream sequence.
    assert dict(OutboxEvent.objects.values_list("pk", "stream_seq")) == original_seq

    # Should the dead relay wake up, its lost lease fences off its late results.
    late = [(row.pk, 999_999) for row in claimed]
    assert OutboxStore(config).mark_sent(late, token=token) == 0
    late_failures = [(row.pk, 1, "late") for row in claimed]
    assert OutboxStore(config).mark_failed(late_failures, token=token) == 0
    assert set(OutboxEvent.objects.values_list("stream_seq", flat=True)) == set(
        original_seq.values()
    )


def test_relay__resends_after_a_relay_is_killed_mid_run(
    bridge: BridgeConfig, relay_cli: RelayCli
) -> None:
    rows = 3000
    write_backlog(bridge, rows)
    # Small batches and few acks in flight keep the first relay busy long enough to kill it.
    first = relay_cli.start("--batch-size", "20", "--max-in-flight", "4")
    try:
        wait_for(
            lambda: stream_count(bridge.stream_name) >= 200 or first.poll() is not None,
            what="the first relay to publish",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        _, stderr = first.communicate(timeout=10)
    assert first.returncode == -signal.SIGKILL, stderr
    wait_for_other_database_sessions_to_end()
    at_kill = stream_count(bridge.stream_name)
    assert at_kill < rows, "the relay finished before it was killed; raise the backlog"
    recorded_by_first = OutboxEvent.objects.filter(status=OutboxStatus.SENT).count()
    if connection.features.has_select_for_update_skip_locked:
        # Its batches were locked in transactions that died with it: nothing is left held,
        # and every unsent row is due at once, without waiting for a lease to run out.
        assert not OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHING).exists()
        assert OutboxEvent.objects.due().count() == rows - recorded_by_first
    else:
        # The dead relay still holds leases on the batches it had in hand.
        assert OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHING).exists()
        wait_until_due()
    second = relay_cli.run("--once")
    assert second.returncode == 0, second.stderr
    assert relayed(second.stdout) == rows - recorded_by_first
    assert_each_row_in_the_stream_once(bridge, rows)


def test_relay__a_relay_stalled_holding_row_locks_is_cut_off_after_the_lease(
    bridge: BridgeConfig, settings: Any
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL ends a session idle in its transaction; the others do not")
    # The cut-off is RELAY_LEASE, but never less than two publish timeouts plus a second.
    config = configure(settings, RELAY_LEASE="1s", REQUEST_TIMEOUT="500ms")
    write_backlog(config, 20)
    locked = threading.Event()
    release = threading.Event()
    outcome: dict[str, Any] = {}

    def stalled_relay() -> None:
        # Locks a batch, then hangs (a stopped process, a network that never answers).
        try:
            with transaction.atomic():
                outcome["held"] = len(OutboxStore(config).lock(100))
                locked.set()
                release.wait(10)
                OutboxEvent.objects.count()  # wakes up and carries on
        except Exception as exc:
            outcome["error"] = exc
        finally:
            locked.set()
            connections.close_all()

    thread = threading.Thread(target=stalled_relay)
    thread.start()
    try:
        assert locked.wait(10)
        assert outcome.get("held") == 20
        # Another relay skips the locked rows instead of waiting for them.
        assert Relay().run(once=True).sent == 0
        time.sleep(2.5)  # past the cut-off: PostgreSQL has ended the stalled session
        stats = Relay().run(once=True)
    finally:
        release.set()
        thread.join(10)
    assert (stats.sent, stats.failed) == (20, 0)
    assert_each_row_in_the_stream_once(config, 20)
    # The stalled relay finds its transaction gone: it can record nothing late.
    assert isinstance(outcome.get("error"), DatabaseError), outcome


def test_lock_batch__only_the_relays_own_transaction_skips_waiting_for_the_wal_flush(
    bridge: BridgeConfig,
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")
    write_backlog(bridge, 2)

    def synchronous_commit() -> str:
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            return str(cursor.fetchone()[0])

    with transaction.atomic():  # a relay round: its own transaction
        assert len(OutboxStore(bridge).lock(1)) == 1
        assert synchronous_commit() == "off"
    assert synchronous_commit() == "on"  # set for that transaction only
    with transaction.atomic():  # a caller's transaction (the admin's, say) around a round
        with transaction.atomic():
            assert len(OutboxStore(bridge).lock(1)) == 1
            assert synchronous_commit() == "on"


def test_relay__minimal_custom_outbox_model(bridge: BridgeConfig, settings: Any) -> None:
    from tests.testapp.models import MinimalOutbox

    config = configure(settings, OUTBOX_MODEL="testapp.MinimalOutbox", OUTBOX_FAST_PATH=False)
    for index in range(3):
        Publisher().publish(resource_type="user", event_type="created", payload={"id": index})
    if not connection.features.has_select_for_update_skip_locked:
        # Leases need columns the model lacks; the error says which and what to add.
        with pytest.raises(LeaseFieldsMissing, match="locked_by, locked_until"):
            Relay().run(once=True)
        return
    # Row locks need no extra columns: the three required ones are enough.
    stats = Relay().run(once=True)
    assert (stats.sent, stats.failed) == (3, 0)
    assert set(MinimalOutbox.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}
    in_stream = stream_msg_ids(config.stream_name)
    assert sorted(in_stream) == sorted(MinimalOutbox.objects.values_list("event_id", flat=True))


def test_relay__drain_sends_a_row_that_becomes_due_behind_its_cursor(bridge: BridgeConfig) -> None:
    write_backlog(bridge, 30)
    first = OutboxEvent.objects.order_by("pk").values_list("pk", flat=True)[0]
    later = timezone.now() + timedelta(hours=1)
    OutboxEvent.objects.filter(pk=first).update(status=OutboxStatus.FAILED, available_at=later)

    class LateRow(Relay):
        def _record(self, token: str | None, rows: list[ClaimedRow], results: Any) -> None:
            super()._record(token, rows, results)
            # Mid-drain, the lowest key becomes due (its retry backoff ends), behind the
            # keys this drain has already claimed past.
            OutboxEvent.objects.filter(pk=first).update(available_at=timezone.now())

    stats = LateRow(batch_size=10).run(once=True)
    assert (stats.sent, stats.failed) == (30, 0)
    assert_each_row_in_the_stream_once(bridge, 30)


@pytest.mark.slow
def test_relay__three_relays_drain_a_backlog_without_sending_an_event_twice(
    bridge: BridgeConfig, relay_cli: RelayCli
) -> None:
    if not connection.features.has_select_for_update_skip_locked:
        pytest.skip(
            "concurrent relays are a SELECT ... FOR UPDATE SKIP LOCKED test; "
            f"{connection.vendor} has no SKIP LOCKED (it serialises the claims instead)"
        )
    rows = 20_000
    write_backlog(bridge, rows)
    started = time.monotonic()
    relays = [relay_cli.start("--once") for _ in range(3)]
    outputs = [relay.communicate(timeout=120) for relay in relays]
    elapsed = time.monotonic() - started
    for relay, (_, stderr) in zip(relays, outputs, strict=True):
        assert relay.returncode == 0, stderr
    per_relay = [relayed(stdout) for stdout, _ in outputs]
    # Each row was recorded by exactly one relay: the lease fences every other.
    assert sum(per_relay) == rows
    assert_each_row_in_the_stream_once(bridge, rows)
    print(f"\n3 relays: {rows} rows in {elapsed:.1f}s ({rows / elapsed:.0f}/s), split {per_relay}")


def test_relay__ordering_keeps_each_resource_in_creation_order(
    bridge: BridgeConfig, settings: Any
) -> None:
    # A retry backoff longer than one drain, so the failing event is tried once per run.
    config = configure(
        settings, OUTBOX_ORDERING=True, OUTBOX_FAST_PATH=False, RELAY_RETRY_BACKOFF=["1s"]
    )
    uncaptured = f"{config.env}.data.sync.{config.app_name}.elsewhere"
    # Interleaved; resource "b" starts with an event whose subject no stream captures yet.
    plan = [("b", uncaptured), ("a", None), ("b", None), ("a", None), ("a", None), ("b", None)]
    events: dict[str, list[str]] = {"a": [], "b": []}
    for resource, subject in plan:
        row = outbox_row(config, resource, subject=subject)
        row.save()
        events[resource].append(row.event_id)

    def in_stream() -> list[str]:
        return [m.headers["Nats-Msg-Id"] for m in stream_messages(config.stream_name)]

    def state(event_id: str) -> tuple[str, int]:
        row = OutboxEvent.objects.get(event_id=event_id)
        return row.status, row.attempts

    Relay().run(once=True)
    # "a" is not held up by "b"'s failure, and arrives in creation order.
    assert in_stream() == events["a"]
    b_first, b_second, b_third = events["b"]
    assert state(b_first) == (OutboxStatus.FAILED, 1)
    assert "no stream captures" in OutboxEvent.objects.get(event_id=b_first).last_error
    # "b"'s later events wait behind its failing first one; they are not even attempted.
    assert state(b_second) == state(b_third) == (OutboxStatus.PENDING, 0)

    # The operator fixes the topology: now the stream captures the first event's subject too.
    async def capture(conn: Connection) -> None:
        info = await conn.jsm.stream_info(config.stream_name)
        await conn.jsm.update_stream(info.config.with_subjects([*info.config.subjects, uncaptured]))

    nats(capture)
    wait_until_due()
    stats = Relay().run(once=True)
    assert (stats.sent, stats.failed) == (3, 0)
    assert in_stream() == events["a"] + events["b"]
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}


def test_outbox_ordering__fast_path_does_not_overtake_an_unsent_earlier_event(
    own_nats: NatsServer, settings: Any
) -> None:
    config = configure(settings, OUTBOX_ORDERING=True)
    # The fast path fails the first event, then could publish the second at once: it must not.
    own_nats.stop()
    first = Publisher().publish(resource_type="user", event_type="created", payload={"id": "r1"})
    assert fast_path().wait_idle(timeout=30)
    assert OutboxEvent.objects.get().status == OutboxStatus.FAILED
    own_nats.start()
    wait_for(nats_answers, what="the shared connection to reconnect")
    second = Publisher().publish(resource_type="user", event_type="updated", payload={"id": "r1"})
    assert fast_path().wait_idle(timeout=30)
    # Left to the relay, which sends the resource's events in order.
    assert OutboxEvent.objects.get(event_id=second.event_id).status == OutboxStatus.PENDING
    wait_until_due()
    Relay().run(once=True)
    in_stream = [m.headers["Nats-Msg-Id"] for m in stream_messages(config.stream_name)]
    assert in_stream == [first.event_id, second.event_id]


def test_relay__purge_sent_after_deletes_old_sent_rows_and_keeps_unsent_ones(
    bridge: BridgeConfig, relay_cli: RelayCli
) -> None:
    now = timezone.now()
    long_ago = now - timedelta(hours=1)
    old_sent = [outbox_row(bridge, f"old-{i}", status="sent", sent_at=long_ago) for i in range(3)]
    # Younger than the cutoff even after a slow subprocess start.
    just_sent = outbox_row(bridge, "new", status="sent", sent_at=now)
    # Unsent rows are kept however old they are.
    pending = [outbox_row(bridge, f"p-{i}", enqueued_at=long_ago) for i in range(2)]
    failed = outbox_row(
        bridge,
        "f",
        status="failed",
        enqueued_at=long_ago,
        available_at=now + timedelta(hours=1),
        last_error="PublishFailed: earlier",
    )
    OutboxEvent.objects.bulk_create([*old_sent, just_sent, *pending, failed])

    result = relay_cli.run("--purge-sent-after", "10m", "--once")
    assert result.returncode == 0, result.stderr
    assert "purged 3 sent row(s) older than 10m" in result.stdout
    assert relayed(result.stdout) == 2  # then it relayed what was due, as always
    remaining = dict(OutboxEvent.objects.values_list("event_id", "status"))
    assert remaining == {
        just_sent.event_id: OutboxStatus.SENT,
        pending[0].event_id: OutboxStatus.SENT,
        pending[1].event_id: OutboxStatus.SENT,
        failed.event_id: OutboxStatus.FAILED,
    }
    assert stream_count(bridge.stream_name) == 2


def test_relay__sigterm_stops_a_running_relay_with_exit_code_0(
    bridge: BridgeConfig, settings: Any, relay_cli: RelayCli
) -> None:
    configure(settings, OUTBOX_FAST_PATH=False)
    write_backlog(bridge, 5)
    relay = relay_cli.start()
    try:
        wait_for(
            lambda: (
                OutboxEvent.objects.filter(status=OutboxStatus.SENT).count() == 5
                or relay.poll() is not None
            ),
            what="the relay to drain the backlog",
        )
        # Written while it idles: it wakes (NOTIFY on PostgreSQL, polling elsewhere) and sends.
        for index in range(5):
            Publisher().publish(resource_type="user", event_type="updated", payload={"id": index})
        wait_for(
            lambda: (
                OutboxEvent.objects.filter(status=OutboxStatus.SENT).count() == 10
                or relay.poll() is not None
            ),
            what="the relay to send events written after it started",
        )
        stopping = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        stdout, stderr = relay.communicate(timeout=10)
        took = time.monotonic() - stopping
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.communicate()
    assert relay.returncode == 0, stderr
    assert took < 3, f"the relay took {took:.1f}s to stop"
    assert relayed(stdout) == 10
    assert_each_row_in_the_stream_once(bridge, 10)


def test_relay__unreachable_nats_records_failures_instead_of_holding_leases(
    own_nats: NatsServer,
) -> None:
    config = get_config()
    own_nats.stop()
    reset_runtime()  # a fresh process: the very first connect fails, before any publish
    write_backlog(config, 5)
    stats = Relay().run(once=True)
    rows = list(OutboxEvent.objects.all())
    assert stats.failed == 5
    assert {row.status for row in rows} == {OutboxStatus.FAILED}
    assert all(row.locked_by is None for row in rows)
    assert all("NatsUnavailable" in (row.last_error or "") for row in rows)
