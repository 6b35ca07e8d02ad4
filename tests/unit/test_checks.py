from __future__ import annotations

import pytest
from django.core import checks
from django.core.checks import Error, Warning
from django.test import override_settings

from jetstream_bridge.checks import check_settings
from jetstream_bridge.conf import get_config
from jetstream_bridge.exceptions import ConfigurationError


def run_checks() -> list:
    return check_settings(None)


@override_settings(JETSTREAM_BRIDGE={"APP_NAME": "orders"})
def test_check__missing_destination_is_E003_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DESTINATION_APP", raising=False)
    from jetstream_bridge.conf import reload_config

    reload_config()
    e003 = Error(
        "JETSTREAM_BRIDGE['DESTINATION_APP'] is not set; the bridge cannot name its subjects.",
        hint="Add 'DESTINATION_APP': 'billing' (the APP_NAME of the service you exchange "
        "events with) to JETSTREAM_BRIDGE, or set DESTINATION_APP=billing in the "
        "environment.",
        id="jetstream_bridge.E003",
    )
    # A deploy check: `check --deploy` reports it, the checks migrate runs do not.
    assert django_checks(include_deployment_checks=True) == [e003]
    assert django_checks(include_deployment_checks=False) == []
    with pytest.raises(ConfigurationError, match=r"jetstream_bridge\.E003"):
        get_config()


@override_settings(JETSTREAM_BRIDGE={"APP_NAME": "orders", "ENV": "a b"})
def test_check__other_errors_still_fail_the_checks_migrate_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DESTINATION_APP", raising=False)
    from jetstream_bridge.conf import reload_config

    reload_config()
    assert [m.id for m in django_checks(include_deployment_checks=False)] == [
        "jetstream_bridge.E004"
    ]
    assert [m.id for m in django_checks(include_deployment_checks=True)] == [
        "jetstream_bridge.E004",
        "jetstream_bridge.E003",
    ]


def django_checks(*, include_deployment_checks: bool) -> list:
    return checks.run_checks(
        tags=["jetstream_bridge"], include_deployment_checks=include_deployment_checks
    )


def test_check__environment_fills_what_the_dict_leaves_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DESTINATION_APP", "billing")
    monkeypatch.setenv("NATS_ENV", "staging")
    monkeypatch.setenv("APP_NAME", "orders")
    monkeypatch.setenv("NATS_URLS", "nats://a:4222,nats://b:4222")
    with override_settings(JETSTREAM_BRIDGE={"MAX_DELIVER": 5}):
        assert run_checks() == []
        config = get_config()
    assert config.destination_app == "billing"
    assert config.env == "staging"
    assert config.app_name == "orders"
    assert config.nats_urls == ("nats://a:4222", "nats://b:4222")


def test_check__settings_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESTINATION_APP", "from-env")
    with override_settings(JETSTREAM_BRIDGE={"DESTINATION_APP": "from-settings"}):
        assert get_config().destination_app == "from-settings"


def test_override_settings__clears_the_cached_config() -> None:
    with override_settings(JETSTREAM_BRIDGE={"DESTINATION_APP": "one"}):
        assert get_config().destination_app == "one"
    with override_settings(JETSTREAM_BRIDGE={"DESTINATION_APP": "two"}):
        assert get_config().destination_app == "two"


@override_settings(JETSTREAM_BRIDGE={"DESTINATION_APP": "b", "OUTBOX_MODEL": "nope.Missing"})
def test_check__unimportable_model_is_E012() -> None:
    [message] = run_checks()
    assert message.id == "jetstream_bridge.E012"
    assert "'nope.Missing' is not an installed model" in message.msg
    assert "INSTALLED_APPS" in message.hint


@override_settings(
    JETSTREAM_BRIDGE={"DESTINATION_APP": "b", "OUTBOX_MODEL": "testapp.BrokenOutbox"}
)
def test_check__custom_model_missing_fields_is_E013() -> None:
    [message] = run_checks()
    assert message.id == "jetstream_bridge.E013"
    assert message.msg == (
        "testapp.BrokenOutbox is missing field(s) the bridge needs: subject, payload, status."
    )


@override_settings(
    JETSTREAM_BRIDGE={"DESTINATION_APP": "b", "OUTBOX_MODEL": "testapp.MinimalOutbox"}
)
def test_check__minimal_custom_model_is_accepted() -> None:
    assert run_checks() == []


@override_settings(
    JETSTREAM_BRIDGE={
        "DESTINATION_APP": "b",
        "OUTBOX_MODEL": "testapp.BrokenOutbox",
        "USE_OUTBOX": False,
    }
)
def test_check__models_of_disabled_features_are_not_checked() -> None:
    assert run_checks() == []


@override_settings(JETSTREAM_BRIDGE={"DESTINATION_APP": "app"})
def test_check__same_app_and_destination_is_a_warning() -> None:
    [message] = run_checks()
    assert isinstance(message, Warning)
    assert message.id == "jetstream_bridge.W001"
