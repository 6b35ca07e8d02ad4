"""The ``JETSTREAM_BRIDGE`` settings as plain Python: declared once, parsed, validated.

* ``schema``: one ``Setting`` per key (kind, default, doc line, environment variable), and
  what is derived from that list: the per-key parse, unknown keys, the README table;
* ``kinds``: how each kind of value is read and checked (token, duration, URL, ...);
* ``validators``: the rules that span keys (``BACKOFF`` vs ``MAX_DELIVER``, one
  authentication method, ...);
* ``problems``: ``Problem`` and the registry of check ids (``E001``...);
* ``config``: the immutable ``BridgeConfig`` and ``parse_config``, which runs the three steps.

Django reads the setting in ``jetstream_bridge.conf`` and reports problems as system checks
(``jetstream_bridge.checks``); nothing here imports Django.
"""

from __future__ import annotations

from ..redaction import Secret, redact_url
from .config import BridgeConfig, describe_keys, parse_config
from .problems import Problem, first_error
from .schema import KNOWN_KEYS

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
