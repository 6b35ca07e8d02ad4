"""Typed views of the server's answers, built from JSON shaped as nats-server sends it."""

from __future__ import annotations

import base64
from typing import Any

from jetstream_bridge.broker.types import (
    AccountInfo,
    ConsumerInfo,
    PubAck,
    StoredMessage,
    StreamInfo,
)

STREAM_INFO: dict[str, Any] = {
    "type": "io.nats.jetstream.api.v1.stream_info_response",
    "total": 0,
    "offset": 0,
    "limit": 0,
    "config": {
        "name": "ORDERS",
        "subjects": ["prod.data.sync.orders.>", "prod.data.sync.dlq"],
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs": -1,
        "max_bytes": 10_000_000,
        "max_age": 3_600_000_000_000,
        "max_msgs_per_subject": -1,
        "max_msg_size": -1,
        "discard": "old",
        "storage": "file",
        "num_replicas": 3,
        "duplicate_window": 120_000_000_000,
        "compression": "none",
        "allow_direct": True,
        "mirror_direct": False,
        "sealed": False,
        "deny_delete": False,
        "deny_purge": False,
        "allow_rollup_hdrs": False,
        "consumer_limits": {},
        "description": "owned by the platform team",
        "metadata": {"team": "platform"},
    },
    "created": "2026-11-30T10:00:00.123456789Z",
    "state": {
        "messages": 42,
        "bytes": 4096,
        "first_seq": 7,
        "first_ts": "2026-11-30T10:00:01.000000001Z",
        "last_seq": 48,
        "last_ts": "2026-11-30T10:05:00.5Z",
        "num_subjects": 2,
        "subjects": {"prod.data.sync.dlq": 3},
        "consumer_count": 2,
    },
    "cluster": {"leader": "n1"},
    "ts": "2026-11-30T10:05:01Z",
}

CONSUMER_INFO: dict[str, Any] = {
    "type": "io.nats.jetstream.api.v1.consumer_info_response",
    "stream_name": "ORDERS",
    "name": "billing-events",
    "created": "2026-11-30T10:00:00.5Z",
    "config": {
        "durable_name": "billing-events",
        "name": "billing-events",
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": 45_000_000_000,
        "max_deliver": 5,
        "filter_subject": "prod.data.sync.billing.>",
        "replay_policy": "instant",
        "max_waiting": 512,
        "max_ack_pending": 200,
        "num_replicas": 0,
    },
    "delivered": {"consumer_seq": 12, "stream_seq": 40, "last_active": "2026-11-30T10:05:00Z"},
    "ack_floor": {"consumer_seq": 10, "stream_seq": 38},
    "num_ack_pending": 2,
    "num_redelivered": 1,
    "num_waiting": 1,
    "num_pending": 8,
    "ts": "2026-11-30T10:05:01Z",
}


def test_stream_info__converts_durations_to_seconds_and_reads_the_state() -> None:
    info = StreamInfo.from_response(STREAM_INFO)
    assert info.config.name == "ORDERS"
    assert info.config.subjects == ("prod.data.sync.orders.>", "prod.data.sync.dlq")
    assert info.config.max_age == 3600.0
    assert info.config.duplicate_window == 120.0
    assert (info.config.num_replicas, info.config.max_bytes) == (3, 10_000_000)
    state = info.state
    assert (state.messages, state.bytes, state.first_seq, state.last_seq) == (42, 4096, 7, 48)
    assert state.consumer_count == 2
    assert state.subjects == {"prod.data.sync.dlq": 3}


def test_stream_config__update_sends_back_every_server_field_with_only_subjects_changed() -> None:
    config = StreamInfo.from_response(STREAM_INFO).config
    update = config.with_subjects(["a.>", "b.>"])
    assert update["subjects"] == ["a.>", "b.>"]
    assert {k: v for k, v in update.items() if k != "subjects"} == {
        k: v for k, v in STREAM_INFO["config"].items() if k != "subjects"
    }
    assert update["max_age"] == 3_600_000_000_000  # the server's nanoseconds, untouched
    assert STREAM_INFO["config"]["subjects"] == ["prod.data.sync.orders.>", "prod.data.sync.dlq"]


