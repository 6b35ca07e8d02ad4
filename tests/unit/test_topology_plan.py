"""Which subjects the stream must hold, for one peer and for several."""

from __future__ import annotations

from typing import Any

from jetstream_bridge.core.settings import BridgeConfig, parse_config
from jetstream_bridge.core.topology_plan import desired_subjects


def config(**keys: Any) -> BridgeConfig:
    parsed, problems = parse_config({"ENV": "prod", "APP_NAME": "orders", **keys})
    assert parsed is not None, problems
    return parsed


SHARED_DLQ = {"STREAM_NAME": "events", "DLQ_STREAM_NAME": "events"}


def test_desired_subjects__one_peer_is_publish_subscribe_then_a_shared_dlq_as_before() -> None:
    assert desired_subjects(config(DESTINATION_APP="billing")) == [
        "prod.data.sync.orders.billing",
        "prod.data.sync.billing.orders",
    ]  # the DLQ subject lives in a stream of its own (dlq_stream.py)
    assert desired_subjects(config(DESTINATION_APP="billing", **SHARED_DLQ)) == [
        "prod.data.sync.orders.billing",
        "prod.data.sync.billing.orders",
        "prod.data.sync.dlq",
    ]


def test_desired_subjects__three_peers_give_six_subjects_then_the_dlq() -> None:
    wanted = desired_subjects(
        config(DESTINATION_APP=["billing", "shipping", "notify"], **SHARED_DLQ)
    )
    assert wanted == [
        "prod.data.sync.orders.billing",
        "prod.data.sync.billing.orders",
        "prod.data.sync.orders.shipping",
        "prod.data.sync.shipping.orders",
        "prod.data.sync.orders.notify",
        "prod.data.sync.notify.orders",
        "prod.data.sync.dlq",
    ]


def test_desired_subjects__without_dlq_only_the_peers() -> None:
    wanted = desired_subjects(
        config(DESTINATION_APP=["billing", "shipping"], USE_DLQ=False, **SHARED_DLQ)
    )
    assert len(wanted) == 4
    assert "prod.data.sync.dlq" not in wanted
