"""Every ``JETSTREAM_BRIDGE`` key, declared once.

A ``Setting`` names its key (the ``BridgeConfig`` field is the key in lower case), the kind of
value it holds, its default, its documentation and its environment fallback. From ``SETTINGS``
come the per-key parse, the unknown-key check, the environment fallbacks ``conf.py`` reads, the
``jetstream_install`` settings block and the README's configuration table. Adding a setting
means one entry here and one field on ``BridgeConfig`` (a test checks the two agree).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..subjects import dlq_subject, stream_name
from .derived import DEFAULT_ENV, FollowsEnv, FollowsStreamName, dlq_stream_name
from .kinds import (
    Boolean,
    Choice,
    DottedPaths,
    Duration,
    Durations,
    Field,
    Integer,
    Kind,
    ModelPath,
    SecretText,
    StreamName,
    Subject,
    Text,
    Token,
    Tokens,
    Urls,
)
from .problems import UNKNOWN_KEY, Problem


@dataclass(frozen=True)
class Setting:
    """One key of ``JETSTREAM_BRIDGE``.

    ``doc`` is the one line the install block and ``describe_keys`` show; ``details`` adds what
    only the README's table says. ``env`` names the environment variable read when the key is
    absent or empty. A ``required`` key has no default; when it is missing it parses to ``""``
    and ``validators.destination_app_is_set`` reports it.
    """

    key: str
    kind: Kind
    default: Any
    doc: str
    details: str = ""
    env: str | None = None
    required: bool = False
    # The ``BridgeConfig`` field when it is not the key in lower case.
    field_name: str | None = None

    @property
    def field(self) -> str:
        """Return the ``BridgeConfig`` field that holds the parsed value."""
        return self.field_name or self.key.lower()

    @property
    def secret(self) -> bool:
        return self.kind.secret

    @property
    def follows_env(self) -> bool:
        return isinstance(self.default, FollowsEnv)

    def read(self, raw: Mapping[str, Any], values: Mapping[str, Any]) -> Field:
        """Return what the user wrote for this key; ``None`` or absent means the default."""
        default = self.default
        if isinstance(default, FollowsEnv):
            default = default.resolve(values)
        value = raw.get(self.key, default)
        if value is None and default is not None:
            value = default
        return Field(key=self.key, value=value, default=default)

    def parse(
        self, raw: Mapping[str, Any], values: Mapping[str, Any], problems: list[Problem]
    ) -> Any:
        """Return the parsed value; ``values`` holds the settings parsed before this one."""
        field = self.read(raw, values)
        if self.required and field.value in (None, "", [], ()):
            return self.kind.parse(Field(key=self.key, value=None, default=None), problems)
        return self.kind.parse(field, problems)

    def render_default(self) -> str:
        """Render the default for the README's table."""
        if self.required:
            return "—"
        if isinstance(self.default, FollowsEnv):
            return f"`{self.default.shown}`"
        if self.default is None:
            return "none"
        if isinstance(self.default, tuple):
            return f"`{json.dumps(list(self.default), separators=(',', ':'))}`"
        return f"`{self.default}`"


