"""Pure decisions about a stream's settings: what differs, what to apply, who owns a limit.

Ownership, when several services share one stream: a setting the user left unset is not
touched on an existing stream (its default is used only to create the stream); a setting the
user gave is enforced, and the value enforced is recorded in the stream's ``metadata`` under
``jetstream_bridge.<field>.owner`` (the ``APP_NAME``) and ``jetstream_bridge.<field>.value``.
When another app recorded a different value, that is a conflict: reported, not overwritten
(unless ``take_over``) — also when the server lost the owner's value to someone who writes no
metadata (a partial update): that drift is the owner's to re-apply, not the next app's to claim.
A given value the server already holds, with no owner recorded, is claimed (metadata only), so
the first app to agree with a stream owns its limit. A partial update that drops ``metadata``
altogether erases ownership: the next ensure of any app that gives the key re-applies its value
and owns it.

A limit that would discard messages the stream holds now (a smaller ``max_bytes`` than it
stores, a ``max_age`` younger than its oldest message) is held back unless ``allow_discard``:
the server would delete them at once, other apps' unconsumed events included.

Retention and storage are never changed here: the answer says what differs and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .durations import NANOS_PER_SECOND, format_duration, to_nanos
from .settings import BridgeConfig

METADATA_PREFIX = "jetstream_bridge"


@dataclass(frozen=True)
class StreamSetting:
    """A stream field the bridge manages and the setting that gives it."""

    field: str  # the server's config field
    key: str  # the JETSTREAM_BRIDGE key
    unit: str  # "duration" (nanoseconds), "bytes" or "count"

    @property
    def owner_key(self) -> str:
        return f"{METADATA_PREFIX}.{self.field}.owner"

    @property
    def value_key(self) -> str:
        return f"{METADATA_PREFIX}.{self.field}.value"


# Changed in place on an existing stream.
MANAGED = (
    StreamSetting("max_age", "STREAM_MAX_AGE", "duration"),
    StreamSetting("max_bytes", "STREAM_MAX_BYTES", "bytes"),
    StreamSetting("duplicate_window", "DUPLICATE_WINDOW", "duration"),
    StreamSetting("num_replicas", "STREAM_REPLICAS", "count"),
)
# Fixed when the stream is created: reported, never changed.
FIXED = (
    StreamSetting("retention", "STREAM_RETENTION", "choice"),
    StreamSetting("storage", "STREAM_STORAGE", "choice"),
)

RETENTION_CONSEQUENCES = {
    "interest": "messages published while no consumer is interested in their subject are "
    "dropped at once, and so are dead letters nobody consumes",
    "workqueue": "each subject may have only one consumer, and a message is removed as soon "
    "as it is acknowledged, so no second service can read it",
}


def wanted_value(config: BridgeConfig, setting: StreamSetting) -> Any:
    """Return the value the settings give ``setting``, as the server writes it."""
    if setting.field == "max_age":
        return to_nanos(config.stream_max_age) if config.stream_max_age else 0
    if setting.field == "max_bytes":
        return config.stream_max_bytes or -1
    if setting.field == "duplicate_window":
        return to_nanos(config.duplicate_window)
    if setting.field == "num_replicas":
        return config.stream_replicas
    return getattr(config, f"stream_{setting.field}")


def server_value(raw: Mapping[str, Any], setting: StreamSetting) -> Any:
    """Return the server's value of ``setting`` with its defaults filled in."""
    defaults = {"max_age": 0, "max_bytes": -1, "duplicate_window": 0, "num_replicas": 1}
    value = raw.get(setting.field)
    if value is None:
        return defaults.get(setting.field, "")
    return value


