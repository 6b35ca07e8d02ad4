"""Parse the ``JETSTREAM_BRIDGE`` settings into an immutable, validated ``BridgeConfig``.

One parser serves two callers: Django system checks (which report every ``Problem`` at once)
and the runtime (which raises on the first use of a misconfigured bridge). Nothing here
imports Django.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .durations import format_duration, parse_duration
from .problems import Problem, first_error
from .redaction import Secret, redact_url
from .subjects import (
    Subjects,
    dlq_subject,
    is_reserved,
    stream_name,
    subject_problem,
    token_problem,
)

__all__ = [
    "KNOWN_KEYS",
    "BridgeConfig",
    "Problem",
    "Secret",
    "describe_keys",
    "first_error",
    "parse_config",
    "redact_url",
]

DEFAULT_BACKOFF = ("1s", "5s", "15s", "30s", "60s")
STORAGE_CHOICES = ("file", "memory")
RETENTION_CHOICES = ("limits", "interest", "workqueue")
HANDLER_SAVEPOINTS_CHOICES = ("on_failure", "always")
_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class BridgeConfig:
    """Validated settings. Durations are seconds (floats); secrets are ``Secret``."""

    nats_urls: tuple[str, ...]
    env: str
    app_name: str
    destination_app: str
    max_deliver: int = 5
    ack_wait: float = 30.0
    backoff: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0, 60.0)
    max_ack_pending: int = 1000
    use_outbox: bool = True
    use_inbox: bool = True
    use_dlq: bool = True
    outbox_model: str = "jetstream_bridge.OutboxEvent"
    inbox_model: str = "jetstream_bridge.InboxEvent"
    stream_name: str = ""
    dlq_subject: str = ""
    stream_storage: str = "file"
    stream_replicas: int = 1
    stream_retention: str = "limits"
    stream_max_age: float | None = None
    stream_max_bytes: int | None = None
    duplicate_window: float = 120.0
    connect_timeout: float = 5.0
    request_timeout: float = 5.0
    connection_name: str | None = None
    user: str | None = None
    password: Secret | None = field(default=None, repr=False)
    token: Secret | None = field(default=None, repr=False)
    nkey_seed: Secret | None = field(default=None, repr=False)
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    relay_batch_size: int = 1000
    relay_lease: float = 60.0
    relay_poll_interval: float = 1.0
    relay_retry_backoff: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0)
    outbox_ordering: bool = False
    outbox_fast_path: bool = True
    handler_savepoints: str = "on_failure"

    @property
    def subjects(self) -> Subjects:
        return Subjects.build(self.env, self.app_name, self.destination_app, self.dlq_subject)

    @property
    def redacted_urls(self) -> tuple[str, ...]:
        return tuple(redact_url(url) for url in self.nats_urls)

    def __repr__(self) -> str:
        return (
            f"BridgeConfig(nats_urls={list(self.redacted_urls)!r}, env={self.env!r}, "
            f"app_name={self.app_name!r}, destination_app={self.destination_app!r}, "
            f"stream_name={self.stream_name!r}, max_deliver={self.max_deliver}, "
            f"ack_wait={format_duration(self.ack_wait)!r}, "
            f"backoff={[format_duration(b) for b in self.backoff]!r}, "
            f"use_outbox={self.use_outbox}, use_inbox={self.use_inbox}, use_dlq={self.use_dlq})"
        )


# key -> meaning, in documentation order.
KNOWN_KEYS: dict[str, str] = {
    "NATS_URLS": "server URLs, a list or a comma-separated string",
    "ENV": "environment token used as subject and stream prefix",
    "APP_NAME": "this service's token",
    "DESTINATION_APP": "the peer service's token (required)",
    "MAX_DELIVER": "deliveries before a message is dead-lettered",
    "ACK_WAIT": "how long the server waits for an ack",
    "BACKOFF": "redelivery delays after failures",
    "MAX_ACK_PENDING": "unacknowledged messages the server lets the consumer hold",
    "USE_OUTBOX": "write events to the outbox table in the caller's transaction",
    "USE_INBOX": "record received events for idempotent processing",
    "USE_DLQ": "dead-letter messages that cannot be processed",
    "OUTBOX_MODEL": "app_label.Model of the outbox",
    "INBOX_MODEL": "app_label.Model of the inbox",
    "STREAM_NAME": "JetStream stream name",
    "DLQ_SUBJECT": "dead-letter subject",
    "STREAM_STORAGE": "file or memory",
    "STREAM_REPLICAS": "stream replicas (1-5)",
    "STREAM_RETENTION": "limits, interest or workqueue",
    "STREAM_MAX_AGE": "discard messages older than this (None keeps them)",
    "STREAM_MAX_BYTES": "stream size limit in bytes (None is unlimited)",
    "DUPLICATE_WINDOW": "server-side dedupe window for Nats-Msg-Id",
    "CONNECT_TIMEOUT": "how long the first connect may take",
    "REQUEST_TIMEOUT": "how long a JetStream API call or publish ack may take",
    "CONNECTION_NAME": "name shown in the server's connection list",
    "USER": "user name",
    "PASSWORD": "password (secret)",
    "TOKEN": "auth token (secret)",
    "NKEY_SEED": "nkey seed string (secret)",
    "CREDS_FILE": "path of a .creds file",
    "TLS_CA_FILE": "CA bundle to verify the server",
    "TLS_CERT_FILE": "client certificate",
    "TLS_KEY_FILE": "client key",
    "RELAY_BATCH_SIZE": "rows a relay claims at once",
    "RELAY_LEASE": "the longest a relay may hold a batch (row locks or a lease)",
    "RELAY_POLL_INTERVAL": "how often the relay polls when nothing wakes it",
    "RELAY_RETRY_BACKOFF": "delays before re-sending a row that failed",
    "OUTBOX_ORDERING": "publish a resource's events strictly in creation order",
    "OUTBOX_FAST_PATH": "publish right after commit instead of waiting for the relay",
    "HANDLER_SAVEPOINTS": "on_failure (a savepoint per message only when redoing a batch whose "
    "handler failed) or always (a savepoint per message in every batch)",
}


class _Parser:
    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        self.problems: list[Problem] = []

    def problem(self, id_: str, key: str | None, msg: str, hint: str) -> None:
        self.problems.append(Problem(id=id_, msg=msg, hint=hint, key=key))

    def get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key, default)
        return default if value is None and default is not None else value

    def token(self, key: str, default: str | None) -> str:
        value = self.get(key, default)
        if value is None:
            return ""
        problem = token_problem(value)
        if problem:
            self.problem(
                "E004",
                key,
                f"JETSTREAM_BRIDGE[{key!r}] = {value!r} {problem}.",
                f"Use a plain name such as 'orders' or 'billing-service', for example "
                f"JETSTREAM_BRIDGE = {{..., {key!r}: 'orders'}}.",
            )
            return ""
        return str(value)

    def duration(self, key: str, default: Any, *, allow_none: bool = False) -> Any:
        value = self.get(key, default)
        if value is None and allow_none:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.problem(
                "E005",
                key,
                f"JETSTREAM_BRIDGE[{key!r}]: {exc}.",
                f"Write {key!r}: '30s' (units: ms, s, m, h, d) or a number of seconds.",
            )
            return parse_duration(default) if default is not None else None
        return seconds

    def durations(self, key: str, default: Sequence[Any]) -> tuple[float, ...]:
        value = self.get(key, default)
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            self.problem(
                "E005",
                key,
                f"JETSTREAM_BRIDGE[{key!r}] must be a list of durations, got {value!r}.",
                f"Write {key!r}: ['1s', '5s', '15s'].",
            )
            return tuple(parse_duration(v) for v in default)
        result = []
        for item in value:
            try:
                result.append(parse_duration(item))
            except ValueError as exc:
                self.problem(
                    "E005",
                    key,
                    f"JETSTREAM_BRIDGE[{key!r}]: {exc}.",
                    f"Write {key!r}: ['1s', '5s', '15s'] (units: ms, s, m, h, d).",
                )
        return tuple(result)

    def integer(
        self,
        key: str,
        default: int | None,
        *,
        minimum: int,
        maximum: int | None = None,
        allow_none: bool = False,
    ) -> Any:
        value = self.get(key, default)
        if value is None and allow_none:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, str) and value.strip().isdigit():
            value, ok = int(value), True
        if not ok or value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            self.problem(
                "E007",
                key,
                f"JETSTREAM_BRIDGE[{key!r}] must be an integer {bounds}, got {value!r}.",
                f"Write {key!r}: {default if default is not None else minimum}.",
            )
            return default
        return int(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        self.problem(
            "E010",
            key,
            f"JETSTREAM_BRIDGE[{key!r}] must be True or False, got {value!r}.",
            f"Write {key!r}: {default}.",
        )
        return default

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = self.get(key, default)
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        self.problem(
            "E009",
            key,
            f"JETSTREAM_BRIDGE[{key!r}] must be one of {', '.join(choices)}; got {value!r}.",
            f"Write {key!r}: {default!r}.",
        )
        return default

    def optional_text(self, key: str) -> str | None:
        value = self.get(key, None)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            self.problem(
                "E007",
                key,
                f"JETSTREAM_BRIDGE[{key!r}] must be a string.",
                f"Write {key!r}: '...'.",
            )
            return None
        return value

    def secret(self, key: str) -> Secret | None:
        value = self.get(key, None)
        if isinstance(value, Secret):
            return value
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            self.problem(
                "E007",
                key,
                f"JETSTREAM_BRIDGE[{key!r}] must be a string.",
                f"Read it from the environment, e.g. {key!r}: env('NATS_{key}').",
            )
            return None
        return Secret(value)

    def urls(self) -> tuple[str, ...]:
        value = self.get("NATS_URLS", "nats://localhost:4222")
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if not isinstance(value, (list, tuple)) or not value:
            value = [value]
        good: list[str] = []
        for url in value:
            try:
                parts = urlsplit(url) if isinstance(url, str) else None
                ok = bool(parts and parts.scheme in ("nats", "tls", "ws", "wss") and parts.hostname)
                if ok and parts is not None:
                    _ = parts.port  # raises ValueError for a bad port
            except ValueError:
                ok = False
            if not ok:
                shown = redact_url(url) if isinstance(url, str) else repr(url)
                self.problem(
                    "E008",
                    "NATS_URLS",
                    f"JETSTREAM_BRIDGE['NATS_URLS'] has an invalid URL: {shown}.",
                    "Write 'NATS_URLS': ['nats://host:4222'] or set NATS_URLS="
                    "nats://host1:4222,nats://host2:4222 in the environment.",
                )
            else:
                good.append(url)
        return tuple(good)

    def subject(self, key: str, default: str) -> str:
        value = self.get(key, default)
        problem = subject_problem(value, allow_wildcards=False)
        if problem is None and is_reserved(value):
            problem = "must not overlap JetStream's own $JS.API subjects"
        if problem:
            self.problem(
                "E011",
                key,
                f"JETSTREAM_BRIDGE[{key!r}] = {value!r} {problem}.",
                f"Leave it out to use {default!r}, or write a dotted subject with no wildcards.",
            )
            return default
        return str(value)

    def stream(self, default: str) -> str:
        value = self.get("STREAM_NAME", default)
        if not isinstance(value, str) or not _STREAM_NAME.match(value) or len(value) > 255:
            self.problem(
                "E011",
                "STREAM_NAME",
                f"JETSTREAM_BRIDGE['STREAM_NAME'] = {value!r} is not a valid stream name.",
                f"Use letters, digits, '-' and '_' only, e.g. {default!r}.",
            )
            return default
        return value


def parse_config(raw: object) -> tuple[BridgeConfig | None, list[Problem]]:
    """Validate ``raw`` (the merged settings dict) and return the config and every problem.

    The config is ``None`` when any problem is an error.
    """
    if not isinstance(raw, Mapping):
        return None, [
            Problem(
                "E001",
                f"JETSTREAM_BRIDGE must be a dict, got {type(raw).__name__}.",
                "Write JETSTREAM_BRIDGE = {'DESTINATION_APP': 'billing'} in your settings.",
            )
        ]
    p = _Parser(raw)
    for key in raw:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(str(key).upper(), KNOWN_KEYS, n=1, cutoff=0.6)
            hint = (
                f"Did you mean {close[0]!r}?" if close else f"Known keys: {', '.join(KNOWN_KEYS)}."
            )
            p.problem("E002", str(key), f"JETSTREAM_BRIDGE has an unknown key {key!r}.", hint)

    env = p.token("ENV", "development")
    app = p.token("APP_NAME", "app")
    dest_raw = raw.get("DESTINATION_APP")
    if dest_raw is None or dest_raw == "":
        p.problem(
            "E003",
            "DESTINATION_APP",
            "JETSTREAM_BRIDGE['DESTINATION_APP'] is not set; the bridge cannot name its subjects.",
            "Add 'DESTINATION_APP': 'billing' (the APP_NAME of the service you exchange events "
            "with) to JETSTREAM_BRIDGE, or set DESTINATION_APP=billing in the environment.",
        )
        dest = ""
    else:
        dest = p.token("DESTINATION_APP", None)
    if app and dest and app == dest:
        p.problem(
            "W001",
            "DESTINATION_APP",
            f"APP_NAME and DESTINATION_APP are both {app!r}; the service would consume "
            "its own events.",
            "Give each service its own APP_NAME and point DESTINATION_APP at the other.",
        )

    max_deliver = p.integer("MAX_DELIVER", 5, minimum=1)
    backoff = p.durations("BACKOFF", DEFAULT_BACKOFF)
    if max_deliver is not None and len(backoff) > max_deliver:
        p.problem(
            "E006",
            "BACKOFF",
            f"JETSTREAM_BRIDGE['BACKOFF'] has {len(backoff)} delays but MAX_DELIVER is "
            f"{max_deliver}; the extra delays can never be used.",
            f"Shorten BACKOFF to at most {max_deliver} values "
            f"(e.g. {[format_duration(b) for b in backoff[:max_deliver]]!r}) or raise "
            f"MAX_DELIVER to {len(backoff)}.",
        )
    if any(b <= 0 for b in backoff):
        p.problem(
            "E005",
            "BACKOFF",
            "JETSTREAM_BRIDGE['BACKOFF'] delays must be positive.",
            "Write 'BACKOFF': ['1s', '5s', '15s'].",
        )

    env_for_defaults = env or "development"
    relay_lease = p.duration("RELAY_LEASE", "60s")
    duplicate_window = p.duration("DUPLICATE_WINDOW", "2m")
    if relay_lease and duplicate_window is not None and duplicate_window <= relay_lease:
        p.problem(
            "E015",
            "DUPLICATE_WINDOW",
            f"DUPLICATE_WINDOW ({format_duration(duplicate_window)}) must be longer than "
            f"RELAY_LEASE ({format_duration(relay_lease)}); otherwise a relay that re-sends "
            "an expired lease can duplicate events.",
            f"Write 'DUPLICATE_WINDOW': '{format_duration(max(120.0, relay_lease * 2))}'.",
        )
    user = p.optional_text("USER")
    password = p.secret("PASSWORD")
    token = p.secret("TOKEN")
    nkey_seed = p.secret("NKEY_SEED")
    creds_file = p.optional_text("CREDS_FILE")
    methods = [
        name
        for name, value in (
            ("USER/PASSWORD", user or password),
            ("TOKEN", token),
            ("NKEY_SEED", nkey_seed),
            ("CREDS_FILE", creds_file),
        )
        if value
    ]
    if len(methods) > 1:
        p.problem(
            "E014",
            methods[1].split("/")[0],
            f"JETSTREAM_BRIDGE sets more than one authentication method: {', '.join(methods)}.",
            "Keep exactly one of USER/PASSWORD, TOKEN, NKEY_SEED or CREDS_FILE.",
        )
    if (user is None) != (password is None):
        p.problem(
            "E014",
            "PASSWORD",
            "JETSTREAM_BRIDGE sets USER without PASSWORD or the other way round.",
            "Set both 'USER' and 'PASSWORD', or neither.",
        )
    tls_cert, tls_key = p.optional_text("TLS_CERT_FILE"), p.optional_text("TLS_KEY_FILE")
    if (tls_cert is None) != (tls_key is None):
        p.problem(
            "E014",
            "TLS_KEY_FILE",
            "TLS_CERT_FILE and TLS_KEY_FILE must be set together.",
            "Set both for a client certificate, or neither.",
        )

    kwargs: dict[str, Any] = dict(
        nats_urls=p.urls(),
        env=env,
        app_name=app,
        destination_app=dest,
        max_deliver=max_deliver,
        ack_wait=p.duration("ACK_WAIT", "30s"),
        backoff=backoff,
        max_ack_pending=p.integer("MAX_ACK_PENDING", 1000, minimum=1),
        use_outbox=p.boolean("USE_OUTBOX", True),
        use_inbox=p.boolean("USE_INBOX", True),
        use_dlq=p.boolean("USE_DLQ", True),
        outbox_model=p.get("OUTBOX_MODEL", "jetstream_bridge.OutboxEvent"),
        inbox_model=p.get("INBOX_MODEL", "jetstream_bridge.InboxEvent"),
        stream_name=p.stream(stream_name(env_for_defaults)),
        dlq_subject=p.subject("DLQ_SUBJECT", dlq_subject(env_for_defaults)),
        stream_storage=p.choice("STREAM_STORAGE", "file", STORAGE_CHOICES),
        stream_replicas=p.integer("STREAM_REPLICAS", 1, minimum=1, maximum=5),
        stream_retention=p.choice("STREAM_RETENTION", "limits", RETENTION_CHOICES),
        stream_max_age=p.duration("STREAM_MAX_AGE", None, allow_none=True),
        stream_max_bytes=p.integer("STREAM_MAX_BYTES", None, minimum=1, allow_none=True),
        duplicate_window=duplicate_window,
        connect_timeout=p.duration("CONNECT_TIMEOUT", "5s"),
        request_timeout=p.duration("REQUEST_TIMEOUT", "5s"),
        connection_name=p.optional_text("CONNECTION_NAME"),
        user=user,
        password=password,
        token=token,
        nkey_seed=nkey_seed,
        creds_file=creds_file,
        tls_ca_file=p.optional_text("TLS_CA_FILE"),
        tls_cert_file=tls_cert,
        tls_key_file=tls_key,
        relay_batch_size=p.integer("RELAY_BATCH_SIZE", 1000, minimum=1),
        relay_lease=relay_lease,
        relay_poll_interval=p.duration("RELAY_POLL_INTERVAL", "1s"),
        relay_retry_backoff=p.durations("RELAY_RETRY_BACKOFF", ("1s", "5s", "30s", "2m", "10m")),
        outbox_ordering=p.boolean("OUTBOX_ORDERING", False),
        outbox_fast_path=p.boolean("OUTBOX_FAST_PATH", True),
        handler_savepoints=p.choice("HANDLER_SAVEPOINTS", "on_failure", HANDLER_SAVEPOINTS_CHOICES),
    )
    for key in ("OUTBOX_MODEL", "INBOX_MODEL"):
        value = kwargs[key.lower()]
        if not isinstance(value, str) or value.count(".") != 1:
            p.problem(
                "E012",
                key,
                f"JETSTREAM_BRIDGE[{key!r}] = {value!r} is not an 'app_label.ModelName' string.",
                f"Write {key!r}: 'myapp.MyModel', or leave it out for the built-in model.",
            )
    if any(problem.is_error for problem in p.problems):
        return None, p.problems
    return BridgeConfig(**kwargs), p.problems


def describe_keys() -> list[tuple[str, str]]:
    """Return ``(key, meaning)`` for documentation and the install command."""
    return list(KNOWN_KEYS.items())