def test_stream_info__state_without_subjects_filter_has_no_subject_counts() -> None:
    answer = {**STREAM_INFO, "state": {"messages": 0, "bytes": 0, "first_seq": 0, "last_seq": 0}}
    assert StreamInfo.from_response(answer).state.subjects == {}


def test_consumer_info__converts_ack_wait_to_seconds_and_reads_positions() -> None:
    info = ConsumerInfo.from_response(CONSUMER_INFO)
    assert (info.stream_name, info.name) == ("ORDERS", "billing-events")
    assert info.config.ack_wait == 45.0
    assert info.config.durable_name == "billing-events"
    assert info.config.filters == ("prod.data.sync.billing.>",)
    assert (info.config.max_deliver, info.config.max_ack_pending) == (5, 200)
    assert info.config.backoff is None
    assert (info.delivered.stream_seq, info.ack_floor.stream_seq) == (40, 38)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (8, 2, 1)


def test_consumer_config__as_dict_gives_back_the_server_shape_of_known_fields() -> None:
    config = ConsumerInfo.from_response(CONSUMER_INFO).config
    assert config.as_dict() == {
        "durable_name": "billing-events",
        "filter_subject": "prod.data.sync.billing.>",
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": 45_000_000_000,
        "max_deliver": 5,
        "max_ack_pending": 200,
    }


def test_consumer_config__filter_subjects_and_backoff() -> None:
    raw = {
        **CONSUMER_INFO["config"],
        "filter_subjects": ["a.>", "b.>"],
        "backoff": [1_000_000_000, 2_500_000_000],
    }
    del raw["filter_subject"]
    config = ConsumerInfo.from_response({**CONSUMER_INFO, "config": raw}).config
    assert config.filter_subject is None
    assert config.filters == ("a.>", "b.>")
    assert config.backoff == (1.0, 2.5)
    assert config.as_dict()["backoff"] == [1_000_000_000, 2_500_000_000]
    assert "filter_subject" not in config.as_dict()


def test_pub_ack__reads_stream_sequence_and_duplicate() -> None:
    ack = PubAck.from_response({"stream": "ORDERS", "seq": 9, "duplicate": True})
    assert ack == PubAck(stream="ORDERS", seq=9, duplicate=True)
    assert PubAck.from_response({"stream": "ORDERS", "seq": 10}).duplicate is False


def test_stored_message__decodes_base64_body_and_headers() -> None:
    headers = b"NATS/1.0\r\nNats-Msg-Id: m-1\r\nX-Reason: rejected: bad\r\n\r\n"
    message = StoredMessage.from_response(
        {
            "subject": "prod.data.sync.dlq",
            "seq": 17,
            "hdrs": base64.b64encode(headers).decode(),
            "data": base64.b64encode(b'{"a":1}').decode(),
            "time": "2026-11-30T10:05:00.123456789Z",
        }
    )
    assert (message.subject, message.seq, message.data) == ("prod.data.sync.dlq", 17, b'{"a":1}')
    assert message.headers == {"Nats-Msg-Id": "m-1", "X-Reason": "rejected: bad"}
    assert message.time == "2026-11-30T10:05:00.123456789Z"


def test_stored_message__without_headers_or_body() -> None:
    message = StoredMessage.from_response({"subject": "s", "seq": 1, "time": "t"})
    assert (message.headers, message.data) == ({}, b"")


def test_account_info__reads_usage() -> None:
    answer = {"memory": 0, "storage": 2048, "streams": 1, "consumers": 3, "limits": {}}
    assert AccountInfo.from_response(answer) == AccountInfo(
        streams=1, consumers=3, memory=0, storage=2048
    )
