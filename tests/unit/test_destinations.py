"""Which peers a publish goes to and each copy's Nats-Msg-Id (``core/destinations.py``)."""

from __future__ import annotations

import pytest

from jetstream_bridge.core.destinations import copy_id_problem, message_id, resolve
from jetstream_bridge.core.errors import InvalidEvent, UnknownDestination

PEERS = ("beta", "billing", "shipping")


def test_resolve__none_means_every_peer_in_settings_order() -> None:
    assert resolve(None, PEERS) == PEERS
    assert resolve(None, ("beta",)) == ("beta",)


def test_resolve__names_are_kept_in_settings_order_once() -> None:
    assert resolve("billing", PEERS) == ("billing",)
    assert resolve(["shipping", "beta", "shipping"], PEERS) == ("beta", "shipping")
    assert resolve(("billing",), PEERS) == ("billing",)


def test_resolve__an_unknown_peer_is_refused_naming_the_configured_ones() -> None:
    with pytest.raises(UnknownDestination, match=r"'crm' is not in DESTINATION_APP \(beta, bill"):
        resolve(["beta", "crm"], PEERS)
    assert issubclass(UnknownDestination, InvalidEvent)


@pytest.mark.parametrize("bad", [[], (), 3, [3], {"beta"}, b"beta"])
def test_resolve__refuses_what_is_not_a_peer_name_or_a_list_of_them(bad: object) -> None:
    with pytest.raises(InvalidEvent, match="destination"):
        resolve(bad, PEERS)  # type: ignore[arg-type]


def test_message_id__bare_for_the_first_peer_suffixed_for_the_others() -> None:
    assert message_id("e-1", "beta", PEERS) == "e-1"
    assert message_id("e-1", "billing", PEERS) == "e-1~billing"
    assert message_id("e-1", "beta", ("beta",)) == "e-1"


def test_copy_id_problem__tilde_is_reserved_only_with_several_peers() -> None:
    assert copy_id_problem("a~b", ("beta",), ("beta",)) is None
    problem = copy_id_problem("a~b", ("beta",), PEERS)
    assert problem is not None
    assert "reserves" in problem


def test_copy_id_problem__a_derived_id_must_fit_the_outbox_column() -> None:
    long_id = "x" * 250
    assert copy_id_problem(long_id, ("beta",), PEERS) is None
    problem = copy_id_problem(long_id, ("beta", "shipping"), PEERS)
    assert problem is not None
    assert "'shipping' would be 259 characters" in problem
