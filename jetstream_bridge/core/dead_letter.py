"""Dead-letter message headers: what failed, where, and why."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from .envelope import MSG_ID_HEADER

PREFIX = "Jsb-"
REASON = f"{PREFIX}Reason"
ERROR_CLASS = f"{PREFIX}Error-Class"
ERROR_MESSAGE = f"{PREFIX}Error-Message"
ORIGINAL_SUBJECT = f"{PREFIX}Original-Subject"
STREAM = f"{PREFIX}Stream"
STREAM_SEQ = f"{PREFIX}Stream-Seq"
DELIVERIES = f"{PREFIX}Deliveries"
CONSUMER = f"{PREFIX}Consumer"
FAILED_AT = f"{PREFIX}Failed-At"
EVENT_ID = f"{PREFIX}Event-Id"
REPLAY_OF = f"{PREFIX}Replay-Of"  # set on a replayed message: the DLQ sequence it came from

# Why a message was dead-lettered.
MALFORMED = "malformed"  # not an envelope: never retried
REJECTED = "rejected"  # the handler raised RejectMessage
NO_HANDLER = "no_handler"  # nothing is registered for this resource/event type
MAX_DELIVER = "max_deliver"  # the last allowed delivery failed

MAX_ERROR_LENGTH = 1000


def _clean(text: str) -> str:
    # Header values cannot hold line breaks; keep them short and single-line.
    return " ".join(text.split())[:MAX_ERROR_LENGTH]


@dataclass(frozen=True)
class DeadLetter:
    """Where a dead-lettered message came from and why it failed."""

    reason: str
    error_class: str
    error_message: str
    original_subject: str
    stream: str
    stream_seq: int
    deliveries: int
    consumer: str
    event_id: str | None = None

    def headers(self, now: datetime | None = None) -> dict[str, str]:
        failed_at = (now or datetime.now(timezone.utc)).isoformat(timespec="milliseconds")
        headers = {
            # Unique per original message and consumer, and never equal to the original
            # event_id, so the DLQ publish is not swallowed by the original's dedupe entry.
            MSG_ID_HEADER: f"dlq:{self.consumer}:{self.stream}:{self.stream_seq}",
            REASON: self.reason,
            ERROR_CLASS: self.error_class,
            ERROR_MESSAGE: _clean(self.error_message),
            ORIGINAL_SUBJECT: self.original_subject,
            STREAM: self.stream,
            STREAM_SEQ: str(self.stream_seq),
            DELIVERIES: str(self.deliveries),
            CONSUMER: self.consumer,
            FAILED_AT: failed_at.replace("+00:00", "Z"),
        }
        if self.event_id:
            headers[EVENT_ID] = self.event_id
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> DeadLetter:
        return cls(
            reason=headers.get(REASON, ""),
            error_class=headers.get(ERROR_CLASS, ""),
            error_message=headers.get(ERROR_MESSAGE, ""),
            original_subject=headers.get(ORIGINAL_SUBJECT, ""),
            stream=headers.get(STREAM, ""),
            stream_seq=int(headers.get(STREAM_SEQ, "0") or 0),
            deliveries=int(headers.get(DELIVERIES, "0") or 0),
            consumer=headers.get(CONSUMER, ""),
            event_id=headers.get(EVENT_ID),
        )
