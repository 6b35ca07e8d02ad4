"""Parse the ``JETSTREAM_BRIDGE`` settings into an immutable, validated ``BridgeConfig``.

One parser serves two callers: Django system checks (which report every ``Problem`` at once)
and the runtime (which raises on the first use of a misconfigured bridge). Nothing here
imports Django.

The parse has three steps: every key on its own (``schema.SETTINGS``, where each
setting is declared), then the rules that span keys (``validators.VALIDATORS``), then the
problems sorted into documentation order with unknown keys first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..durations import format_duration
from ..redaction import Secret, redact_url
from ..subjects import Subjects
from .problems import NOT_A_DICT, Problem
from .schema import KNOWN_KEYS, in_key_order, parse_settings, unknown_keys
from .validators import VALIDATORS

__all__ = ["BridgeConfig", "describe_keys", "explicit_keys", "parse_config"]


@dataclass(frozen=True)
class BridgeConfig:
    """Validated settings. Durations are seconds (floats); secrets are ``Secret``."""

    nats_urls: tuple[str, ...]
    env: str
    app_name: str
    # The default peer (the first of ``destination_apps``); either may be given, the other
    # follows. ``destination_apps`` lists every peer in the order the settings name them.
    destination_app: str = ""
    destination_apps: tuple[str, ...] = ()
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
    dlq_stream_name: str = ""
    dlq_max_age: float | None = 30 * 86400.0
    dlq_max_bytes: int | None = None
    dlq_signing_key: Secret | None = field(default=None, repr=False)
    stream_storage: str = "file"
    stream_replicas: int = 1
    stream_retention: str = "limits"
    stream_max_age: float | None = None
    stream_max_bytes: int | None = None
    duplicate_window: float = 120.0
    auto_provision: bool = True
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
    tls_handshake_first: bool = False
    health_token: Secret | None = field(default=None, repr=False)
    metrics_token: Secret | None = field(default=None, repr=False)
    relay_batch_size: int = 1000
    relay_lease: float = 60.0
    relay_poll_interval: float = 1.0
    relay_retry_backoff: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0)
    outbox_ordering: bool = False
    outbox_fast_path: bool = True
    handler_savepoints: str = "on_failure"
    middleware: tuple[str, ...] = ()
    otel_tracing: bool = True
    # The keys the user gave (in JETSTREAM_BRIDGE or through their environment variable), as
    # opposed to defaults: a stream limit left unset is not enforced on an existing stream.
    explicit: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.destination_apps and not self.destination_app:
            object.__setattr__(self, "destination_app", self.destination_apps[0])
        elif self.destination_app and not self.destination_apps:
            object.__setattr__(self, "destination_apps", (self.destination_app,))
        elif self.destination_app and self.destination_app not in self.destination_apps:
            raise ValueError(
                f"destination_app {self.destination_app!r} is not one of destination_apps "
                f"{list(self.destination_apps)!r}"
            )

    @property
    def destinations(self) -> tuple[str, ...]:
        """Every peer this service exchanges events with, the default first."""
        return self.destination_apps

    @property
    def subjects(self) -> Subjects:
        """The subjects shared with the default peer (the first destination)."""
        return self.subjects_for(self.destination_app)

    def subjects_for(self, peer: str) -> Subjects:
        """The subjects shared with ``peer``: what we publish to it and what it sends us."""
        return Subjects.build(self.env, self.app_name, peer, self.dlq_subject)

    @property
    def peer_subjects(self) -> tuple[Subjects, ...]:
        """``subjects_for`` every destination, in settings order."""
        return tuple(self.subjects_for(peer) for peer in self.destination_apps)

    @property
    def separate_dlq_stream(self) -> bool:
        """Tell whether dead letters belong in a stream of their own (``DLQ_STREAM_NAME``)."""
        return self.use_dlq and self.dlq_stream_name not in ("", self.stream_name)

    @property
    def redacted_urls(self) -> tuple[str, ...]:
        return tuple(redact_url(url) for url in self.nats_urls)

    def __repr__(self) -> str:
        return (
            f"BridgeConfig(nats_urls={list(self.redacted_urls)!r}, env={self.env!r}, "
            f"app_name={self.app_name!r}, destination_apps={list(self.destination_apps)!r}, "
            f"stream_name={self.stream_name!r}, max_deliver={self.max_deliver}, "
            f"ack_wait={format_duration(self.ack_wait)!r}, "
            f"backoff={[format_duration(b) for b in self.backoff]!r}, "
            f"use_outbox={self.use_outbox}, use_inbox={self.use_inbox}, use_dlq={self.use_dlq})"
        )


def parse_config(raw: object) -> tuple[BridgeConfig | None, list[Problem]]:
    """Validate ``raw`` (the merged settings dict) and return the config and every problem.

    The config is ``None`` when any problem is an error.
    """
    if not isinstance(raw, Mapping):
        return None, [
            NOT_A_DICT.problem(
                None,
                f"JETSTREAM_BRIDGE must be a dict, got {type(raw).__name__}.",
                "Write JETSTREAM_BRIDGE = {'DESTINATION_APP': 'billing'} in your settings.",
            )
        ]
    values, problems = parse_settings(raw)
    for validate in VALIDATORS:
        problems.extend(validate(values, raw))
    problems = unknown_keys(raw) + in_key_order(problems)
    if any(problem.is_error for problem in problems):
        return None, problems
    return BridgeConfig(**values, explicit=explicit_keys(raw)), problems


def explicit_keys(raw: Mapping[str, object]) -> frozenset[str]:
    """Return the known keys ``raw`` gives a value (``None`` and ``""`` mean the default)."""
    return frozenset(key for key in KNOWN_KEYS if raw.get(key) not in (None, ""))


def describe_keys() -> list[tuple[str, str]]:
    """Return ``(key, meaning)`` for documentation and the install command."""
    return list(KNOWN_KEYS.items())
