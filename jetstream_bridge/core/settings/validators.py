"""Rules that span several settings, run in order after every key has been parsed on its own.

Each validator reads the parsed values (``BridgeConfig`` field -> value; a bad value has been
replaced by its default, so the rules can still run) and the raw settings, and yields the
problems it finds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..durations import format_duration
from .problems import (
    AUTH_CONFLICT,
    BACKOFF_TOO_LONG,
    BAD_DURATION,
    BAD_MODEL,
    DLQ_LIMITS_UNUSED,
    DUPLICATE_WINDOW_TOO_SHORT,
    MISSING_DESTINATION,
    SAME_APP_AND_DESTINATION,
    Problem,
)

Values = Mapping[str, Any]
Raw = Mapping[str, Any]
Validator = Callable[[Values, Raw], Iterator[Problem]]


def destination_app_is_set(values: Values, raw: Raw) -> Iterator[Problem]:
    """E003: without DESTINATION_APP the bridge cannot name its subjects."""
    if not values["destination_apps"] and raw.get("DESTINATION_APP") in (None, "", [], ()):
        yield MISSING_DESTINATION.problem(
            "DESTINATION_APP",
            "JETSTREAM_BRIDGE['DESTINATION_APP'] is not set; the bridge cannot name its subjects.",
            "Add 'DESTINATION_APP': 'billing' (the APP_NAME of the service you exchange events "
            "with) to JETSTREAM_BRIDGE, or set DESTINATION_APP=billing in the environment.",
        )


def app_is_not_its_own_destination(values: Values, raw: Raw) -> Iterator[Problem]:
    """W001: a service whose destination is itself would consume its own events."""
    app = values["app_name"]
    if app and app in values["destination_apps"]:
        yield SAME_APP_AND_DESTINATION.problem(
            "DESTINATION_APP",
            f"APP_NAME is {app!r} and DESTINATION_APP names {app!r} too; the service would "
            "consume its own events.",
            "Give each service its own APP_NAME and point DESTINATION_APP at its peers.",
        )


def backoff_fits_max_deliver(values: Values, raw: Raw) -> Iterator[Problem]:
    """E006: delays beyond MAX_DELIVER deliveries can never be used."""
    max_deliver, backoff = values["max_deliver"], values["backoff"]
    if max_deliver is not None and len(backoff) > max_deliver:
        yield BACKOFF_TOO_LONG.problem(
            "BACKOFF",
            f"JETSTREAM_BRIDGE['BACKOFF'] has {len(backoff)} delays but MAX_DELIVER is "
            f"{max_deliver}; the extra delays can never be used.",
            f"Shorten BACKOFF to at most {max_deliver} values "
            f"(e.g. {[format_duration(b) for b in backoff[:max_deliver]]!r}) or raise "
            f"MAX_DELIVER to {len(backoff)}.",
        )


def backoff_is_positive(values: Values, raw: Raw) -> Iterator[Problem]:
    """E005: a zero delay would redeliver a failing message at once."""
    if any(b <= 0 for b in values["backoff"]):
        yield BAD_DURATION.problem(
            "BACKOFF",
            "JETSTREAM_BRIDGE['BACKOFF'] delays must be positive.",
            "Write 'BACKOFF': ['1s', '5s', '15s'].",
        )


def duplicate_window_outlasts_relay_lease(values: Values, raw: Raw) -> Iterator[Problem]:
    """E015: a relay re-sending an expired lease must still fall inside the dedupe window."""
    relay_lease, window = values["relay_lease"], values["duplicate_window"]
    if relay_lease and window is not None and window <= relay_lease:
        yield DUPLICATE_WINDOW_TOO_SHORT.problem(
            "DUPLICATE_WINDOW",
            f"DUPLICATE_WINDOW ({format_duration(window)}) must be longer than "
            f"RELAY_LEASE ({format_duration(relay_lease)}); otherwise a relay that re-sends "
            "an expired lease can duplicate events.",
            f"Write 'DUPLICATE_WINDOW': '{format_duration(max(120.0, relay_lease * 2))}'.",
        )


def one_authentication_method(values: Values, raw: Raw) -> Iterator[Problem]:
    """E014: the client authenticates one way; two methods would silently pick one."""
    methods = [
        name
        for name, value in (
            ("USER/PASSWORD", values["user"] or values["password"]),
            ("TOKEN", values["token"]),
            ("NKEY_SEED", values["nkey_seed"]),
            ("CREDS_FILE", values["creds_file"]),
        )
        if value
    ]
    if len(methods) > 1:
        yield AUTH_CONFLICT.problem(
            methods[1].split("/")[0],
            f"JETSTREAM_BRIDGE sets more than one authentication method: {', '.join(methods)}.",
            "Keep exactly one of USER/PASSWORD, TOKEN, NKEY_SEED or CREDS_FILE.",
        )


def user_and_password_together(values: Values, raw: Raw) -> Iterator[Problem]:
    """E014: a user without a password (or the reverse) cannot authenticate."""
    if (values["user"] is None) != (values["password"] is None):
        yield AUTH_CONFLICT.problem(
            "PASSWORD",
            "JETSTREAM_BRIDGE sets USER without PASSWORD or the other way round.",
            "Set both 'USER' and 'PASSWORD', or neither.",
        )


def tls_cert_and_key_together(values: Values, raw: Raw) -> Iterator[Problem]:
    """E014: a client certificate is useless without its key."""
    if (values["tls_cert_file"] is None) != (values["tls_key_file"] is None):
        yield AUTH_CONFLICT.problem(
            "TLS_KEY_FILE",
            "TLS_CERT_FILE and TLS_KEY_FILE must be set together.",
            "Set both for a client certificate, or neither.",
        )


def model_paths_are_dotted(values: Values, raw: Raw) -> Iterator[Problem]:
    """E012: a model is named ``app_label.ModelName`` (checks.py then looks it up)."""
    for key in ("OUTBOX_MODEL", "INBOX_MODEL"):
        value = values[key.lower()]
        if not isinstance(value, str) or value.count(".") != 1:
            yield BAD_MODEL.problem(
                key,
                f"JETSTREAM_BRIDGE[{key!r}] = {value!r} is not an 'app_label.ModelName' string.",
                f"Write {key!r}: 'myapp.MyModel', or leave it out for the built-in model.",
            )


def dlq_limits_have_a_stream(values: Values, raw: Raw) -> Iterator[Problem]:
    """W002: DLQ_MAX_AGE/DLQ_MAX_BYTES limit the DLQ's own stream; in a shared one they cannot."""
    if values["dlq_stream_name"] != values["stream_name"]:
        return
    given = [key for key in ("DLQ_MAX_AGE", "DLQ_MAX_BYTES") if raw.get(key) not in (None, "")]
    if given:
        yield DLQ_LIMITS_UNUSED.problem(
            given[0],
            f"{' and '.join(given)} apply only to a DLQ stream of its own, but DLQ_STREAM_NAME "
            "is STREAM_NAME: the dead letters share the events' stream and its limits.",
            "Leave DLQ_STREAM_NAME out (it defaults to '{STREAM_NAME}-dlq') to keep dead "
            f"letters apart, or remove {' and '.join(given)}.",
        )


VALIDATORS: tuple[Validator, ...] = (
    destination_app_is_set,
    app_is_not_its_own_destination,
    backoff_fits_max_deliver,
    backoff_is_positive,
    duplicate_window_outlasts_relay_lease,
    one_authentication_method,
    user_and_password_together,
    tls_cert_and_key_together,
    model_paths_are_dotted,
    dlq_limits_have_a_stream,
)