# In documentation order. ENV comes before the settings whose default follows it.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        key="NATS_URLS",
        kind=Urls(),
        default="nats://localhost:4222",
        doc="server URLs, a list or a comma-separated string",
        details="several for a cluster",
        env="NATS_URLS",
    ),
    Setting(
        key="ENV",
        kind=Token(),
        default=DEFAULT_ENV,
        doc="environment token used as subject and stream prefix",
        env="NATS_ENV",
    ),
    Setting(
        key="APP_NAME",
        kind=Token(),
        default="app",
        doc="this service's token",
        env="APP_NAME",
    ),
    Setting(
        key="DESTINATION_APP",
        kind=Tokens(),
        default=None,
        doc="the peer service's token, or a list of peers (required)",
        details="a list (env: comma separated) makes several peers; the first is the default "
        "where one is needed",
        env="DESTINATION_APP",
        required=True,
        field_name="destination_apps",
    ),
    Setting(
        key="MAX_DELIVER",
        kind=Integer(minimum=1),
        default=5,
        doc="deliveries before a message is dead-lettered",
    ),
    Setting(
        key="ACK_WAIT",
        kind=Duration(),
        default="30s",
        doc="how long the server waits for an ack",
        details="then it redelivers",
    ),
    Setting(
        key="BACKOFF",
        kind=Durations(),
        default=("1s", "5s", "15s", "30s", "60s"),
        doc="redelivery delays after failures",
        details="value n delays delivery n+1 after delivery n failed; at most `MAX_DELIVER` values",
    ),
    Setting(
        key="MAX_ACK_PENDING",
        kind=Integer(minimum=1),
        default=1000,
        doc="unacknowledged messages the server lets the consumer hold",
        details="per durable",
    ),
    Setting(
        key="USE_OUTBOX",
        kind=Boolean(),
        default=True,
        doc="write events to the outbox table in the caller's transaction",
    ),
    Setting(
        key="USE_INBOX",
        kind=Boolean(),
        default=True,
        doc="record received events for idempotent processing",
    ),
    Setting(
        key="USE_DLQ",
        kind=Boolean(),
        default=True,
        doc="dead-letter messages that cannot be processed",
    ),
    Setting(
        key="OUTBOX_MODEL",
        kind=ModelPath(),
        default="jetstream_bridge.OutboxEvent",
        doc="app_label.Model of the outbox",
        details="your own table works too: the bridge writes its rows with plain `INSERT`s "
        "(field defaults apply, `save()` and model signals do not run)",
    ),
    Setting(
        key="INBOX_MODEL",
        kind=ModelPath(),
        default="jetstream_bridge.InboxEvent",
        doc="app_label.Model of the inbox",
        details="your own table works too, written as for `OUTBOX_MODEL`",
    ),
    Setting(
        key="STREAM_NAME",
        kind=StreamName(),
        default=FollowsEnv(stream_name),
        doc="JetStream stream name",
    ),
    Setting(
        key="DLQ_SUBJECT",
        kind=Subject(),
        default=FollowsEnv(dlq_subject),
        doc="dead-letter subject",
    ),
    Setting(
        key="DLQ_STREAM_NAME",
        kind=StreamName(),
        default=FollowsStreamName(dlq_stream_name),
        doc="stream that keeps the dead letters, apart from the events",
        details="created by `jetstream_ensure_topology` with its own limits (`DLQ_MAX_AGE`, "
        "`DLQ_MAX_BYTES`), so a flood of dead letters never evicts a live event; set it to "
        "`STREAM_NAME` to keep them in the events' stream. An existing stream that already "
        "captures `DLQ_SUBJECT` is left as it is until `jetstream_ensure_topology --move-dlq`",
    ),
    Setting(
        key="DLQ_MAX_AGE",
        kind=Duration(),
        default="30d",
        doc="discard dead letters older than this (0 keeps them)",
        details="applies to the DLQ stream of its own",
    ),
    Setting(
        key="DLQ_MAX_BYTES",
        kind=Integer(minimum=1),
        default=None,
        doc="DLQ stream size limit in bytes (None is unlimited)",
        details="when full, the oldest dead letters go first; the server reserves this much "
        "storage for the stream when it is created, so size it to what the server has",
    ),
    Setting(
        key="DLQ_SIGNING_KEY",
        kind=SecretText(),
        default=None,
        doc="key the consumer signs its dead letters with (secret)",
        details="an HMAC-SHA256 of body and headers in `Jsb-Signature`; `jetstream_dlq` then "
        "marks letters without a valid one `unverified` and replays them only with "
        "`--include-unverified`; 32 or more random characters, e.g. `secrets.token_hex(32)`",
    ),
    Setting(
        key="STREAM_STORAGE",
        kind=Choice(("file", "memory")),
        default="file",
        doc="file or memory",
    ),
    Setting(
        key="STREAM_REPLICAS",
        kind=Integer(minimum=1, maximum=5),
        default=1,
        doc="stream replicas (1-5)",
        details="use 3 on a cluster",
    ),
    Setting(
        key="STREAM_RETENTION",
        kind=Choice(("limits", "interest", "workqueue")),
        default="limits",
        doc="limits, interest or workqueue",
    ),
    Setting(
        key="STREAM_MAX_AGE",
        kind=Duration(),
        default=None,
        doc="discard messages older than this (None keeps them)",
        details="like every stream limit, applied to an existing stream only when set "
        "(`0` enforces no limit; see Stream ownership)",
    ),
    Setting(
        key="STREAM_MAX_BYTES",
        kind=Integer(minimum=0),
        default=None,
        doc="stream size limit in bytes (None is unlimited)",
        details="`0` enforces no limit on an existing stream",
    ),
    Setting(
        key="DUPLICATE_WINDOW",
        kind=Duration(),
        default="2m",
        doc="server-side dedupe window for Nats-Msg-Id",
        details="must exceed `RELAY_LEASE`",
    ),
    Setting(
        key="AUTO_PROVISION",
        kind=Boolean(),
        default=True,
        doc="when a publish finds no stream capturing its subject, create this service's "
        "subjects (as `jetstream_ensure_topology` does, stream side) once per process and retry",
        details="set it to False where the service's NATS user may not manage streams; its "
        "publishes then fail with an error naming who must run `jetstream_ensure_topology`",
    ),
    Setting(
        key="CONNECT_TIMEOUT",
        kind=Duration(),
        default="5s",
        doc="how long the first connect may take",
    ),
    Setting(
        key="REQUEST_TIMEOUT",
        kind=Duration(),
        default="5s",
        doc="how long a JetStream API call or publish ack may take",
    ),
    Setting(
        key="CONNECTION_NAME",
        kind=Text(),
        default=None,
        doc="name shown in the server's connection list",
    ),
    Setting(
        key="USER",
        kind=Text(),
        default=None,
        doc="user name",
        details="with `PASSWORD`",
    ),
    Setting(key="PASSWORD", kind=SecretText(), default=None, doc="password (secret)"),
    Setting(key="TOKEN", kind=SecretText(), default=None, doc="auth token (secret)"),
    Setting(key="NKEY_SEED", kind=SecretText(), default=None, doc="nkey seed string (secret)"),
    Setting(key="CREDS_FILE", kind=Text(), default=None, doc="path of a .creds file"),
    Setting(key="TLS_CA_FILE", kind=Text(), default=None, doc="CA bundle to verify the server"),
    Setting(
        key="TLS_CERT_FILE",
        kind=Text(),
        default=None,
        doc="client certificate",
        details="with `TLS_KEY_FILE`",
    ),
    Setting(key="TLS_KEY_FILE", kind=Text(), default=None, doc="client key"),
    Setting(
        key="TLS_HANDSHAKE_FIRST",
        kind=Boolean(),
        default=False,
        doc="start TLS before the server's INFO",
        details="for a server configured with `handshake_first`; with any TLS setting or a "
        "`tls://` URL the connection is TLS or it fails, and no credentials are sent in "
        "plaintext",
    ),
    Setting(
        key="HEALTH_TOKEN",
        kind=SecretText(),
        default=None,
        doc="bearer token that shows the health view's details (secret)",
        details="without it, or a staff login, the view answers only the status",
    ),
    Setting(
        key="METRICS_TOKEN",
        kind=SecretText(),
        default=None,
        doc="bearer token that may read `metrics_view` (secret)",
        details="without it, or a staff login, the view answers 403",
    ),
    Setting(
        key="RELAY_BATCH_SIZE",
        kind=Integer(minimum=1),
        default=1000,
        doc="rows a relay claims at once",
    ),
    Setting(
        key="RELAY_LEASE",
        kind=Duration(),
        default="60s",
        doc="the longest a relay may hold a batch (row locks or a lease)",
        details="PostgreSQL ends a relay session idle that long in its transaction (row locks); "
        "on SQLite, after that long another relay may re-send a leased row",
    ),
    Setting(
        key="RELAY_POLL_INTERVAL",
        kind=Duration(),
        default="1s",
        doc="how often the relay polls when nothing wakes it",
    ),
    Setting(
        key="RELAY_RETRY_BACKOFF",
        kind=Durations(),
        default=("1s", "5s", "30s", "2m", "10m"),
        doc="delays before re-sending a row that failed",
    ),
    Setting(
        key="OUTBOX_ORDERING",
        kind=Boolean(),
        default=False,
        doc="publish a resource's events strictly in creation order",
    ),
    Setting(
        key="OUTBOX_FAST_PATH",
        kind=Boolean(),
        default=True,
        doc="publish right after commit instead of waiting for the relay",
        details="off: the relay sends everything, woken by PostgreSQL `NOTIFY`",
    ),
    Setting(
        key="HANDLER_SAVEPOINTS",
        kind=Choice(("on_failure", "always")),
        default="on_failure",
        doc="on_failure (a savepoint per message only when redoing a batch whose handler "
        "failed) or always (a savepoint per message in every batch)",
        details="with `on_failure` a consumer batch runs its handlers without savepoints; if "
        "one fails, the batch rolls back and is redone with a savepoint per message, the failed "
        "handler not run again, so **the other handlers of that batch run twice, their database "
        "writes applied once**; `always` costs two more round trips per message and no handler "
        "runs twice in a batch. Either way, side effects outside the database must tolerate "
        "reruns (delivery is at-least-once)",
    ),
    Setting(
        key="MIDDLEWARE",
        kind=DottedPaths(),
        default=(),
        doc="dotted paths of middleware around every handler call, the first outermost",
    ),
    Setting(
        key="OTEL_TRACING",
        kind=Boolean(),
        default=True,
        doc="trace publishes and handlers with OpenTelemetry (when the `otel` extra is installed)",
    ),
)

