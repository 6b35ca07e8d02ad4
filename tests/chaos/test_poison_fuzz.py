"""Scenario 5: poison messages among good ones, and hypothesis-generated envelopes, headers and
raw bytes, thrown at two consumer processes. Every message ends processed once or in the DLQ
with a reason; no consumer dies."""

from __future__ import annotations

import json
import string
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from jetstream_bridge.broker import Connection
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import MSG_ID_HEADER, build_envelope, decode, encode
from jetstream_bridge.core.errors import MalformedEnvelope
from jetstream_bridge.topology import ensure_topology

from .harness import (
    Campaign,
    consumer_settled,
    effect_ids,
    nats_call,
    read_stream,
    record,
    require_postgres,
    scaled,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

GOOD = scaled(1000, 10_000)
POISON = scaled(28, 100)  # spread over the kinds of EXPECTED_REASON
FUZZ = scaled(60, 400)
HANDLER = "tests.chaos.handlers.poison_aware"

# -- what hypothesis throws at the consumer ------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = st.text(min_size=0, max_size=300) | json_values
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "event_id": ids,
        "event_type": st.sampled_from(["created", "updated", ""]) | json_values,
        "resource_type": st.sampled_from(["chaos", "order"]) | json_values,
        "payload": st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values,
        "schema_version": json_values,
        "occurred_at": json_values,
        "producer": json_values,
    },
)
header_names = st.sampled_from(["Status", "Description", "Content-Type", "X-Trace"]) | st.text(
    alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=16
).filter(lambda name: not name.lower().startswith("nats"))
header_values = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60)
headers = st.dictionaries(header_names, header_values, max_size=4)
bodies = (
    envelopes.map(lambda e: json.dumps(e).encode())
    | st.binary(max_size=200)
    | st.builds(
        lambda payload, n: encode(
            build_envelope(
                producer="alpha",
                resource_type="chaos",
                event_type="fuzz",
                payload={**payload, "fuzz": n},
            )
        ),
        st.dictionaries(st.text(max_size=8), json_values, max_size=5),
        st.integers(),
    )
)
messages = st.tuples(bodies, headers)


