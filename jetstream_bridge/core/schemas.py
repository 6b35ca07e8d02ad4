"""Typed payloads: check a payload against a pydantic model or a dataclass.

No Django and no broker, and pydantic is optional: it is imported only when a schema is a
pydantic model (``pip install 'jetstream-bridge[pydantic]'``), so dataclasses work without it.

The rule for a dataclass (``validate``): the payload must be a JSON object whose keys are
exactly the dataclass's ``init`` fields, every field without a default present, no other key;
a field annotated with a basic type (``str``, ``int``, ``float``, ``bool``, ``dict``, ``list``,
``None``, or an ``X | None`` / ``Optional`` of them) must hold a value of that JSON type
(``bool`` is no ``int``; an ``int`` is accepted for ``float``); any other annotation (a nested
dataclass, ``datetime``, ``list[str]``' items...) is passed as it is, unchecked, to the
constructor. A ``__post_init__`` that raises ``ValueError`` or ``TypeError`` is a validation
error too. Anything richer belongs in a pydantic model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from typing import Any

from .errors import InvalidPayload

__all__ = ["InvalidPayload", "dump", "errors_header", "schema_problem", "validate"]

# A JetStream header line stays well under the server's limits; the errors are a summary.
MAX_ERRORS_LENGTH = 1000
MAX_ERRORS = 20
_BASIC: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (int, float),
    bool: (bool,),
    dict: (dict,),
    list: (list,),
    type(None): (type(None),),
}
_JSON_NAMES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}


def _pydantic_model(schema: Any) -> bool:
    # Only a pydantic model's module can be imported already; never import pydantic here.
    pydantic = sys.modules.get("pydantic")
    base = getattr(pydantic, "BaseModel", None) if pydantic is not None else None
    return base is not None and isinstance(schema, type) and issubclass(schema, base)


def schema_problem(schema: Any) -> str | None:
    """Return why ``schema`` cannot type a payload, or ``None``."""
    if isinstance(schema, type) and (dataclasses.is_dataclass(schema) or _pydantic_model(schema)):
        return None
    return "is neither a pydantic model nor a dataclass (a class decorated with @dataclass)"


def validate(schema: type, payload: Any) -> Any:
    """Return ``payload`` as an instance of ``schema``; raise ``InvalidPayload`` with the errors."""
    if _pydantic_model(schema):
        return _validate_pydantic(schema, payload)
    return _validate_dataclass(schema, payload)


def _validate_pydantic(schema: Any, payload: Any) -> Any:
    from pydantic import ValidationError

    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        errors = [
            {"loc": ".".join(str(part) for part in error.get("loc", ())), "msg": error["msg"]}
            for error in exc.errors(include_url=False, include_input=False)
        ]
        raise InvalidPayload(schema.__name__, errors) from None


def _validate_dataclass(schema: type, payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise InvalidPayload(
            schema.__name__, [{"loc": "", "msg": f"expected an object, got {_json_name(payload)}"}]
        )
    fields = {field.name: field for field in dataclasses.fields(schema) if field.init}
    hints = _hints(schema)
    errors = [{"loc": _loc(key), "msg": "unexpected field"} for key in payload if key not in fields]
    for name, field in fields.items():
        if name not in payload:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                errors.append({"loc": name, "msg": "field required"})
            continue
        allowed = _json_types(hints.get(name))
        if allowed is not None and not _is_instance(payload[name], allowed):
            wanted = " or ".join(sorted({_JSON_NAMES[kind] for kind in allowed}))
            got = _json_name(payload[name])
            errors.append({"loc": name, "msg": f"expected {wanted}, got {got}"})
    if errors:
        raise InvalidPayload(schema.__name__, errors)
    try:
        return schema(**payload)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(schema.__name__, [{"loc": "", "msg": str(exc)}]) from None


def _loc(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


def _hints(schema: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(schema)
    except Exception:  # an annotation that does not resolve: leave those fields unchecked
        return {}


def _json_types(hint: Any) -> tuple[type, ...] | None:
    """The JSON value types a basic annotation allows; ``None`` for anything else."""
    if hint in _BASIC:
        return _BASIC[hint]
    origin = typing.get_origin(hint)
    if origin in (dict, list):
        return _BASIC[origin]
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        allowed: list[type] = []
        for arg in typing.get_args(hint):
            kinds = _json_types(arg)
            if kinds is None:
                return None
            allowed += kinds
        return tuple(allowed)
    return None


def _is_instance(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed)


def _json_name(value: Any) -> str:
    for kind, name in _JSON_NAMES.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def errors_header(errors: list[dict[str, str]]) -> str:
    """Return the errors as the ``Jsb-Validation-Errors`` value: JSON, ASCII, bounded.

    The messages quote hostile input (field names, values), so the text is ASCII JSON (every
    control character and non-ASCII escaped) and cut to ``MAX_ERRORS_LENGTH`` on a whole error
    (``"..."`` marks a cut).
    """
    shown: list[Any] = []
    for error in errors[:MAX_ERRORS]:
        entry = {"loc": _escaped(error["loc"])[:100], "msg": _escaped(error["msg"])[:200]}
        candidate = json.dumps([*shown, entry, "..."], ensure_ascii=True)
        if len(candidate) > MAX_ERRORS_LENGTH:
            break
        shown.append(entry)
    if len(shown) < len(errors):
        shown.append("...")
    return json.dumps(shown, ensure_ascii=True, separators=(",", ":"))


def _escaped(text: str) -> str:
    # Control characters, quotes' partner the backslash, non-ASCII and lone surrogates as
    # Python escapes: printable ASCII only, which JSON at most doubles (the backslashes).
    return str(text).encode("unicode_escape").decode("ascii")


def dump(value: Any) -> Any:
    """Return a pydantic model or a dataclass instance as a JSON-ready dict; other values as is."""
    if _pydantic_model(type(value)):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