# key -> meaning, in documentation order.
KNOWN_KEYS: dict[str, str] = {setting.key: setting.doc for setting in SETTINGS}

# settings key -> environment variable consulted when the key is absent or empty.
ENV_FALLBACKS: dict[str, str] = {
    setting.key: setting.env for setting in SETTINGS if setting.env is not None
}


def parse_settings(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Parse every key on its own; return ``BridgeConfig`` field -> value, and the problems."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for setting in SETTINGS:
        values[setting.field] = setting.parse(raw, values, problems)
    return values, problems


def unknown_keys(raw: Mapping[Any, Any]) -> list[Problem]:
    """Report each key of ``raw`` that is not a setting, suggesting the closest one."""
    problems = []
    for key in raw:
        if key in KNOWN_KEYS:
            continue
        close = difflib.get_close_matches(str(key).upper(), KNOWN_KEYS, n=1, cutoff=0.6)
        hint = f"Did you mean {close[0]!r}?" if close else f"Known keys: {', '.join(KNOWN_KEYS)}."
        problems.append(
            UNKNOWN_KEY.problem(str(key), f"JETSTREAM_BRIDGE has an unknown key {key!r}.", hint)
        )
    return problems


def in_key_order(problems: list[Problem]) -> list[Problem]:
    """Sort problems by the documentation order of their key, keeping each key's own order."""
    position = {setting.key: index for index, setting in enumerate(SETTINGS)}
    return sorted(problems, key=lambda problem: position.get(problem.key or "", len(position)))


def settings_table() -> str:
    """Render the README's configuration table (Markdown) from ``SETTINGS``."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        key = f"`{setting.key}`"
        if setting.env:
            key += f" (env `{setting.env}`)"
        meaning = f"{setting.doc}; {setting.details}" if setting.details else setting.doc
        lines.append(f"| {key} | {setting.render_default()} | {meaning} |")
    return "\n".join(lines) + "\n"