def generate_fuzz(count: int) -> list[tuple[bytes, dict[str, str]]]:
    """``count`` messages from the strategies, the same on every run (derandomized)."""
    found: list[tuple[bytes, dict[str, str]]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(messages)
    def collect(message: tuple[bytes, dict[str, str]]) -> None:
        found.append(message)

    collect()
    return found


def poison(kind: str, n: int) -> tuple[bytes, dict[str, str]]:
    if kind == "bytes":
        return b"\x00\xff not json " + str(n).encode(), {}
    if kind == "missing":
        return json.dumps({"event_type": "created", "payload": {"n": n}}).encode(), {}
    if kind == "status-header":  # looks like the server's "no messages" status
        return b"", {"Status": "404", "Description": "No Messages"}
    payload: dict[str, Any] = {"n": n}
    event_id = f"poison-{kind}-{n}"
    if kind in ("reject", "fails"):
        payload[{"reject": "reject", "fails": "poison"}[kind]] = True
    elif kind == "nul-payload":
        payload["text"] = "PostgreSQL refuses \u0000 in JSON"
    envelope = build_envelope(
        producer="alpha",
        resource_type="chaos",
        event_type="created",
        payload=payload,
        event_id=event_id,
    )
    if kind == "nul-id":  # valid JSON, but no database text column can hold this id
        envelope["event_id"] = f"poison-\u0000-{n}"
    return encode(envelope), {} if kind == "nul-id" else {MSG_ID_HEADER: event_id}


EXPECTED_REASON = {
    "bytes": dead_letter.MALFORMED,
    "missing": dead_letter.MALFORMED,
    "reject": dead_letter.REJECTED,
    "fails": dead_letter.MAX_DELIVER,
    "nul-payload": dead_letter.MALFORMED,  # PostgreSQL's JSON cannot store it: refused at once
    "nul-id": dead_letter.MALFORMED,
    "status-header": dead_letter.MALFORMED,
}


def publish_all(subject: str, items: list[tuple[bytes, dict[str, str]]]) -> list[int]:
    async def send(conn: Connection) -> list[int]:
        results = await conn.publish_many([(subject, data, h) for data, h in items])
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[:3]
        return [r.seq for r in results]  # type: ignore[union-attr]

    return list(nats_call(send))


@pytest.mark.timeout(scaled(240, 1200))
def test_chaos__poison_and_fuzzed_messages_end_processed_or_dead_lettered(
    campaign: Campaign,
) -> None:
    require_postgres()
    campaign.scenario = "poison-fuzz"
    campaign.server()
    config = campaign.configure(MAX_DELIVER=3, BACKOFF=["100ms", "200ms"])
    ensure_topology()
    subject = config.subjects.publish  # what the consumer app subscribes to

    good = [
        build_envelope(
            producer="alpha",
            resource_type="chaos",
            event_type="created",
            payload={"n": n},
            event_id=f"good-{n:06d}",
        )
        for n in range(GOOD)
    ]
    kinds = list(EXPECTED_REASON)
    poisons = [(kinds[n % len(kinds)], poison(kinds[n % len(kinds)], n)) for n in range(POISON)]
    fuzz = generate_fuzz(FUZZ)
    # Poison and fuzz spread through the good traffic, so they share batches with it.
    items: list[tuple[str, tuple[bytes, dict[str, str]]]] = [
        ("good", (encode(e), {MSG_ID_HEADER: e["event_id"]})) for e in good
    ]
    extra = [(f"poison:{kind}", item) for kind, item in poisons] + [("fuzz", m) for m in fuzz]
    step = max(1, len(items) // (len(extra) + 1))
    for offset, entry in enumerate(extra):
        items.insert(min(len(items), (offset + 1) * step + offset), entry)
    seqs = publish_all(subject, [item for _, item in items])
    campaign.fault()  # the last poison is in the stream: the drain clock starts
    by_seq = dict(zip(seqs, items, strict=True))

    for index in range(2):
        campaign.consumer(index, handler=HANDLER)
    wait_until(
        lambda: consumer_settled(config.stream_name),
        timeout=scaled(180, 900),
        what="the consumers to settle every message",
        interval=0.5,
        tick=campaign.fleet.check,
    )
    drain_s = time.monotonic() - campaign.last_fault
    codes = campaign.fleet.stop_all()
    assert all(code == 0 for code in codes.values()), codes

    letters = {
        int(m.headers[dead_letter.STREAM_SEQ]): m.headers
        for m in read_stream(config.dlq_stream_name)
        if m.subject == config.subjects.dlq
    }
    applied = Counter(effect_ids())
    failures = []
    for seq, (kind, (data, sent_headers)) in by_seq.items():
        letter = letters.get(seq)
        if kind.startswith("poison:"):
            want = EXPECTED_REASON[kind.split(":")[1]]
            if letter is None or letter.get(dead_letter.REASON) != want:
                failures.append(f"seq {seq} {kind}: want DLQ reason {want}, got {letter}")
            continue
        if letter is not None:
            if not letter.get(dead_letter.REASON):
                failures.append(f"seq {seq} {kind}: dead-lettered without a reason")
            elif kind == "good":
                failures.append(f"seq {seq} good event dead-lettered: {letter}")
            continue
        try:
            event_id = decode(data)["event_id"]
        except MalformedEnvelope:
            failures.append(
                f"seq {seq} {kind}: malformed but not dead-lettered: {data[:80]!r} "
                f"headers {sent_headers!r}"
            )
            continue
        if applied.get(event_id, 0) != 1:
            failures.append(
                f"seq {seq} {kind}: {applied.get(event_id, 0)} effects for {event_id!r}"
            )
    duplicated = sum(n - 1 for n in applied.values() if n > 1)
    good_applied = sum(1 for e in good if applied.get(e["event_id"]) == 1)
    reasons = Counter(h.get(dead_letter.REASON, "") for h in letters.values())
    record(
        {
            "scenario": campaign.scenario,
            "events": len(items),
            "good": GOOD,
            "poison": POISON,
            "fuzzed": len(fuzz),
            "faults": POISON + len(fuzz),
            "drain_s": round(drain_s, 1),
            "lost": GOOD - good_applied,
            "duplicated": duplicated,
            "dead_lettered": dict(reasons),
            "unaccounted": len(failures),
            "elapsed_s": round(time.monotonic() - campaign.started, 1),
        }
    )
    assert not failures, f"{len(failures)} message(s) unaccounted for:\n" + "\n".join(failures[:20])
    assert duplicated == 0
    assert good_applied == GOOD
