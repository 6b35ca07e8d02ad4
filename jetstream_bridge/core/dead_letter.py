"""Dead-letter message headers: what failed, where, and why; written, signed and read back.

Anyone allowed to publish on the DLQ subject can put a message there that looks like a dead
letter, so what the headers of a stored letter say is a claim (``ClaimedLetter``), parsed
without trusting it. With a signing key the consumer adds ``Jsb-Signature``, an HMAC-SHA256
over the body and every ``Jsb-`` header it wrote, so a letter the bridge wrote can be told
from one it did not (``verification``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import gem_dead_letter
from .envelope import MSG_ID_HEADER
from .redaction import Secret
from .subjects import Subjects, is_reserved, subject_problem

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
# Reason ``invalid``: the schema's errors, ASCII JSON (``core.schemas.errors_header``).
VALIDATION_ERRORS = f"{PREFIX}Validation-Errors"
SIGNATURE = f"{PREFIX}Signature"  # HMAC-SHA256 of the letter, when DLQ_SIGNING_KEY is set
REPLAY_OF = f"{PREFIX}Replay-Of"  # set on a replayed message: the DLQ sequence it came from
REPLAY_FOR = f"{PREFIX}Replay-For"  # on a targeted replay: the one durable that handles it
REPLAY_SIGNATURE = f"{PREFIX}Replay-Signature"  # HMAC of a targeted replay, with a signing key

# Why a message was dead-lettered.
MALFORMED = "malformed"  # not an envelope: never retried
REJECTED = "rejected"  # the handler raised RejectMessage
NO_HANDLER = "no_handler"  # nothing is registered for this resource/event type
MAX_DELIVER = "max_deliver"  # the last allowed delivery failed
INVALID = "invalid"  # the payload does not validate against its handler's schema

# Whether a stored letter is one this bridge wrote.
VERIFIED = "verified"  # its signature matches the configured key
UNVERIFIED = "unverified"  # a key is configured and the signature is missing or wrong
UNVERIFIABLE = "unverifiable"  # no key is configured: nothing can be told

# Which headers a stored letter carries: this bridge's ``Jsb-`` set, or the Ruby gem's
# ``x-dlq-*`` set (``core/gem_dead_letter.py``); neither is "".
BRIDGE_FORMAT = "jetstream-bridge"
GEM_FORMAT = "ruby-gem"

MAX_ERROR_LENGTH = 1000
# JetStream sequences and delivery counts are unsigned 64-bit numbers.
MAX_COUNT = 2**64 - 1
_COUNT = re.compile(r"[0-9]{1,20}")
# The message id replay gives a republished letter: its DLQ sequence and 128 random bits.
_REPLAY_ID = re.compile(r"replay:[0-9]{1,20}:[0-9a-f]{32}")
REPLAY_SIGNATURE_VERSION = "replay-v1"

# The headers a signature covers, in the order they are signed. The message id is left out:
# it is the server's dedupe key, not a claim about the failure.
SIGNED_HEADERS = (
    REASON,
    ERROR_CLASS,
    ERROR_MESSAGE,
    ORIGINAL_SUBJECT,
    STREAM,
    STREAM_SEQ,
    DELIVERIES,
    CONSUMER,
    FAILED_AT,
    EVENT_ID,
)
SIGNATURE_VERSION = "v1"


def _header_value(text: str) -> str:
    # A header value is one line, which the wire trims, of encodable text: a lone surrogate
    # (from a body that decoded to one) would make the publish itself raise.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", " ").replace("\n", " ").strip()


def _clean(text: str) -> str:
    # Keep error texts short and on one line; strip again, as the cut may end on a space.
    return " ".join(_header_value(text).split())[:MAX_ERROR_LENGTH].strip()


def nonce() -> str:
    """Return 128 random bits as hex: the part of a dead letter's message id nobody can guess."""
    return secrets.token_hex(16)


def message_id(consumer: str, stream: str, stream_seq: int) -> str:
    """Return a fresh ``Nats-Msg-Id`` for the dead letter of ``stream_seq``.

    It names where the letter comes from and ends in a random part: the DLQ subject is shared,
    and a predictable id could be published first, so that the server drops the real letter as
    a duplicate. It is never equal to the original event id, whose dedupe entry would swallow it.
    """
    return f"dlq:{consumer}:{stream}:{stream_seq}:{nonce()}"


def signing_key(secret: Secret | None) -> bytes | None:
    """Return the configured ``DLQ_SIGNING_KEY`` as HMAC key bytes, or ``None``."""
    return secret.reveal().encode("utf-8") if secret is not None else None


