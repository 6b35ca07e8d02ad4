"""Run a handler the way the consumer would, without a broker.

    from jetstream_bridge.testing.deliver import deliver

    result = deliver(envelope, create_invoice)
    assert result.processed

The delivery goes through the consumer's own code (``BatchProcessor``, as a batch of one): the
inbox row and the handler's writes committed together, duplicates recognised by the inbox,
failures recorded and turned into a retry (with the ``BACKOFF`` delay) or, on the last delivery
or a ``RejectMessage``, a dead letter. Nothing is acked or published: the result says what the
consumer would do with the message.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..conf import get_config
from ..core import dead_letter
from ..core.envelope import MSG_ID_HEADER, encode
from ..handlers import Handler, HandlerRegistry, Registration, autodiscover, registry
from ..middleware import Middleware
from ..processing import BatchProcessor, ReceivedMessage, Verdict

DURABLE = "tests"
# The inbox also dedupes by (stream, stream_seq): start far above any real sequence so that a
# test delivery never passes for a message a real consumer handled in the same test.
_stream_seqs = itertools.count(1 << 48)


@dataclass(frozen=True)
class DeliveryResult:
    """What the consumer would do with the message: ack it, retry it later or dead-letter it."""

    verdict: str  # "ack", "retry" or "dead"
    duplicate: bool = False
    retry_delay: float | None = None
    dead_letter: dead_letter.DeadLetter | None = None

    @property
    def processed(self) -> bool:
        """The handler ran and its writes (and the inbox row) are in the database."""
        return self.verdict == "ack" and not self.duplicate

    @property
    def retried(self) -> bool:
        return self.verdict == "retry"

    @property
    def dead_lettered(self) -> bool:
        return self.verdict == "dead"


def deliver(  # noqa: PLR0913 (public test helper, keyword-only knobs)
    message: Mapping[str, Any] | bytes,
    handler: Handler | Registration | None = None,
    *,
    deliveries: int = 1,
    durable: str = DURABLE,
    subject: str | None = None,
    headers: Mapping[str, str] | None = None,
    using: str | None = None,
    handlers: HandlerRegistry = registry,
    middleware: Iterable[Middleware] = (),
) -> DeliveryResult:
    """Deliver ``message`` (an envelope, or raw bytes) as its ``deliveries``-th delivery.

    Without ``handler`` the registered handlers decide, as in ``jetstream_consume``. A
    ``context=True`` or ``schema=`` handler gets its ``MessageContext``, and the middleware
    (the ``MIDDLEWARE`` setting's, ``use()``'s, then ``middleware``) runs around it, as in a
    consumer.
    """
    config = get_config()
    data = message if isinstance(message, bytes) else encode(message)
    if handler is None:
        autodiscover()
    received_headers = dict(headers or {})
    if isinstance(message, Mapping) and "event_id" in message:
        received_headers.setdefault(MSG_ID_HEADER, str(message["event_id"]))
    received = ReceivedMessage(
        subject=subject or config.subjects.subscribe,
        data=data,
        headers=received_headers,
        stream=config.stream_name,
        stream_seq=next(_stream_seqs),
        deliveries=deliveries,
        consumer=durable,
    )
    processor = BatchProcessor(
        durable=durable,
        handler=handler,
        registry=handlers,
        using=using,
        config=config,
        middleware=middleware,
    )
    outcome = processor.process_message(received)
    # Nothing is settled, but the middleware's observers hear what the consumer would do.
    processor.chain.settled(received, outcome.settled_as, config)
    return DeliveryResult(
        verdict=outcome.verdict.value,
        duplicate=outcome.duplicate,
        retry_delay=outcome.delay if outcome.verdict is Verdict.RETRY else None,
        dead_letter=outcome.dead,
    )
