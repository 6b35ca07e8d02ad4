"""The *Dead letters* admin through Django's test client, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.test import Client

from jetstream_bridge import dlq
from jetstream_bridge.admin import DeadLetterAdmin
from jetstream_bridge.conf import get_config
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core import dead_letter as letters
from jetstream_bridge.topology import ensure_topology
from tests.admin_data import dead_letter, staff_user
from tests.helpers import nats, publish_incoming, stream_messages
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db

DEAD_LETTERS = "/admin/jetstream_bridge/deadletter/"
REPLAY = f"{DEAD_LETTERS}replay/"
PURGE = f"{DEAD_LETTERS}purge/"
STATUS = "/admin/jetstream_bridge/outboxevent/status/"
DURABLE = "alpha-events"


@pytest.fixture
def bridge(jetstream_bridge: Any) -> Any:
    # The durable the letters name: a replay is for the consumer that dead-lettered it only.
    ensure_topology(durable=DURABLE)
    return jetstream_bridge


@pytest.fixture
def nats_down(settings: Any) -> str:
    """Point the bridge at a port nobody listens on, with credentials in the URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "NATS_URLS": [f"nats://bob:hunter2@127.0.0.1:{port}"],
        "CONNECT_TIMEOUT": "1s",
    }
    return "hunter2"


