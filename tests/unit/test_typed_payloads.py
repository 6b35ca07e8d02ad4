"""Typed payloads (``core/schemas.py``), handler styles in the registry, the middleware chain."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any, Optional

import pydantic
import pytest

import jetstream_bridge
from jetstream_bridge import middleware as middleware_module
from jetstream_bridge.context import Invocation, MessageContext
from jetstream_bridge.core.dead_letter import (
    UNVERIFIED,
    VALIDATION_ERRORS,
    VERIFIED,
    DeadLetter,
    verification,
)
from jetstream_bridge.core.errors import InvalidPayload
from jetstream_bridge.core.schemas import MAX_ERRORS_LENGTH, dump, errors_header, validate
from jetstream_bridge.core.settings import parse_config
from jetstream_bridge.handlers import HandlerRegistry, Registration, registration_of
from jetstream_bridge.middleware import Chain


@dataclasses.dataclass
class Order:
    number: str
    total: float
    lines: list[Any]
    paid: bool = False
    note: Optional[str] = None  # noqa: UP045 (the Optional spelling is checked too)
    tag: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


class Parcel(pydantic.BaseModel):
    number: str
    weight: float


def errors_of(schema: type, payload: Any) -> list[dict[str, str]]:
    with pytest.raises(InvalidPayload) as caught:
        validate(schema, payload)
    return caught.value.errors


def test_dataclass__exact_keys_and_basic_types_build_the_instance() -> None:
    order = validate(Order, {"number": "A", "total": 3, "lines": [1], "note": None, "tag": "x"})
    assert order == Order(number="A", total=3, lines=[1], note=None, tag="x")


@pytest.mark.parametrize(
    ("payload", "errors"),
    [
        ([], [("", "expected an object, got array")]),
        ({"number": "A", "lines": []}, [("total", "field required")]),
        ({"number": "A", "total": 1, "lines": [], "more": 1}, [("more", "unexpected field")]),
        (
            {"number": "A", "total": "1", "lines": []},
            [("total", "expected integer or number, got string")],
        ),
        (
            {"number": "A", "total": True, "lines": []},
            [("total", "expected integer or number, got boolean")],
        ),
        (
            {"number": "A", "total": 1, "lines": {}, "paid": 1},
            [
                ("lines", "expected array, got object"),
                ("paid", "expected boolean, got integer"),
            ],
        ),
        (
            {"number": "A", "total": 1, "lines": [], "note": 5},
            [("note", "expected null or string, got integer")],
        ),
        (
            {"number": "A", "total": 1, "lines": [], "meta": []},
            [("meta", "expected object, got array")],
        ),
    ],
)
def test_dataclass__the_rule_refuses(payload: Any, errors: list[tuple[str, str]]) -> None:
    assert [(e["loc"], e["msg"]) for e in errors_of(Order, payload)] == errors


def test_dataclass__post_init_errors_are_validation_errors() -> None:
    @dataclasses.dataclass
    class Positive:
        n: int

        def __post_init__(self) -> None:
            if self.n <= 0:
                raise ValueError("n must be positive")

    assert errors_of(Positive, {"n": 0}) == [{"loc": "", "msg": "n must be positive"}]


def test_pydantic__errors_name_the_fields_without_the_input() -> None:
    errors = errors_of(Parcel, {"number": 1, "weight": "secret-value"})
    assert [e["loc"] for e in errors] == ["number", "weight"]
    assert "secret-value" not in json.dumps(errors)


def test_errors_header__hostile_text_is_escaped_ascii_json_and_bounded() -> None:
    hostile = [{"loc": f"f{i}\r\n\x00\u2028\ud800" * 50, "msg": "é" * 400} for i in range(100)]
    value = errors_header(hostile)
    assert value.isascii()
    assert value.isprintable()
    assert len(value) <= MAX_ERRORS_LENGTH
    shown = json.loads(value)
    assert shown[-1] == "..."
    assert shown[0]["loc"].startswith("f0\\r\\n\\x00\\u2028\\ud800")


def test_dump__models_and_dataclasses_become_json_data() -> None:
    assert dump(Parcel(number="P", weight=1.5)) == {"number": "P", "weight": 1.5}
    assert dump(Order("A", 1.0, [])) == {
        "number": "A",
        "total": 1.0,
        "lines": [],
        "paid": False,
        "note": None,
        "tag": None,
        "meta": {},
    }
    assert dump({"plain": 1}) == {"plain": 1}
    assert dump(Order) is Order  # the class itself is no instance


def test_dataclass_schema_works_without_pydantic_installed() -> None:
    code = (
        "import sys; sys.modules['pydantic'] = None\n"
        "import dataclasses\n"
        "from jetstream_bridge.core.schemas import validate, schema_problem\n"
        "@dataclasses.dataclass\n"
        "class A:\n"
        "    n: int\n"
        "assert schema_problem(A) is None\n"
        "assert validate(A, {'n': 1}) == A(1)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_registry__styles_are_explicit_and_kept_per_function() -> None:
    registry = HandlerRegistry()

    def old(event: Any, subject: str, deliveries: int) -> None: ...

    def ctx_handler(ctx: MessageContext) -> None: ...

    registry.register("order", "created", old)
    registry.register("order", "paid", ctx_handler, context=True)
    registry.register("order", "shipped", ctx_handler, context=True)
    assert registry.lookup("order", "created") == Registration(old)
    assert registry.lookup("order", "paid") == Registration(ctx_handler, context=True)
    assert registry.resolve("order", "paid") is ctx_handler
    assert registry.lookup("order", "other") is None
    with pytest.raises(ValueError, match="registered twice with different styles"):
        registry.register("order", "refunded", ctx_handler)
    typed = Registration(old, schema=Order)
    assert (typed.context, typed.plain) == (True, False)
    assert Registration(old, batch=True).plain is False
    with pytest.raises(TypeError, match="neither a pydantic model nor a dataclass"):
        Registration(old, schema=dict)
    assert registration_of(old) == Registration(old)


def test_middleware_setting__dotted_paths_only() -> None:
    base = {"APP_NAME": "alpha", "DESTINATION_APP": "beta"}
    config, problems = parse_config({**base, "MIDDLEWARE": "a.b, c.d.e"})
    assert config is not None
    assert (config.middleware, problems) == (("a.b", "c.d.e"), [])
    config, problems = parse_config({**base, "MIDDLEWARE": ["ok.path", "no path", 3]})
    assert config is None
    assert [p.id for p in problems] == ["E016", "E016"]
    assert "'no path'" in problems[0].msg


def test_chain__first_is_outermost_and_call_next_may_pass_another_invocation() -> None:
    ctx = MessageContext(
        event={},
        payload=None,
        subject="s",
        headers={},
        stream="S",
        stream_seq=1,
        deliveries=1,
        consumer="d",
    )
    seen: list[str] = []

    def outer(invocation: Invocation, call_next: Any) -> Any:
        seen.append("outer")
        return call_next(Invocation(invocation.messages, lambda c: "replaced"))

    def inner(invocation: Invocation, call_next: Any) -> Any:
        seen.append("inner")
        return call_next(invocation)

    result = Chain([outer], [inner]).run(
        Invocation((ctx,), lambda c: "original"), lambda inv: inv.handler(inv.message)
    )
    assert (result, seen) == ("replaced", ["outer", "inner"])
    with pytest.raises(ValueError, match="batch invocation holds 2 messages"):
        _ = Invocation((ctx, ctx), print, batch=True).message


def test_validation_errors_header_is_signed_when_present() -> None:
    letter = DeadLetter(
        reason="invalid",
        error_class="InvalidPayload",
        error_message="payload does not validate as Order",
        original_subject="dev.data.sync.beta.alpha",
        stream="S",
        stream_seq=7,
        deliveries=1,
        consumer="alpha-events",
        event_id="e-1",
        validation_errors=errors_header([{"loc": "total", "msg": "field required"}]),
    )
    key = b"k" * 32
    headers = letter.headers(b"{}", key=key)
    assert json.loads(headers[VALIDATION_ERRORS]) == [{"loc": "total", "msg": "field required"}]
    assert verification(headers, b"{}", key) == VERIFIED
    forged = {**headers, VALIDATION_ERRORS: "[]"}
    assert verification(forged, b"{}", key) == UNVERIFIED
    stripped = {name: value for name, value in headers.items() if name != VALIDATION_ERRORS}
    assert verification(stripped, b"{}", key) == UNVERIFIED
    # A letter of another reason carries no such header and signs as before.
    plain = dataclasses.replace(letter, reason="rejected", validation_errors=None)
    plain_headers = plain.headers(b"{}", key=key)
    assert VALIDATION_ERRORS not in plain_headers
    assert verification(plain_headers, b"{}", key) == VERIFIED


def test_public_names() -> None:
    assert jetstream_bridge.use is middleware_module.use
    assert jetstream_bridge.MessageContext is MessageContext
    assert jetstream_bridge.Registration is Registration