def sign(headers: Mapping[str, str], body: bytes, key: bytes) -> str:
    """Return the ``Jsb-Signature`` value for a letter with ``headers`` and ``body``."""
    # JSON makes the encoding unambiguous (a missing header is null, not ""); values are
    # stripped as the wire strips them, so what is read back verifies.
    signed = {name: _stripped(headers.get(name)) for name in SIGNED_HEADERS}
    if VALIDATION_ERRORS in headers:
        # Signed when present only, so letters written before it existed still verify.
        signed[VALIDATION_ERRORS] = _stripped(headers[VALIDATION_ERRORS])
    canonical = json.dumps(
        [SIGNATURE_VERSION, signed, hashlib.sha256(body).hexdigest()],
        ensure_ascii=True,
        separators=(",", ":"),
        sort_keys=True,
    ).encode("ascii")
    digest = hmac.new(key, canonical, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def _stripped(value: str | None) -> str | None:
    return value.strip() if value is not None else None


def verification(headers: Mapping[str, str], body: bytes, key: bytes | None) -> str:
    """Tell whether the letter was signed with ``key``: ``VERIFIED``, ``UNVERIFIED`` or
    ``UNVERIFIABLE`` (no key)."""
    if not key:
        return UNVERIFIABLE
    claimed = (headers.get(SIGNATURE) or "").strip()
    if claimed and hmac.compare_digest(claimed, sign(headers, body, key)):
        return VERIFIED
    return UNVERIFIED


def replay_message_id(dlq_seq: int) -> str:
    """Return a fresh ``Nats-Msg-Id`` for the replay of the letter at ``dlq_seq``.

    Random, so that nobody can publish under it first and have the server drop the replay.
    """
    return f"replay:{dlq_seq}:{nonce()}"


def sign_replay(target: str, msg_id: str, body: bytes, key: bytes) -> str:
    """Return the ``Jsb-Replay-Signature`` binding a replay's target durable, id and body."""
    canonical = json.dumps(
        [
            REPLAY_SIGNATURE_VERSION,
            target.strip(),
            msg_id.strip(),
            hashlib.sha256(body).hexdigest(),
        ],
        ensure_ascii=True,
        separators=(",", ":"),
    ).encode("ascii")
    return f"v1={hmac.new(key, canonical, hashlib.sha256).hexdigest()}"


def replay_headers(
    dlq_seq: int, body: bytes, *, target: str | None, key: bytes | None
) -> dict[str, str]:
    """Return the headers of a replay: for ``target`` only, or for every durable (``None``)."""
    msg_id = replay_message_id(dlq_seq)
    headers = {MSG_ID_HEADER: msg_id, REPLAY_OF: str(dlq_seq)}
    if target:
        headers[REPLAY_FOR] = _header_value(target)
        if key:
            headers[REPLAY_SIGNATURE] = sign_replay(headers[REPLAY_FOR], msg_id, body, key)
    return headers


def replay_target(
    headers: Mapping[str, str], body: bytes, key: bytes | None
) -> tuple[str | None, str | None]:
    """Return ``(durable, None)`` when a message is a replay meant for ``durable`` only.

    ``(None, why)`` when it carries ``Jsb-Replay-For`` that must not be honoured, and
    ``(None, None)`` when it carries none: either way every durable handles it. The header
    comes from the wire, so it counts only on a message whose ``Nats-Msg-Id`` has the form
    replay gives (an event published under its own id is never skipped) and, with a key,
    whose ``Jsb-Replay-Signature`` binds target, id and body.
    """
    target = (headers.get(REPLAY_FOR) or "").strip()
    if not target:
        return None, None
    msg_id = (headers.get(MSG_ID_HEADER) or "").strip()
    if not _REPLAY_ID.fullmatch(msg_id):
        return None, f"{REPLAY_FOR} on a message whose {MSG_ID_HEADER} is not a replay's"
    if key:
        claimed = (headers.get(REPLAY_SIGNATURE) or "").strip()
        if not (claimed and hmac.compare_digest(claimed, sign_replay(target, msg_id, body, key))):
            return None, f"{REPLAY_FOR} without a valid {REPLAY_SIGNATURE} for DLQ_SIGNING_KEY"
    return target, None


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
    validation_errors: str | None = None

    def headers(
        self, body: bytes = b"", *, key: bytes | None = None, now: datetime | None = None
    ) -> dict[str, str]:
        """Return the letter's headers; with ``key``, signed over them and ``body``."""
        failed_at = (now or datetime.now(timezone.utc)).isoformat(timespec="milliseconds")
        headers = {
            MSG_ID_HEADER: message_id(self.consumer, self.stream, self.stream_seq),
            REASON: _header_value(self.reason),
            ERROR_CLASS: _header_value(self.error_class),
            ERROR_MESSAGE: _clean(self.error_message),
            ORIGINAL_SUBJECT: _header_value(self.original_subject),
            STREAM: _header_value(self.stream),
            STREAM_SEQ: str(self.stream_seq),
            DELIVERIES: str(self.deliveries),
            CONSUMER: _header_value(self.consumer),
            FAILED_AT: failed_at.replace("+00:00", "Z"),
        }
        if self.event_id:
            headers[EVENT_ID] = _header_value(self.event_id)
        if self.validation_errors:
            headers[VALIDATION_ERRORS] = _header_value(self.validation_errors)[:MAX_ERROR_LENGTH]
        if key:
            headers[SIGNATURE] = sign(headers, body, key)
        return headers


def parse_count(value: str | None) -> int | None:
    """Return a sequence or delivery count written as a header, or ``None`` when it is not one.

    Only plain decimal digits up to 2**64-1 count: no sign, no exponent, no other digits.
    """
    text = (value or "").strip()
    if not _COUNT.fullmatch(text):
        return None
    number = int(text)
    return number if number <= MAX_COUNT else None


def parse_failed_at(value: str | None) -> datetime | None:
    """Return the ``Jsb-Failed-At`` time (ISO 8601, ``Z``), or ``None`` when it is not one."""
    text = (value or "").strip()
    if not text or len(text) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class ClaimedLetter:
    """What a stored dead letter's headers claim, read without trusting them.

    A number or time that does not parse is ``None`` here and its raw text is in ``invalid``
    (header name -> value as written), so that one forged header cannot break a listing.
    Letters of the Ruby gem (``x-dlq-*`` headers, no ``Jsb-Reason``) are read by
    ``core.gem_dead_letter``; ``format`` says which set was read.
    """

    reason: str = ""
    error_class: str = ""
    error_message: str = ""
    original_subject: str = ""
    stream: str = ""
    stream_seq: int | None = None
    deliveries: int | None = None
    consumer: str = ""
    failed_at: datetime | None = None
    event_id: str | None = None
    invalid: dict[str, str] = field(default_factory=dict)
    format: str = ""

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ClaimedLetter:
        if REASON not in headers and gem_dead_letter.is_gem_letter(headers):
            return cls(format=GEM_FORMAT, **gem_dead_letter.claims(headers))
        raw_seq, raw_deliveries, raw_failed_at = (
            headers.get(name) for name in (STREAM_SEQ, DELIVERIES, FAILED_AT)
        )
        stream_seq, deliveries = parse_count(raw_seq), parse_count(raw_deliveries)
        failed_at = parse_failed_at(raw_failed_at)
        parsed = (
            (STREAM_SEQ, raw_seq, stream_seq),
            (DELIVERIES, raw_deliveries, deliveries),
            (FAILED_AT, raw_failed_at, failed_at),
        )
        return cls(
            reason=headers.get(REASON, ""),
            error_class=headers.get(ERROR_CLASS, ""),
            error_message=headers.get(ERROR_MESSAGE, ""),
            original_subject=headers.get(ORIGINAL_SUBJECT, ""),
            stream=headers.get(STREAM, ""),
            stream_seq=stream_seq,
            deliveries=deliveries,
            consumer=headers.get(CONSUMER, ""),
            failed_at=failed_at,
            event_id=headers.get(EVENT_ID),
            # An empty value reads as absent; anything else that did not parse is shown.
            invalid={
                name: raw for name, raw, value in parsed if raw and raw.strip() and value is None
            },
            format=BRIDGE_FORMAT if REASON in headers else "",
        )


def target_problem(subjects: Subjects, subject: str, allowed: Collection[str] = ()) -> str | None:
    """Return why a dead letter must not be republished to ``subject``, or ``None``.

    The headers are claims anyone with publish rights on the DLQ subject could have written,
    so the target is this app's inbound subject (what its own consumers read) or one the
    operator named in ``allowed``; never ``$JS.API``, the DLQ itself, a wildcard or anything
    outside the env's ``{env}.data.sync.`` subjects.
    """
    if not subject:
        return (
            f"no original subject (neither a {ORIGINAL_SUBJECT} header nor an original_subject "
            f"in {gem_dead_letter.CONTEXT})"
        )
    problem = subject_problem(subject, allow_wildcards=False)
    if problem:
        return f"original subject {subject!r} {problem}"
    if is_reserved(subject) or subject.startswith("$"):
        return f"refusing to publish to system subject {subject!r}"
    if subject == subjects.dlq:
        return "the original subject is the DLQ itself"
    prefix = f"{subjects.env}.data.sync."
    if not subject.startswith(prefix):
        return f"refusing to publish to {subject!r}: outside this bridge's {prefix}* subjects"
    if subject != subjects.subscribe and subject not in allowed:
        return (
            f"refusing to publish to {subject!r}: not this app's inbound subject "
            f"{subjects.subscribe!r} (name it with --to-subject to replay there)"
        )
    return None


@dataclass(frozen=True)
class ReplayPolicy:
    """What a replay may do beyond the default: more target subjects, unverified letters.

    By default a letter is republished only to this app's inbound subject, for the durable
    that dead-lettered it (``Jsb-Replay-For``), and, when a signing key is configured, only if
    its signature verifies.
    """

    subjects: frozenset[str] = frozenset()
    include_unverified: bool = False
    broadcast: bool = False  # every durable on the subject gets it, not only the letter's

    def problem(self, subjects: Subjects, original_subject: str, verification: str) -> str | None:
        """Return why a letter must not be replayed, or ``None`` when it may be."""
        problem = target_problem(subjects, original_subject, self.subjects)
        if problem:
            return problem
        if verification == UNVERIFIED and not self.include_unverified:
            return (
                f"unverified: no valid {SIGNATURE} for DLQ_SIGNING_KEY, so this bridge did not "
                "write it (or wrote it with another key); replay it with --include-unverified "
                "only if you trust its sender"
            )
        return None
