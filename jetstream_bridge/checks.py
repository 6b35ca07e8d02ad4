"""Django system checks: the settings parser's problems plus model resolution.

Problems about the run-time environment (``Check.deploy``: ``DESTINATION_APP`` missing) are a
deploy check, so ``migrate`` and ``collectstatic`` in an image build pass without it while
``check --deploy`` and the first use of the bridge still fail on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.core.checks import CheckMessage, Error, Warning, register

from .conf import parsed
from .core.settings import Problem
from .core.settings.problems import BAD_MODEL, CHECK_ID_PREFIX, MODEL_MISSING_FIELDS
from .models import INBOX_REQUIRED_FIELDS, OUTBOX_REQUIRED_FIELDS, field_names


def _messages(problems: Sequence[Problem]) -> list[CheckMessage]:
    return [
        (Error if problem.is_error else Warning)(
            problem.msg, hint=problem.hint, id=f"{CHECK_ID_PREFIX}.{problem.id}"
        )
        for problem in problems
    ]


@register("jetstream_bridge", deploy=True)
def check_deploy_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """The settings the running service needs but a build step does not (``check --deploy``)."""
    _, problems = parsed()
    return _messages([p for p in problems if p.deploy])


@register("jetstream_bridge")
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    config, problems = parsed()
    messages = _messages([p for p in problems if not p.deploy])
    if config is None:
        return messages
    wanted: list[tuple[str, str, tuple[str, ...]]] = []
    if config.use_outbox:
        wanted.append(("OUTBOX_MODEL", config.outbox_model, OUTBOX_REQUIRED_FIELDS))
    if config.use_inbox:
        wanted.append(("INBOX_MODEL", config.inbox_model, INBOX_REQUIRED_FIELDS))
    for key, path, required in wanted:
        try:
            model = apps.get_model(path)
        except (LookupError, ValueError):
            messages.append(
                Error(
                    f"JETSTREAM_BRIDGE[{key!r}] = {path!r} is not an installed model.",
                    hint=f"Add the model's app to INSTALLED_APPS, fix the 'app_label.ModelName' "
                    f"path, or set 'USE_{key.split('_')[0]}': False.",
                    id=BAD_MODEL.qualified_id,
                )
            )
            continue
        missing = [name for name in required if name not in field_names(model)]
        if key == "INBOX_MODEL" and not (
            {"event_id"} <= field_names(model) or {"stream", "stream_seq"} <= field_names(model)
        ):
            missing.append("event_id (or stream and stream_seq)")
        if missing:
            messages.append(
                Error(
                    f"{path} is missing field(s) the bridge needs: {', '.join(missing)}.",
                    hint=f"Add them to {model.__name__} (see jetstream_bridge.models for types) "
                    "and run makemigrations.",
                    obj=model,
                    id=MODEL_MISSING_FIELDS.qualified_id,
                )
            )
    return messages
