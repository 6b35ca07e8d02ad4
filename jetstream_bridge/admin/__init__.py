"""Django admin for the outbox and inbox tables, and a status page.

Rows are read-only here: an event that was written or received is history. Two actions change
state, each behind its own permission (superusers have both):

* **Retry publishing** (``jetstream_bridge.retry_outboxevent``) puts unsent rows back in the
  queue, due now, and publishes them at once through the relay's code path;
* **Re-run handler** (``jetstream_bridge.rerun_inboxevent``) runs the handler again for rows not
  yet processed, in one transaction with the row's new status, as the consumer does.

The status page (``<admin>/jetstream_bridge/outboxevent/status/``, linked from both change
lists) shows the stream, consumer lag, DLQ depth and the table backlogs; it needs staff access
and permission to view outbox events.

*Dead letters* (``<admin>/jetstream_bridge/deadletter/``, ``dead_letters.py``) lists the
letters on the DLQ stream with filters and a detail page; *Replay*
(``jetstream_bridge.replay_deadletter``) and *Purge* (``jetstream_bridge.purge_deadletter``)
each need their permission, and each is recorded with the user who did it.

Only the built-in models are registered. For custom ``OUTBOX_MODEL``/``INBOX_MODEL`` models,
subclass the admins, list the columns your model has, and add the permissions to its ``Meta``::

    class MyOutbox(models.Model):
        ...
        class Meta:
            permissions = [("retry_myoutbox", "Can retry publishing outbox events")]

    @admin.register(MyOutbox)
    class MyOutboxAdmin(OutboxEventAdmin):
        list_display = ("event_id", "subject", "status_badge")
        list_filter = ("status",)
        date_hierarchy = None
"""

from __future__ import annotations

from django.contrib import admin

from ..models import DeadLetter, InboxEvent, OutboxEvent
from .base import EventAdmin, status_badge_html
from .dead_letters import DeadLetterAdmin
from .inbox import InboxEventAdmin
from .outbox import OutboxEventAdmin

admin.site.register(OutboxEvent, OutboxEventAdmin)
admin.site.register(InboxEvent, InboxEventAdmin)
admin.site.register(DeadLetter, DeadLetterAdmin)

__all__ = [
    "DeadLetterAdmin",
    "EventAdmin",
    "InboxEventAdmin",
    "OutboxEventAdmin",
    "status_badge_html",
]
