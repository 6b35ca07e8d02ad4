"""The settings schema is the one source: the config, the README and the check ids agree with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jetstream_bridge.core.settings import BridgeConfig, describe_keys, parse_config
from jetstream_bridge.core.settings import problems as problems_module
from jetstream_bridge.core.settings.problems import BAD_MODEL, CHECKS, Check, check_list
from jetstream_bridge.core.settings.schema import (
    ENV_FALLBACKS,
    SETTINGS,
    settings_table,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_table() -> str:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| key | default | meaning |")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end]) + "\n"


def test_readme__configuration_table_is_the_rendered_schema() -> None:
    assert readme_table() == settings_table()


def test_readme__check_id_list_is_the_rendered_registry() -> None:
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert check_list() in text


def setting_fields() -> list[dataclasses.Field[object]]:
    """The config's fields that hold a setting.

    ``explicit`` records which were given; ``destination_app`` is the first of
    ``destination_apps`` (``DESTINATION_APP``), derived, not a key of its own.
    """
    derived = ("explicit", "destination_app")
    return [f for f in dataclasses.fields(BridgeConfig) if f.name not in derived]


def test_schema__declares_exactly_the_config_fields_in_order() -> None:
    assert [s.field for s in SETTINGS] == [f.name for f in setting_fields()]
    assert [key for key, _ in describe_keys()] == [s.key for s in SETTINGS]


def test_schema__parsed_defaults_equal_the_config_defaults() -> None:
    config, problems = parse_config({"DESTINATION_APP": "b"})
    assert config is not None, problems
    for field in setting_fields():
        if field.default is not dataclasses.MISSING and field.default not in ("", ()):
            assert getattr(config, field.name) == field.default, field.name


def test_schema__env_derived_defaults_follow_a_parsed_env() -> None:
    keys = [s.key for s in SETTINGS]
    for setting in SETTINGS:
        if setting.follows_env:
            assert keys.index(setting.key) > keys.index("ENV"), setting.key


def test_schema__environment_fallbacks_and_flags() -> None:
    assert ENV_FALLBACKS == {
        "NATS_URLS": "NATS_URLS",
        "ENV": "NATS_ENV",
        "APP_NAME": "APP_NAME",
        "DESTINATION_APP": "DESTINATION_APP",
    }
    assert [s.key for s in SETTINGS if s.secret] == [
        "DLQ_SIGNING_KEY",
        "PASSWORD",
        "TOKEN",
        "NKEY_SEED",
        "HEALTH_TOKEN",
        "METRICS_TOKEN",
    ]
    assert [s.key for s in SETTINGS if s.required] == ["DESTINATION_APP"]
    assert [s.key for s in SETTINGS if s.follows_env] == [
        "STREAM_NAME",
        "DLQ_SUBJECT",
        "DLQ_STREAM_NAME",
    ]


def test_schema__dlq_stream_name_follows_the_parsed_stream_name() -> None:
    derived, _ = parse_config({"DESTINATION_APP": "b", "ENV": "prod"})
    custom, _ = parse_config({"DESTINATION_APP": "b", "STREAM_NAME": "orders"})
    assert derived is not None
    assert custom is not None
    assert derived.dlq_stream_name == "prod-jetstream-bridge-stream-dlq"
    assert derived.separate_dlq_stream
    assert custom.dlq_stream_name == "orders-dlq"
    keys = [s.key for s in SETTINGS]
    assert keys.index("DLQ_STREAM_NAME") > keys.index("STREAM_NAME")


def test_schema__dlq_stream_name_equal_to_stream_name_shares_the_stream() -> None:
    shared, problems = parse_config(
        {"DESTINATION_APP": "b", "STREAM_NAME": "s", "DLQ_STREAM_NAME": "s"}
    )
    assert shared is not None
    assert problems == []
    assert not shared.separate_dlq_stream
    warned, problems = parse_config(
        {"DESTINATION_APP": "b", "DLQ_STREAM_NAME": "s", "STREAM_NAME": "s", "DLQ_MAX_BYTES": 10}
    )
    assert warned is not None
    assert [(p.id, p.key) for p in problems] == [("W002", "DLQ_MAX_BYTES")]


def test_schema__dlq_settings_refuse_bad_values_with_a_hint() -> None:
    config, problems = parse_config(
        {
            "DESTINATION_APP": "b",
            "DLQ_STREAM_NAME": "a.b",
            "DLQ_MAX_AGE": "soon",
            "DLQ_MAX_BYTES": 0,
        }
    )
    assert config is None
    assert {(p.id, p.key) for p in problems} == {
        ("E011", "DLQ_STREAM_NAME"),
        ("E005", "DLQ_MAX_AGE"),
        ("E007", "DLQ_MAX_BYTES"),
    }
    assert all(p.hint for p in problems)


def test_check_ids__each_registered_once_in_id_order() -> None:
    declared = [v for v in vars(problems_module).values() if isinstance(v, Check)]
    assert sorted(declared, key=lambda check: check.id) == list(CHECKS)
    assert len({check.id for check in CHECKS}) == len(CHECKS)
    assert BAD_MODEL.qualified_id == "jetstream_bridge.E012"


@pytest.mark.parametrize(
    ("written", "peers"),
    [
        ("billing", ("billing",)),
        (["billing", "shipping"], ("billing", "shipping")),
        ("billing, shipping,notifications", ("billing", "shipping", "notifications")),
    ],
)
def test_destination_app__one_peer_or_several_the_first_the_default(
    written: object, peers: tuple[str, ...]
) -> None:
    config, problems = parse_config({"APP_NAME": "orders", "DESTINATION_APP": written})
    assert config is not None, problems
    assert config.destinations == peers
    assert config.destination_app == peers[0]
    assert config.subjects.publish == f"development.data.sync.orders.{peers[0]}"
    assert [s.subscribe for s in config.peer_subjects] == [
        f"development.data.sync.{peer}.orders" for peer in peers
    ]


@pytest.mark.parametrize(
    ("written", "check_id", "words"),
    [
        (["billing", "billing"], "E004", "listed twice"),
        (["billing", "ship.ping"], "E004", "'.'"),
        ([], "E003", "is not set"),
        (["billing", "orders"], "W001", "consume its own events"),
    ],
)
def test_destination_app__bad_lists_are_reported_with_a_hint(
    written: object, check_id: str, words: str
) -> None:
    _, problems = parse_config({"APP_NAME": "orders", "DESTINATION_APP": written})
    assert [problem.id for problem in problems] == [check_id]
    assert words in problems[0].msg
    assert problems[0].hint