def login(user: Any, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def seqs_on_page(response: Any) -> list[int]:
    return [row.seq for row in response.context["rows"]]


def dlq_seqs() -> list[int]:
    return [m.seq for m in dlq.list_dead_letters()[1]]


def publish_raw_letter(server_url: str, subject: str, header_block: bytes, body: bytes) -> None:
    """Publish with bytes no client library would send: the wire as a hostile peer writes it."""
    parts = urlsplit(server_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.recv(4096)  # INFO
        total = len(header_block) + len(body)
        sock.sendall(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
            + f"HPUB {subject} {len(header_block)} {total}\r\n".encode()
            + header_block
            + body
            + b"\r\nPING\r\n"
        )
        answer = b""
        while b"PONG" not in answer:
            answer += sock.recv(4096)
        assert b"-ERR" not in answer, answer


# -- list and filters ---------------------------------------------------------------------------


def test_dead_letters__list_shows_each_letter_and_the_index_links_to_it(
    admin_client: Client, bridge: Any
) -> None:
    seq, event_id = dead_letter(bridge, reason="rejected", consumer=DURABLE)
    other, _ = dead_letter(bridge, reason="max_deliver", consumer="beta-events")
    response = admin_client.get(DEAD_LETTERS)
    assert response.status_code == 200
    assert seqs_on_page(response) == [seq, other]
    assert response.context["depth"].messages == 2
    page = response.content.decode()
    row = page[page.index(f'data-seq="{seq}"') :].split("</tr>")[0]
    for text in ("rejected", DURABLE, bridge.subjects.subscribe, event_id, "no key"):
        assert text in row
    assert "RejectMessage: customer 42 does not exist" in row
    assert f'href="{DEAD_LETTERS}{seq}/?next=' in row
    assert 'id="jsb-replay-selected"' in page  # a superuser may act
    assert 'id="jsb-purge-selected"' in page

    index = admin_client.get("/admin/").content.decode()
    assert f'href="{DEAD_LETTERS}"' in index
    assert "Dead letters" in index


def test_dead_letters__filters_by_reason_consumer_and_age(
    admin_client: Client, bridge: Any
) -> None:
    old, _ = dead_letter(bridge, reason="rejected", consumer="alpha-events")
    time.sleep(1.5)
    newer = [
        dead_letter(bridge, reason="malformed", consumer="alpha-events")[0],
        dead_letter(bridge, reason="rejected", consumer="beta-events")[0],
    ]

    def shown(**filters: str) -> list[int]:
        response = admin_client.get(DEAD_LETTERS, filters)
        assert response.status_code == 200
        return seqs_on_page(response)

    assert shown(reason="rejected") == [old, newer[1]]
    assert shown(consumer="alpha-events") == [old, newer[0]]
    assert shown(reason="rejected", consumer="alpha-events") == [old]
    assert shown(older_than="1s") == [old]
    assert shown(newer_than="1s") == newer
    assert shown(reason="no_handler") == []

    bad = admin_client.get(DEAD_LETTERS, {"older_than": "soon"})
    assert bad.status_code == 200
    assert "&#x27;soon&#x27; is not a duration" in bad.content.decode()
    assert "rows" not in bad.context


def test_dead_letters__pages_follow_a_cursor_and_read_at_most_scan_limit_letters(
    admin_client: Client, bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DeadLetterAdmin, "list_per_page", 3)
    seqs = [dead_letter(bridge, reason="rejected")[0] for _ in range(7)]
    first = admin_client.get(DEAD_LETTERS)
    assert seqs_on_page(first) == seqs[:3]
    assert first.context["next_url"] == f"?after={seqs[2]}"
    second = admin_client.get(DEAD_LETTERS + first.context["next_url"])
    assert seqs_on_page(second) == seqs[3:6]
    assert second.context["first_url"] == "?"
    last = admin_client.get(DEAD_LETTERS + second.context["next_url"])
    assert seqs_on_page(last) == seqs[6:]
    assert last.context["next_url"] is None

    # A filter that matches the first and the last letter only: with room to read four
    # letters a page, the first page stops after the fourth and says where to go on.
    monkeypatch.setattr(DeadLetterAdmin, "scan_limit", 4)
    rare, _ = dead_letter(bridge, reason="no_handler")
    for seq in seqs[1:]:
        dlq.purge(dlq.Selection(seqs=frozenset({seq})))
    for _ in range(5):
        dead_letter(bridge, reason="rejected")
    rare_last, _ = dead_letter(bridge, reason="no_handler")
    page = admin_client.get(DEAD_LETTERS, {"reason": "no_handler"})
    assert seqs_on_page(page) == [rare]
    after = int(page.context["next_url"].rsplit("after=", 1)[1])
    assert rare < after < rare_last
    assert page.context["next_url"] == f"?reason=no_handler&after={after}"
    rest = admin_client.get(DEAD_LETTERS + page.context["next_url"])
    assert seqs_on_page(rest) == [rare_last]
    assert rest.context["next_url"] is None


# -- detail ---------------------------------------------------------------------------------


def test_dead_letters__detail_shows_every_header_and_the_indented_body(
    admin_client: Client, bridge: Any
) -> None:
    seq, event_id = dead_letter(bridge, reason="rejected", consumer=DURABLE)
    response = admin_client.get(f"{DEAD_LETTERS}{seq}/", {"next": f"{DEAD_LETTERS}?reason=x"})
    assert response.status_code == 200
    page = response.content.decode()
    for header in (letters.REASON, letters.ERROR_CLASS, letters.ORIGINAL_SUBJECT, "Nats-Msg-Id"):
        assert f"<code>{header}</code>" in page
    assert f"<td>{event_id}</td>" in page
    assert "  &quot;payload&quot;: {\n    &quot;currency&quot;: &quot;EUR&quot;," in page
    assert "JSON, indented" in page
    assert f'<input type="hidden" name="next" value="{DEAD_LETTERS}?reason=x">' in page

    assert admin_client.get(f"{DEAD_LETTERS}{2**64}/").status_code == 404
    missing = admin_client.get(f"{DEAD_LETTERS}999999/")
    assert missing.status_code == 404
    assert 'id="jsb-dlq-missing"' in missing.content.decode()
    # Letters live in the DLQ's own stream: an event's sequence in the events' stream names
    # no letter (the DLQ stream ends at the one letter above).
    publish_incoming(bridge, 2)
    event = stream_messages(bridge.stream_name)[-1]
    assert event.seq > seq
    assert admin_client.get(f"{DEAD_LETTERS}{event.seq}/").status_code == 404


def test_dead_letters__detail_in_the_shared_layout_is_404_for_an_event(
    admin_client: Client, jetstream_bridge: Any, settings: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "DLQ_STREAM_NAME": jetstream_bridge.stream_name,
    }
    ensure_topology()
    bridge = get_config()
    seq, event_id = dead_letter(bridge)
    publish_incoming(bridge, 1)  # the same stream: the next sequence holds an event
    event = stream_messages(bridge.stream_name)[-1]
    assert event.seq > seq
    assert event.subject != bridge.subjects.dlq
    shown = admin_client.get(f"{DEAD_LETTERS}{seq}/")
    assert (shown.status_code, shown.context["letter"] is not None) == (200, True)
    assert event_id in shown.content.decode()
    assert admin_client.get(f"{DEAD_LETTERS}{event.seq}/").status_code == 404


def test_dead_letters__hostile_headers_and_body_are_shown_escaped(
    admin_client: Client, bridge: Any, nats_server: Any
) -> None:
    script = b"<script>alert('x')</script>"
    header_block = (
        b"NATS/1.0\r\n"
        b"Jsb-Reason: " + script + b"\xff\xfe\r\n"
        b"Jsb-Consumer: evil\xe2\x80\xaeexe.txt\r\n"
        b"Jsb-Stream-Seq: " + script + b"\r\n"
        b"X-Note: <img src=x onerror=alert(1)>\r\n\r\n"
    )
    body = b"\x00\xff" + script + b"\xc3"
    publish_raw_letter(nats_server.url, bridge.subjects.dlq, header_block, body)
    [letter] = dlq.list_dead_letters()[1]

    listing = admin_client.get(DEAD_LETTERS)
    assert listing.status_code == 200
    detail = admin_client.get(f"{DEAD_LETTERS}{letter.seq}/")
    assert detail.status_code == 200
    for page in (listing.content.decode(), detail.content.decode()):
        assert "<script>" not in page
        assert "<img" not in page
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
        assert "\u202e" not in page  # shown as an escape, not applied
        assert "evil\\u202eexe.txt" in page
    shown = detail.content.decode()
    assert "\ufffd\ufffd" in shown  # the invalid UTF-8 of a header, replaced
    assert "&lt;img src=x onerror=alert(1)&gt;" in shown
    assert "not UTF-8: shown as escaped bytes" in shown
    assert "b&quot;\\x00\\xff&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;\\xc3&quot;" in shown
    assert 'id="jsb-dlq-invalid"' in shown  # Jsb-Stream-Seq does not parse
    assert "invalid header" in listing.content.decode()


# -- actions ----------------------------------------------------------------------------------


def test_dead_letters__replay_one_republishes_it_logs_who_and_leaves_the_dlq(
    admin_client: Client, admin_user: Any, bridge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    seq, event_id = dead_letter(bridge)
    kept, _ = dead_letter(bridge)
    with caplog.at_level(logging.INFO, logger="jetstream_bridge.admin"):
        response = admin_client.post(
            REPLAY, {"seq": [str(seq)], "next": f"{DEAD_LETTERS}?reason=rejected"}
        )
    assert response.status_code == 302
    assert response["Location"] == f"{DEAD_LETTERS}?reason=rejected"
    copy = stream_messages(bridge.stream_name)[-1]
    assert (copy.subject, copy.headers[letters.REPLAY_OF]) == (bridge.subjects.subscribe, str(seq))
    # For the consumer that dead-lettered it only, like `jetstream_dlq replay`.
    assert copy.headers[letters.REPLAY_FOR] == DURABLE
    assert f'"event_id":"{event_id}"' in copy.data.decode()
    assert dlq_seqs() == [kept]
    followed = admin_client.get(response["Location"])
    assert messages_of(followed) == [
        f"Replayed 1 dead letter(s): {seq} as stream sequence {copy.seq}."
    ]

    entry = LogEntry.objects.get()
    assert (entry.user, entry.object_id, entry.action_flag) == (admin_user, str(seq), CHANGE)
    assert entry.change_message == f"Replayed as stream sequence {copy.seq}."
    assert entry.content_type.model == "deadletter"
    [record] = [
        r for r in caplog.records if r.getMessage() == "dead letters replayed from the admin"
    ]
    assert (record.user, record.action, record.seqs, record.replayed, record.failed) == (
        admin_user.username,
        "replay",
        [seq],
        [seq],
        [],
    )


def test_dead_letters__replay_selected_reports_letters_it_must_not_replay(
    admin_client: Client, bridge: Any
) -> None:
    good, _ = dead_letter(bridge)
    elsewhere, _ = dead_letter(bridge, subject=f"{bridge.env}.data.sync.gamma.delta")
    unknown, _ = dead_letter(bridge, consumer="beta-events")  # no such durable on the subject
    response = admin_client.post(
        REPLAY, {"seq": [str(good), str(elsewhere), str(unknown), "999999"]}, follow=True
    )
    [done, refused, no_durable, gone] = messages_of(response)
    assert done.startswith(f"Replayed 1 dead letter(s): {good} as stream sequence ")
    assert refused.startswith(f"Dead letter {elsewhere} not replayed: refusing to publish to")
    assert no_durable.startswith(f"Dead letter {unknown} not replayed: no durable 'beta-events'; ")
    assert gone == "1 dead letter(s) were gone already."
    assert dlq_seqs() == [elsewhere, unknown]
    assert LogEntry.objects.get().object_id == str(good)

    bad = admin_client.post(REPLAY, {"seq": ["1; DROP"]}, follow=True)
    assert messages_of(bad) == ["Nothing done: '1; DROP' is not a stream sequence."]
    assert admin_client.get(REPLAY).status_code == 405


@pytest.mark.django_db(transaction=True)
def test_dead_letters__replay_after_fixing_the_handler_runs_the_event_once(
    admin_client: Client, settings: Any, jetstream_bridge: Any
) -> None:
    from tests.helpers import fast_retry_bridge

    bridge = fast_retry_bridge(settings, DURABLE)
    [event_id] = publish_incoming(bridge, 1, payload={"reject": True})

    def consume(handler: Any) -> Any:
        consumer = Consumer(durable_name=DURABLE, handler=handler, stop_when_idle=True)
        return asyncio.run(consumer.run_async())

    assert consume(handlers.rejects).dead_lettered == 1
    [letter] = dlq.list_dead_letters()[1]
    admin_client.post(REPLAY, {"seq": [str(letter.seq)]})
    assert dlq.depth().messages == 0
    consume(handlers.record_effect)
    assert list(Effect.objects.values_list("event_id", flat=True)) == [event_id]


def test_dead_letters__purge_one_asks_first_then_deletes_and_logs_who(
    admin_client: Client, admin_user: Any, bridge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    seq, _ = dead_letter(bridge)
    kept, _ = dead_letter(bridge)
    asked = admin_client.post(PURGE, {"seq": [str(seq)], "next": DEAD_LETTERS})
    assert asked.status_code == 200
    page = asked.content.decode()
    assert "Delete <strong>1</strong> dead letter for good?" in page
    assert f'<input type="hidden" name="seq" value="{seq}">' in page
    assert dlq_seqs() == [seq, kept]  # nothing deleted before the confirmation
    assert not LogEntry.objects.exists()

    with caplog.at_level(logging.INFO, logger="jetstream_bridge.admin"):
        done = admin_client.post(
            PURGE,
            {"seq": [str(seq)], "upto_seq": asked.context["upto_seq"], "confirm": "yes"},
            follow=True,
        )
    assert messages_of(done) == ["Purged 1 dead letter(s)."]
    assert dlq_seqs() == [kept]
    entry = LogEntry.objects.get()
    assert (entry.user, entry.object_id, entry.action_flag) == (admin_user, str(seq), DELETION)
    [record] = [r for r in caplog.records if r.getMessage() == "dead letters purged from the admin"]
    assert (record.user, record.action, record.seqs, record.purged) == (
        admin_user.username,
        "purge",
        [seq],
        1,
    )


def test_dead_letters__purge_matching_deletes_only_what_was_confirmed(
    admin_client: Client, admin_user: Any, bridge: Any
) -> None:
    rejected = [dead_letter(bridge, reason="rejected")[0] for _ in range(2)]
    malformed, _ = dead_letter(bridge, reason="malformed")
    filters = {"matching": "1", "reason": "rejected", "consumer": "", "next": DEAD_LETTERS}
    asked = admin_client.post(PURGE, filters)
    assert asked.status_code == 200
    page = asked.content.decode()
    assert "Delete <strong>2</strong> dead letters for good?" in page
    assert "Every letter matching: <strong>reason=rejected</strong>" in page
    assert asked.context["upto_seq"] == malformed  # the stream's last sequence when asked
    assert dlq_seqs() == [*rejected, malformed]
    # A letter that arrives after the question was asked is not part of the answer.
    late, _ = dead_letter(bridge, reason="rejected")
    done = admin_client.post(
        PURGE, {**filters, "upto_seq": asked.context["upto_seq"], "confirm": "yes"}, follow=True
    )
    assert messages_of(done) == ["Purged 2 dead letter(s)."]
    assert dlq_seqs() == [malformed, late]
    entry = LogEntry.objects.get()
    assert (entry.user, entry.object_id, entry.action_flag) == (admin_user, None, DELETION)
    assert entry.change_message == (
        f"Purged 2 dead letter(s) matching reason=rejected, up to stream sequence {malformed}."
    )

    nothing = admin_client.post(PURGE, {**filters, "reason": "no_handler"}, follow=True)
    assert messages_of(nothing) == ["No dead letters match; nothing purged."]


def test_dead_letters__actions_need_their_permission_and_a_csrf_token(
    bridge: Any, admin_user: Any
) -> None:
    seq, _ = dead_letter(bridge)
    viewer = login(staff_user("viewer", perms=("view_deadletter",)))
    listing = viewer.get(DEAD_LETTERS)
    assert listing.status_code == 200
    assert seqs_on_page(listing) == [seq]
    page = listing.content.decode()
    for control in ('name="seq"', "jsb-replay-selected", "jsb-purge-selected", "Purge every"):
        assert control not in page
    detail = viewer.get(f"{DEAD_LETTERS}{seq}/").content.decode()
    assert 'id="jsb-replay"' not in detail
    assert 'id="jsb-purge"' not in detail
    assert viewer.post(REPLAY, {"seq": [str(seq)]}).status_code == 403
    assert viewer.post(PURGE, {"seq": [str(seq)]}).status_code == 403
    assert (
        viewer.post(PURGE, {"seq": [str(seq)], "upto_seq": seq, "confirm": "yes"}).status_code
        == 403
    )

    replayer = login(staff_user("replayer", perms=("view_deadletter", "replay_deadletter")))
    page = replayer.get(DEAD_LETTERS).content.decode()
    assert "jsb-replay-selected" in page
    assert "jsb-purge-selected" not in page
    assert replayer.post(PURGE, {"seq": [str(seq)]}).status_code == 403

    outsider = login(staff_user("outsider"))
    assert outsider.get(DEAD_LETTERS).status_code == 403
    assert outsider.get(f"{DEAD_LETTERS}{seq}/").status_code == 403
    assert DEAD_LETTERS not in outsider.get("/admin/").content.decode()

    strict = login(admin_user, enforce_csrf_checks=True)
    assert strict.post(REPLAY, {"seq": [str(seq)]}).status_code == 403
    assert strict.post(PURGE, {"seq": [str(seq)]}).status_code == 403
    assert dlq_seqs() == [seq]
    assert not LogEntry.objects.exists()


def test_dead_letters__next_never_leaves_the_site(admin_client: Client, bridge: Any) -> None:
    seq, _ = dead_letter(bridge)
    response = admin_client.post(REPLAY, {"seq": [str(seq)], "next": "https://evil.example/"})
    assert response["Location"] == DEAD_LETTERS


# -- NATS down, status page ---------------------------------------------------------------------


def test_dead_letters__nats_down_shows_an_error_without_credentials(
    admin_client: Client, nats_down: str
) -> None:
    for url in (DEAD_LETTERS, f"{DEAD_LETTERS}5/"):
        response = admin_client.get(url)
        assert response.status_code == 200
        page = response.content.decode()
        assert 'id="jsb-dlq-error"' in page
        assert "NATS is unreachable: NatsUnavailable" in page
        assert "bob:***@127.0.0.1" in page
        assert nats_down not in page
    replay = admin_client.post(REPLAY, {"seq": ["5"]}, follow=True)
    [message] = messages_of(replay)
    assert message.startswith("Nothing replayed: NATS is unreachable")
    assert nats_down not in message
    purge = admin_client.post(PURGE, {"seq": ["5"]}, follow=True)
    assert messages_of(purge)[0].startswith("Nothing purged: NATS is unreachable")
    assert not LogEntry.objects.exists()


def test_dead_letters__invalid_settings_show_a_message(admin_client: Client, settings: Any) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "DESTINATION_APP": "bad.token"}
    response = admin_client.get(DEAD_LETTERS)
    assert response.status_code == 200
    assert (
        "JETSTREAM_BRIDGE settings are invalid; run manage.py check." in response.content.decode()
    )


def test_dead_letters__status_page_links_to_them_for_those_who_may_see_them(
    admin_client: Client, bridge: Any
) -> None:
    dead_letter(bridge)
    assert (
        f'href="{DEAD_LETTERS}" id="jsb-dead-letters-link"'
        in admin_client.get(STATUS).content.decode()
    )
    viewer = login(staff_user("viewer"))
    page = viewer.get(STATUS).content.decode()
    assert "jsb-dead-letters-link" not in page
    assert "manage.py jetstream_dlq list" in page
    assert get_config().subjects.dlq in page


def test_dead_letters__a_ruby_gem_letter_is_listed_filtered_and_shown_as_the_gems(
    admin_client: Client, bridge: Any
) -> None:
    context = {
        "event_id": "7c0e4bd2-0000-4000-8000-000000000001",
        "reason": "unrecoverable",
        "error_class": "ActiveRecord::RecordNotFound",
        "error_message": "Couldn't find Customer with 'id'=42",
        "deliveries": 1,
        "original_subject": bridge.subjects.subscribe,
        "consumer": "rails-workers",
        "stream": bridge.stream_name,
    }
    headers = {
        "Nats-Msg-Id": "evt-from-rails",
        "x-dead-letter": "true",
        "x-dlq-reason": "unrecoverable",
        "x-deliveries": "1",
        "x-dlq-context": json.dumps(context),
    }
    gem = nats(lambda c: c.publish(bridge.subjects.dlq, b'{"event_id":"evt-from-rails"}', headers))
    ours, _ = dead_letter(bridge)

    response = admin_client.get(DEAD_LETTERS, {"consumer": "rails-workers"})
    assert seqs_on_page(response) == [gem.seq]
    [row] = response.context["rows"]
    assert (row.reason, row.gem, row.original_subject) == (
        "unrecoverable",
        True,
        bridge.subjects.subscribe,
    )
    assert ">Ruby gem</span>" in response.content.decode()
    assert seqs_on_page(admin_client.get(DEAD_LETTERS, {"reason": "rejected"})) == [ours]
    detail = admin_client.get(f"{DEAD_LETTERS}{gem.seq}/").content.decode()
    assert "the Ruby gem (x-dlq-* headers)" in detail
    assert "Couldn&#x27;t find Customer with &#x27;id&#x27;=42" in detail