def format_bytes(size: int) -> str:
    """Render a byte count for humans: ``512 B``, ``1.0 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def show(setting: StreamSetting, value: Any) -> str:
    """Render a server value the way a user writes it (``7d``, ``1.0 GiB``, ``unlimited``)."""
    if setting.unit == "duration":
        return format_duration(int(value) / NANOS_PER_SECOND) if value else "unlimited"
    if setting.unit == "bytes":
        return format_bytes(int(value)) if int(value) >= 0 else "unlimited"
    return str(value)


@dataclass(frozen=True)
class Difference:
    """One managed field whose server value is not the wanted one."""

    setting: StreamSetting
    have: Any
    want: Any

    def __str__(self) -> str:
        return (
            f"{self.setting.field}: {show(self.setting, self.have)} -> "
            f"{show(self.setting, self.want)}"
        )


@dataclass(frozen=True)
class Conflict:
    """A field another app enforces with another value: reported, not overwritten."""

    difference: Difference
    owner: str
    app: str

    def __str__(self) -> str:
        setting, have, want = (
            self.difference.setting,
            self.difference.have,
            self.difference.want,
        )
        return (
            f"{setting.field}: app {self.owner!r} enforces {show(setting, have)}, app "
            f"{self.app!r} wants {show(setting, want)} ({setting.key}); left as it is. Agree "
            f"on one value, leave {setting.key} unset in one of them, or run "
            "`manage.py jetstream_ensure_topology --take-over`"
        )


@dataclass(frozen=True)
class Held:
    """A limit held back because applying it would delete messages the stream holds now."""

    difference: Difference
    loss: str

    def __str__(self) -> str:
        setting = self.difference.setting
        return (
            f"{self.difference} would delete {self.loss} at once, other apps' unconsumed "
            f"events included; not applied. Check that nothing still needs them, then run "
            f"`manage.py jetstream_ensure_topology --allow-discard`, or leave {setting.key} "
            "unset"
        )


@dataclass(frozen=True)
class Holding:
    """What the stream stores now: enough to tell whether a tighter limit deletes messages."""

    messages: int = 0
    bytes: int = 0
    oldest_age: float | None = None  # seconds since the first stored message


@dataclass(frozen=True)
class SettingsPlan:
    """What to do with the stream's managed settings."""

    apply: tuple[Difference, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    fixed: tuple[Difference, ...] = ()
    held: tuple[Held, ...] = ()
    claimed: tuple[StreamSetting, ...] = ()  # already right; ownership recorded only
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def writes(self) -> bool:
        """Whether the stream's config (limits or ownership records) must be updated."""
        return bool(self.apply or self.claimed)

    def updated(self, raw: Mapping[str, Any], subjects: list[str]) -> dict[str, Any]:
        """Return the server's full config with the subjects and the applied fields changed."""
        body = {**raw, "subjects": list(subjects)}
        for difference in self.apply:
            body[difference.setting.field] = difference.want
        if self.writes:
            body["metadata"] = self.metadata
        return body


def _claim(difference: Difference, metadata: Mapping[str, str], app: str) -> str | None:
    """Return the other app that recorded another value for this field, if any."""
    setting = difference.setting
    owner = metadata.get(setting.owner_key)
    if owner and owner != app and metadata.get(setting.value_key) != str(difference.want):
        return owner
    return None


def discarded(difference: Difference, holding: Holding) -> str | None:
    """Say what applying ``difference`` would delete from the stream now, if anything."""
    field_name, want = difference.setting.field, int(difference.want)
    if field_name == "max_bytes" and 0 <= want < holding.bytes:
        return f"about {format_bytes(holding.bytes - want)} of the {holding.messages} messages"
    age = holding.oldest_age
    if field_name == "max_age" and want and age is not None and age * NANOS_PER_SECOND > want:
        return f"the messages older than {format_duration(want / NANOS_PER_SECOND)}"
    return None


def plan_settings(
    config: BridgeConfig,
    raw: Mapping[str, Any],
    *,
    take_over: bool = False,
    holding: Holding | None = None,
    allow_discard: bool = False,
) -> SettingsPlan:
    """Compare the server's config ``raw`` with the settings the user gave."""
    metadata = dict(raw.get("metadata") or {})
    apply: list[Difference] = []
    conflicts: list[Conflict] = []
    fixed: list[Difference] = []
    held: list[Held] = []
    claimed: list[StreamSetting] = []
    for setting in (*MANAGED, *FIXED):
        if setting.key not in config.explicit:
            continue  # unset: the stream's value stands
        difference = Difference(setting, server_value(raw, setting), wanted_value(config, setting))
        if setting in FIXED:
            if difference.have != difference.want:
                fixed.append(difference)
            continue
        owner = _claim(difference, metadata, config.app_name)
        if owner and not take_over:
            if difference.have != difference.want:
                conflicts.append(Conflict(difference, owner, config.app_name))
            continue
        if difference.have == difference.want:
            if metadata.get(setting.owner_key) is None:
                claimed.append(setting)
                _record(metadata, setting, config.app_name, difference.want)
            continue
        loss = None if allow_discard else discarded(difference, holding or Holding())
        if loss:
            held.append(Held(difference, loss))
            continue
        apply.append(difference)
        _record(metadata, setting, config.app_name, difference.want)
    return SettingsPlan(
        tuple(apply), tuple(conflicts), tuple(fixed), tuple(held), tuple(claimed), metadata
    )


def _record(metadata: dict[str, str], setting: StreamSetting, app: str, value: Any) -> None:
    metadata[setting.owner_key] = app
    metadata[setting.value_key] = str(value)


def creation_metadata(config: BridgeConfig) -> dict[str, str]:
    """Return the ownership records of a new stream: one per managed setting the user gave."""
    metadata: dict[str, str] = {}
    for setting in MANAGED:
        if setting.key in config.explicit:
            metadata[setting.owner_key] = config.app_name
            metadata[setting.value_key] = str(wanted_value(config, setting))
    return metadata


def fixed_advice(stream: str, difference: Difference) -> str:
    """Say why a retention or storage difference stays, and how to change it safely."""
    setting, have, want = difference.setting, difference.have, difference.want
    head = (
        f"{setting.field}: {have} -> {want} cannot be applied by the bridge; the stream keeps "
        f"{have} and nothing is deleted."
    )
    if setting.field == "retention" and {have, want} == {"limits", "interest"}:
        how = (
            f" The server allows this one switch in place (natscli's `stream edit` has no "
            f"retention flag, so edit the config): `nats stream info {stream} --json | jq "
            f'.config > {stream}.json`, set "retention": "{want}" in it, then '
            f"`nats stream edit {stream} --config {stream}.json`"
            + (
                " (switching to interest deletes at once every message no consumer still needs)."
                if want == "interest"
                else " (nothing is deleted; set STREAM_MAX_AGE or STREAM_MAX_BYTES so the "
                "stream does not grow forever)."
            )
        )
    else:
        how = (
            f" JetStream fixes {setting.field} when a stream is created. To move: stop the "
            f"relays and consumers using {stream}; `nats stream backup {stream} ./{stream}-backup`;"
            f" create a stream with {setting.field} {want} that sources {stream} "
            f"(`nats stream add {stream}_NEW --{setting.field} {_cli_value(want)} --source "
            f"{stream}`) and "
            f"wait until it holds every message; set STREAM_NAME to {stream}_NEW; delete "
            f"{stream} only when you no longer need it; then run "
            "`manage.py jetstream_ensure_topology` so the new stream takes the subjects."
        )
    return f"{head}{how} Or leave {setting.key} unset to accept the stream as it is."


def _cli_value(value: str) -> str:
    """natscli spells the workqueue retention ``work``."""
    return "work" if value == "workqueue" else value


def limits_problem(body: Mapping[str, Any]) -> str | None:
    """Say why the server would refuse ``body``: a duplicate window longer than the max age."""
    max_age, window = int(body.get("max_age") or 0), int(body.get("duplicate_window") or 0)
    if not max_age or window <= max_age:
        return None
    age, dup = (format_duration(n / NANOS_PER_SECOND) for n in (max_age, window))
    return (
        f"the server refuses a duplicate window ({dup}) longer than the max age ({age}); set "
        f"DUPLICATE_WINDOW to at most {age} (and above RELAY_LEASE), or STREAM_MAX_AGE above {dup}"
    )


def retention_warning(stream: str, retention: str, subjects: list[str]) -> str | None:
    """Explain what a stream with interest or workqueue retention does to our subjects."""
    consequence = RETENTION_CONSEQUENCES.get(retention)
    if consequence is None:
        return None
    return (
        f"stream {stream} stores {', '.join(subjects)} with {retention} retention: "
        f"{consequence}. Use limits retention for bridge subjects (see README, Stream ownership)"
    )


def window_problem(stream: str, window: float, relay_lease: float) -> str | None:
    """E015 against the server: a duplicate window that does not outlast ``RELAY_LEASE``."""
    if not relay_lease or window > relay_lease:
        return None
    return (
        f"E015: stream {stream} has a duplicate window of {format_duration(window)}, not longer "
        f"than RELAY_LEASE ({format_duration(relay_lease)}): a relay re-sending an expired lease "
        f"can store an event twice. Set DUPLICATE_WINDOW to "
        f"'{format_duration(max(120.0, relay_lease * 2))}' and run "
        "`manage.py jetstream_ensure_topology`"
    )
