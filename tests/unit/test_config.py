from __future__ import annotations

from typing import Any

import pytest

from jetstream_bridge.core.settings import Secret, parse_config, redact_url


def ids(raw: Any) -> list[str]:
    return [problem.id for problem in parse_config(raw)[1]]


def test_parse_config__minimal_settings_give_documented_defaults() -> None:
    config, problems = parse_config({"DESTINATION_APP": "billing"})
    assert problems == []
    assert config is not None
    assert config.nats_urls == ("nats://localhost:4222",)
    assert config.env == "development"
    assert config.app_name == "app"
    assert config.max_deliver == 5
    assert config.ack_wait == 30.0
    assert config.backoff == (1.0, 5.0, 15.0, 30.0, 60.0)
    assert (config.use_outbox, config.use_inbox, config.use_dlq) == (True, True, True)
    assert config.stream_name == "development-jetstream-bridge-stream"
    assert config.dlq_subject == "development.data.sync.dlq"
    assert config.subjects.publish == "development.data.sync.app.billing"
    assert config.subjects.subscribe == "development.data.sync.billing.app"


def test_parse_config__derives_stream_and_dlq_from_env() -> None:
    config, _ = parse_config(
        {
            "DESTINATION_APP": "b",
            "ENV": "prod",
            "ACK_WAIT": "1m",
            "NATS_URLS": "nats://a:4222, nats://b:4222",
        }
    )
    assert config is not None
    assert config.stream_name == "prod-jetstream-bridge-stream"
    assert config.dlq_subject == "prod.data.sync.dlq"
    assert config.ack_wait == 60.0
    assert config.nats_urls == ("nats://a:4222", "nats://b:4222")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([], ["E001"]),
        ({}, ["E003"]),
        ({"DESTINATION_APP": "a.b"}, ["E004"]),
        ({"DESTINATION_APP": "b", "ENV": "pro*d"}, ["E004"]),
        ({"DESTINATION_APP": "b", "APP_NAME": "my app"}, ["E004"]),
        ({"DESTINATION_APP": "b", "APP_NAME": ""}, ["E004"]),
        ({"DESTINATION_APP": "b", "APP_NAME": ">"}, ["E004"]),
        ({"DESTINATION_APP": "b", "ACK_WAIT": "30 seconds"}, ["E005"]),
        ({"DESTINATION_APP": "b", "BACKOFF": ["1s", "soon"]}, ["E005"]),
        ({"DESTINATION_APP": "b", "MAX_DELIVER": 2}, ["E006"]),
        ({"DESTINATION_APP": "b", "MAX_DELIVER": 0, "BACKOFF": []}, ["E007"]),
        ({"DESTINATION_APP": "b", "NATS_URLS": "http//oops"}, ["E008"]),
        ({"DESTINATION_APP": "b", "STREAM_STORAGE": "disk"}, ["E009"]),
        ({"DESTINATION_APP": "b", "HANDLER_SAVEPOINTS": "never"}, ["E009"]),
        ({"DESTINATION_APP": "b", "HANDLER_SAVEPOINTS": True}, ["E009"]),
        ({"DESTINATION_APP": "b", "USE_OUTBOX": "maybe"}, ["E010"]),
        ({"DESTINATION_APP": "b", "DLQ_SUBJECT": "dlq.*"}, ["E011"]),
        ({"DESTINATION_APP": "b", "DLQ_SUBJECT": "$JS.API.x"}, ["E011"]),
        ({"DESTINATION_APP": "b", "STREAM_NAME": "a.b"}, ["E011"]),
        ({"DESTINATION_APP": "b", "OUTBOX_MODEL": "NoDot"}, ["E012"]),
        ({"DESTINATION_APP": "b", "TOKEN": "t", "USER": "u", "PASSWORD": "p"}, ["E014"]),
        ({"DESTINATION_APP": "b", "USER": "u"}, ["E014"]),
        ({"DESTINATION_APP": "b", "TLS_CERT_FILE": "c.pem"}, ["E014"]),
        ({"DESTINATION_APP": "b", "RELAY_LEASE": "5m"}, ["E015"]),
        ({"DESTINATION_APP": "b", "MAX_DELIVERS": 3}, ["E002"]),
        ({"DESTINATION_APP": "app"}, ["W001"]),
    ],
)
def test_parse_config__reports_each_problem_with_its_id(raw: Any, expected: list[str]) -> None:
    assert ids(raw) == expected


