"""Text for a terminal: the health report, dead letters and purges, as the commands print them.

Dead letters hold whatever their sender wrote, so every text taken from one goes through
``printable()``: a forged header or body must not move the cursor, recolour the terminal,
set its title or reorder the text around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from ..core import dead_letter as core_dlq
from ..core.durations import format_age, format_duration
from ..dlq import DeadLetterMessage
from ..health import ConsumerLag, Destination, HealthReport, OutboxBacklog
from ..purge import Purged


def health_lines(report: HealthReport) -> list[str]:
    """Render the health report as lines of text."""
    lines = [f"status       {report.status.upper()}", f"servers      {', '.join(report.servers)}"]
    lines += _server_lines(report)
    if report.stream is not None:
        stream = report.stream
        state = (
            f"{stream.messages} message(s), {stream.consumer_count} consumer(s)"
            if stream.exists
            else "MISSING"
        )
        lines.append(f"stream       {stream.name}: {state}")
        lines += [f"  {s}  ->  {owner or 'NO STREAM'}" for s, owner in report.subjects.items()]
    if len(report.destinations) > 1:  # one peer: the subjects above say it all
        lines += _destination_lines(report.destinations)
    if report.consumers:
        lines += _consumer_lines(report.consumers)
    if report.outbox is not None:
        lines.append(f"outbox       {_outbox_text(report.outbox)}")
    if report.dlq is not None:
        lines.append(f"dlq          {report.dlq.messages} message(s) on {report.dlq.subject}")
    if report.problems:
        lines.append("problems")
        lines += [f"  - {problem}" for problem in report.problems]
    if report.warnings:
        lines.append("warnings")
        lines += [f"  - {printable(warning)}" for warning in report.warnings]
    return lines


def _server_lines(report: HealthReport) -> list[str]:
    if not report.connected:
        return ["server       unreachable"]
    server = f"nats-server {report.server_version}"
    if report.server_name:
        server += f" ({report.server_name})"
    if report.round_trip_ms is not None:
        server += f", round trip {report.round_trip_ms:.2f} ms"
    return [
        f"server       {server}",
        f"jetstream    {'enabled' if report.jetstream else 'NOT AVAILABLE'}",
    ]


def _destination_lines(destinations: Sequence[Destination]) -> list[str]:
    width = max(len(d.peer) for d in destinations)
    lines = ["destinations"]
    for d in destinations:
        unsent = "" if d.unsent is None else f", {d.unsent} unsent"
        lines.append(f"  {d.peer.ljust(width)}  {d.subject}  ->  {d.stream or 'NO STREAM'}{unsent}")
    return lines


def _consumer_lines(consumers: Sequence[ConsumerLag]) -> list[str]:
    width = max(len(c.durable) for c in consumers)
    lines = ["consumers", f"  {'DURABLE'.ljust(width)}  PENDING  ACK PENDING  REDELIVERED"]
    for c in consumers:
        if c.exists:
            lines.append(
                f"  {c.durable.ljust(width)}  {c.num_pending:>7}  {c.num_ack_pending:>11}"
                f"  {c.num_redelivered:>11}"
            )
        else:
            lines.append(f"  {c.durable.ljust(width)}  MISSING")
    return lines


def _outbox_text(outbox: OutboxBacklog) -> str:
    if outbox.error:
        return f"unreadable: {outbox.error}"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(outbox.counts.items())) or "empty"
    oldest = (
        f"; oldest unsent {format_age(outbox.oldest_unsent_age)} old"
        if outbox.oldest_unsent_age is not None and outbox.unsent
        else ""
    )
    return f"{counts}{oldest}"


_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, *, newlines: bool = False) -> str:
    """Return ``text`` with every non-printable character shown as a visible escape.

    Escaped are the C0 and C1 controls (ESC, CSI, BEL, backspace, CR, ...), DEL, bidi and
    other format characters (U+202E, U+2066, zero-width ones), line and paragraph separators,
    non-breaking spaces, lone surrogates and unassigned code points: everything that
    ``str.isprintable()`` refuses. ``newlines`` keeps ``\\n`` as a line break (a body's lines).
    """
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() or (newlines and char == "\n") else _escape(char)
        for char in text
    )


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


_VERIFICATION = {
    core_dlq.VERIFIED: "verified",
    core_dlq.UNVERIFIED: "UNVERIFIED",
    core_dlq.UNVERIFIABLE: "no key",
}


def dead_letter_rows(
    messages: Sequence[DeadLetterMessage], now: datetime | None = None
) -> list[list[str]]:
    """Return a header row and one row per dead letter, for a table."""
    now = now or datetime.now(timezone.utc)
    result = [
        ["SEQ", "AGE", "REASON", "CONSUMER", "ORIGINAL SUBJECT", "EVENT ID", "SIGNATURE", "ERROR"]
    ]
    for message in messages:
        letter = message.letter
        age = message.age(now)
        error = f"{letter.error_class}: {letter.error_message}".strip(": ")
        result.append(
            [
                str(message.seq),
                format_age(age) if age is not None else "?",
                printable(letter.reason) or "-",
                printable(letter.consumer) or "-",
                printable(letter.original_subject) or "-",
                printable(letter.event_id or "") or "-",
                _VERIFICATION.get(message.verification, "?"),
                _shorten(printable(error) or "-", 60),
            ]
        )
    return result


def dead_letter_notes(messages: Sequence[DeadLetterMessage]) -> list[str]:
    """Return what a listing must add below the table: invalid headers, what verifies."""
    lines = [
        f"dead letter {message.seq}: invalid {_invalid_text(name, value)}"
        for message in messages
        for name, value in sorted(message.letter.invalid.items())
    ]
    if any(message.verification == core_dlq.UNVERIFIABLE for message in messages):
        lines.append(UNVERIFIABLE_NOTE)
    elif any(message.verification == core_dlq.UNVERIFIED for message in messages):
        lines.append(UNVERIFIED_NOTE)
    return lines


UNVERIFIABLE_NOTE = (
    "DLQ_SIGNING_KEY is not set: these letters cannot be verified; anyone allowed to publish "
    "on the DLQ subject can write one, and replay sends them only to this app's inbound "
    "subject (or to one named with --to-subject)"
)
UNVERIFIED_NOTE = (
    "UNVERIFIED letters have no valid Jsb-Signature: this bridge did not write them (or wrote "
    "them with another key); replay skips them unless given --include-unverified"
)


def _invalid_text(name: str, value: str) -> str:
    return f"{printable(name)}: {printable(value)} (not a valid value; ignored)"


def _verification_line(message: DeadLetterMessage) -> str:
    if message.verification == core_dlq.VERIFIED:
        return "signature    verified: signed with DLQ_SIGNING_KEY by a bridge holding it"
    if message.verification == core_dlq.UNVERIFIED:
        return (
            "signature    UNVERIFIED: no valid Jsb-Signature; this bridge did not write it (or "
            "wrote it with another key), and replay skips it unless given --include-unverified"
        )
    return "signature    cannot be verified: DLQ_SIGNING_KEY is not set"


_WRITERS = {
    core_dlq.BRIDGE_FORMAT: "jetstream-bridge (Jsb-* headers)",
    core_dlq.GEM_FORMAT: "a Ruby jetstream_bridge service (x-dlq-* headers)",
}


def _claim_lines(message: DeadLetterMessage) -> list[str]:
    """What the headers claim, read the same way for both header sets."""
    letter = message.letter
    claims = (
        ("written by", _WRITERS.get(letter.format, "unknown: neither Jsb-* nor x-dlq-* headers")),
        ("reason", letter.reason),
        ("subject", letter.original_subject),
        ("event id", letter.event_id or ""),
        ("consumer", letter.consumer),
        ("deliveries", "" if letter.deliveries is None else str(letter.deliveries)),
    )
    lines = [f"{name.ljust(12)} {printable(value)}" for name, value in claims if value]
    # A field inside a header (x-dlq-context.deliveries) has no header line to mark.
    lines += [
        f"{'invalid'.ljust(12)} {_invalid_text(name, value)}"
        for name, value in sorted(letter.invalid.items())
        if name not in message.headers
    ]
    return lines


def dead_letter_lines(message: DeadLetterMessage, now: datetime | None = None) -> list[str]:
    """Render one dead letter: where it is, whether it verifies, every header, and the body."""
    age = message.age(now)
    invalid = message.letter.invalid
    lines = [
        f"dead letter {message.seq} in stream {message.stream} ({printable(message.subject)})",
        f"stored at {message.stored_at.isoformat() if message.stored_at else '?'}"
        + (f" ({format_age(age)} ago)" if age is not None else ""),
        _verification_line(message),
        *_claim_lines(message),
        "",
        "headers:",
    ]
    headers = sorted(
        (printable(name), name, printable(value)) for name, value in message.headers.items()
    )
    width = max((len(shown) for shown, _, _ in headers), default=0)
    for shown, name, value in headers:
        mark = "  <- INVALID, ignored" if name in invalid else ""
        lines.append(f"  {shown.ljust(width)}  {value}{mark}")
    lines += ["", "body:", printable(message.body_text(), newlines=True)]
    return lines


def purged_line(table: str, what: str, purged: Purged, age: float) -> str:
    """One line of the report: how many rows of ``table`` went (or would go)."""
    verb = "would delete" if purged.dry_run else "deleted"
    return (
        f"{table}: {verb} {purged.rows} {what} row(s) older than {format_duration(age)} "
        f"in {purged.batches} batch(es)"
    )
