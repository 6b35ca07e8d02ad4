"""Handlers: what runs for each received event.

Register per ``resource_type``/``event_type`` in a ``jetstream_handlers.py`` module of any
installed app (imported when a consumer starts), or pass one handler to ``Consumer`` /
``--handler dotted.path``. Only code named in your project is imported; nothing a message says
is ever used to find code.

    from jetstream_bridge import handler

    @handler("order", "created")
    def create_invoice(event, subject, deliveries):
        Invoice.objects.create(order_number=event["payload"]["number"])

    @handler("order", "created", producer="billing")  # only billing's order/created
    def billing_order(event, subject, deliveries): ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import import_module
from typing import Any

from django.apps import apps
from django.utils.module_loading import import_string, module_has_submodule

logger = logging.getLogger(__name__)

HANDLERS_MODULE = "jetstream_handlers"
ANY = "*"

Handler = Callable[[dict[str, Any], str, int], Any]


class HandlerRegistry:
    """Handlers keyed by ``(producer, resource_type, event_type)``; ``"*"`` matches anything.

    ``producer`` is the peer whose subject the event arrived on; registrations without one
    (``"*"``) serve every peer, as in a single-peer service.
    """

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str, str], Handler] = {}

    def register(
        self, resource_type: str, event_type: str, fn: Handler, *, producer: str = ANY
    ) -> Handler:
        key = (producer, resource_type, event_type)
        existing = self._handlers.get(key)
        if existing is not None and existing is not fn:
            source = "" if producer == ANY else f" from {producer}"
            raise ValueError(
                f"a handler for {resource_type}/{event_type}{source} is already "
                f"registered: {existing.__module__}.{existing.__qualname__}"
            )
        self._handlers[key] = fn
        return fn

    def resolve(
        self, resource_type: str, event_type: str, producer: str | None = None
    ) -> Handler | None:
        """Return the most specific handler.

        With ``producer``, that peer's registrations come first (exact, any event type, any
        resource type, catch-all); then, as without it, exact, any event type, any resource
        type, catch-all.
        """
        kinds = (
            (resource_type, event_type),
            (resource_type, ANY),
            (ANY, event_type),
            (ANY, ANY),
        )
        producers = (producer, ANY) if producer and producer != ANY else (ANY,)
        for source in producers:
            for resource, event in kinds:
                found = self._handlers.get((source, resource, event))
                if found is not None:
                    return found
        return None

    def __len__(self) -> int:
        return len(self._handlers)

    def clear(self) -> None:
        self._handlers.clear()


registry = HandlerRegistry()


def handler(
    resource_type: str = ANY, event_type: str = ANY, *, producer: str = ANY
) -> Callable[[Handler], Handler]:
    """Register the decorated function for events of ``resource_type``/``event_type``.

    ``producer`` limits it to events from that peer (the service named in DESTINATION_APP
    whose subject they arrive on); without it the function serves every peer.
    """

    def decorate(fn: Handler) -> Handler:
        return registry.register(resource_type, event_type, fn, producer=producer)

    return decorate


def autodiscover() -> list[str]:
    """Import ``<app>.jetstream_handlers`` for every installed app that has one."""
    imported = []
    for app_config in apps.get_app_configs():
        if module_has_submodule(app_config.module, HANDLERS_MODULE):
            name = f"{app_config.name}.{HANDLERS_MODULE}"
            import_module(name)
            imported.append(name)
    logger.debug("handler modules imported", extra={"modules": imported})
    return imported


def load_handler(path: str) -> Handler:
    """Import a handler named on the command line or in settings (``pkg.module.func``)."""
    try:
        fn = import_string(path)
    except ImportError as exc:
        raise ImportError(f"cannot import handler {path!r}: {exc}") from exc
    if not callable(fn):
        raise TypeError(f"handler {path!r} is not callable")
    return fn  # type: ignore[no-any-return]