def test_parse_config__handler_savepoints_defaults_to_on_failure_and_accepts_always() -> None:
    config, problems = parse_config({"DESTINATION_APP": "b"})
    assert config is not None
    assert problems == []
    assert config.handler_savepoints == "on_failure"
    config, problems = parse_config({"DESTINATION_APP": "b", "HANDLER_SAVEPOINTS": "Always"})
    assert config is not None
    assert problems == []
    assert config.handler_savepoints == "always"
    config, [problem] = parse_config({"DESTINATION_APP": "b", "HANDLER_SAVEPOINTS": "sometimes"})
    assert config is None
    assert (problem.id, problem.key) == ("E009", "HANDLER_SAVEPOINTS")
    assert "on_failure, always" in problem.msg
    assert "'sometimes'" in problem.msg
    assert problem.hint == "Write 'HANDLER_SAVEPOINTS': 'on_failure'."


def test_parse_config__unknown_key_suggests_the_close_one() -> None:
    _, problems = parse_config({"DESTINATION_APP": "b", "BACK_OFF": ["1s"]})
    assert problems[0].hint == "Did you mean 'BACKOFF'?"


def test_parse_config__hints_say_exactly_what_to_write() -> None:
    _, problems = parse_config({})
    assert "'DESTINATION_APP': 'billing'" in problems[0].hint
    _, problems = parse_config({"DESTINATION_APP": "b", "MAX_DELIVER": 3})
    assert problems[0].hint == (
        "Shorten BACKOFF to at most 3 values (e.g. ['1s', '5s', '15s']) or raise MAX_DELIVER to 5."
    )


def test_parse_config__reports_every_problem_at_once() -> None:
    assert ids({"ENV": "a b", "ACK_WAIT": "x", "NOPE": 1}) == ["E002", "E004", "E003", "E005"]


def test_config_repr__never_shows_secrets() -> None:
    config, problems = parse_config(
        {
            "DESTINATION_APP": "b",
            "NATS_URLS": ["nats://alice:hunter2@10.0.0.1:4222", "nats://s3cr3tt0ken@h:4222"],
            "NKEY_SEED": "SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4",
        }
    )
    assert problems == []
    text = repr(config) + str(config)
    for secret in ("hunter2", "s3cr3tt0ken", "SUAIBDPB"):
        assert secret not in text
    assert "alice:***@10.0.0.1:4222" in text
    assert repr(Secret("x")) == "Secret('********')"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://user:secret@127.0.0.1:1", "nats://user:***@127.0.0.1:1"),
        ("nats://tok@host:4222", "nats://***@host:4222"),
        ("tls://host:4222", "tls://host:4222"),
        ("nats://user:secret@host:99999", "nats://user:***@host:99999"),
    ],
)
def test_redact_url__hides_passwords_and_tokens(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_parse_config__reports_problems_in_documentation_order_unknown_keys_first() -> None:
    _, problems = parse_config(
        {"TLS_CERT_FILE": "c.pem", "NATS_URLS": "x", "NOPE": 1, "MAX_DELIVER": 2}
    )
    assert [(p.id, p.key) for p in problems] == [
        ("E002", "NOPE"),
        ("E008", "NATS_URLS"),
        ("E003", "DESTINATION_APP"),
        ("E006", "BACKOFF"),
        ("E014", "TLS_KEY_FILE"),
    ]


def test_parse_config__url_with_credentials_and_a_bad_port_is_E008_not_a_crash() -> None:
    _, [problem] = parse_config({"DESTINATION_APP": "b", "NATS_URLS": "nats://u:pw@h:99999"})
    assert problem.id == "E008"
    assert problem.msg == "JETSTREAM_BRIDGE['NATS_URLS'] has an invalid URL: nats://u:***@h:99999."
