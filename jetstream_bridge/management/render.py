"""Text for a terminal: the health report and dead letters, as the commands print them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from ..core.durations import format_age
from ..dlq import DeadLetterMessage
from ..health import ConsumerLag, HealthReport, OutboxBacklog


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
    if report.consumers:
        lines += _consumer_lines(report.consumers)
    if report.outbox is not None:
        lines.append(f"outbox       {_outbox_text(report.outbox)}")
    if report.dlq is not None:
        lines.append(f"dlq          {report.dlq.messages} message(s) on {report.dlq.subject}")
    if report.problems:
        lines.append("problems")
        lines += [f"  - {problem}" for problem in report.problems]
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


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def dead_letter_rows(
    messages: Sequence[DeadLetterMessage], now: datetime | None = None
) -> list[list[str]]:
    """Return a header row and one row per dead letter, for a table."""
    now = now or datetime.now(timezone.utc)
    result = [["SEQ", "AGE", "REASON", "CONSUMER", "ORIGINAL SUBJECT", "EVENT ID", "ERROR"]]
    for message in messages:
        letter = message.letter
        age = message.age(now)
        error = f"{letter.error_class}: {letter.error_message}".strip(": ")
        result.append(
            [
                str(message.seq),
                format_age(age) if age is not None else "?",
                letter.reason or "-",
                letter.consumer or "-",
                letter.original_subject or "-",
                letter.event_id or "-",
                _shorten(error or "-", 60),
            ]
        )
    return result


def dead_letter_lines(message: DeadLetterMessage, now: datetime | None = None) -> list[str]:
    """Render one dead letter: where it is, every header, and the body."""
    age = message.age(now)
    lines = [
        f"dead letter {message.seq} in stream {message.stream} ({message.subject})",
        f"stored at {message.stored_at.isoformat() if message.stored_at else '?'}"
        + (f" ({format_age(age)} ago)" if age is not None else ""),
        "",
        "headers:",
    ]
    width = max((len(name) for name in message.headers), default=0)
    lines += [f"  {name.ljust(width)}  {value}" for name, value in sorted(message.headers.items())]
    lines += ["", "body:", message.body_text()]
    return lines
