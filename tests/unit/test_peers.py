"""Several peers on the consuming side: durables per peer, producers, handler lookup."""

from __future__ import annotations

from typing import Any

import pytest

from jetstream_bridge.core.errors import UnknownPeer
from jetstream_bridge.core.settings import BridgeConfig, parse_config
from jetstream_bridge.core.subjects import producer_of
from jetstream_bridge.core.topology_plan import (
    consumer_peers,
    foreign_filter_problem,
    peer_durable,
    peer_durables,
)
from jetstream_bridge.handlers import HandlerRegistry


def config(peers: Any) -> BridgeConfig:
    parsed, problems = parse_config({"ENV": "prod", "APP_NAME": "orders", "DESTINATION_APP": peers})
    assert not problems
    assert parsed is not None
    return parsed


def test_peer_durables__default_peer_keeps_the_name_others_get_their_own() -> None:
    assert peer_durables(config("billing"), "orders-events") == {"billing": "orders-events"}
    many = config(["billing", "shipping"])
    assert peer_durables(many, "orders-events") == {
        "billing": "orders-events",
        "shipping": "orders-events-shipping",
    }
    # --from picks peers; each keeps the durable it has without --from.
    assert peer_durables(many, "d", ["shipping"]) == {"shipping": "d-shipping"}
    assert peer_durable(many, "d", "billing") == "d"


def test_consumer_peers__unknown_peer_says_which_peers_exist() -> None:
    many = config(["billing", "shipping"])
    assert consumer_peers(many) == ("billing", "shipping")
    assert consumer_peers(many, ["shipping", "shipping"]) == ("shipping",)
    with pytest.raises(UnknownPeer) as caught:
        consumer_peers(many, ["shipping", "nobody"])
    message = str(caught.value)
    assert "'nobody' is not a configured peer" in message
    assert "DESTINATION_APP names billing, shipping" in message


def test_foreign_filter_problem__only_another_configured_peer_is_refused() -> None:
    reordered = config(["shipping", "billing"])
    wanted = "prod.data.sync.shipping.orders"
    problem = foreign_filter_problem(reordered, "d", wanted, "prod.data.sync.billing.orders")
    assert problem is not None
    assert "Keep 'billing' first in DESTINATION_APP" in problem
    assert foreign_filter_problem(reordered, "d", wanted, wanted) is None
    assert foreign_filter_problem(reordered, "d", wanted, None) is None
    # An old filter no configured peer uses is reconciled as before.
    assert foreign_filter_problem(reordered, "d", wanted, "prod.data.sync.gone.orders") is None


@pytest.mark.parametrize(
    ("subject", "producer"),
    [
        ("prod.data.sync.billing.orders", "billing"),
        ("prod.data.sync.billing.other", None),  # not sent to us
        ("staging.data.sync.billing.orders", None),
        ("prod.data.sync.dlq", None),
        ("prod.data.sync.a.b.orders", None),
        ("prod.data.sync.*.orders", None),
        ("", None),
    ],
)
def test_producer_of__reads_only_our_own_subjects(subject: str, producer: str | None) -> None:
    assert producer_of(subject, "prod", "orders") == producer


def named(name: str) -> Any:
    def fn(event: dict[str, Any], subject: str, deliveries: int) -> None:
        return None

    fn.__qualname__ = name
    return fn


def test_resolve__producer_registrations_first_then_todays() -> None:
    registry = HandlerRegistry()
    exact, any_producer = named("exact"), named("any_producer")
    billing_any, billing_all = named("billing_any"), named("billing_all")
    registry.register("order", "created", exact, producer="billing")
    registry.register("order", "created", any_producer)
    registry.register("order", "*", billing_any, producer="billing")
    registry.register("*", "*", billing_all, producer="billing")

    assert registry.resolve("order", "created", "billing") is exact
    assert registry.resolve("order", "updated", "billing") is billing_any
    assert registry.resolve("invoice", "paid", "billing") is billing_all
    # Another producer, or none known: today's registrations, unchanged.
    assert registry.resolve("order", "created", "shipping") is any_producer
    assert registry.resolve("order", "created") is any_producer
    assert registry.resolve("order", "updated", "shipping") is None


def test_register__same_key_twice_names_the_producer() -> None:
    registry = HandlerRegistry()
    registry.register("order", "created", named("one"), producer="billing")
    registry.register("order", "created", named("other"))  # another key: fine
    with pytest.raises(ValueError, match="order/created from billing is already registered"):
        registry.register("order", "created", named("two"), producer="billing")
