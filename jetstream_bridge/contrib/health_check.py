"""A django-health-check (4.x) check for the bridge.

Import this module only with ``django-health-check>=4`` installed (``pip install
django-jetstream-bridge[health-check]``); the rest of the bridge never imports it. Add the
check to a ``HealthCheckView``::

    from health_check.views import HealthCheckView

    path("ht/", HealthCheckView.as_view(checks=[
        "health_check.checks.Database",
        ("jetstream_bridge.contrib.health_check.JetStream", {"max_consumer_lag": 1000}),
    ]))

An unreachable server raises ``ServiceUnavailable``; any other problem (missing stream, a
threshold exceeded) raises ``ServiceReturnedUnexpectedResult``.
"""

from __future__ import annotations

import dataclasses
import logging

try:
    from health_check.base import HealthCheck
    from health_check.exceptions import ServiceReturnedUnexpectedResult, ServiceUnavailable
except ImportError as exc:  # absent, or the 3.x API (BaseHealthCheckBackend)
    raise ImportError(
        "jetstream_bridge.contrib.health_check needs django-health-check>=4: "
        "pip install 'django-health-check>=4'"
    ) from exc

from ..exceptions import ConfigurationError
from ..health import UNREACHABLE, check_async

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class JetStream(HealthCheck):  # type: ignore[misc]  # django-health-check ships no types
    """Check NATS, the stream, consumer lag, the outbox backlog and the DLQ depth."""

    durables: tuple[str, ...] = ()
    max_consumer_lag: int | None = None
    max_outbox_age: float | str | None = None
    max_dlq_depth: int | None = None

    async def run(self) -> None:
        try:
            report = await check_async(
                self.durables,
                max_consumer_lag=self.max_consumer_lag,
                max_outbox_age=self.max_outbox_age,
                max_dlq_depth=self.max_dlq_depth,
                # Answer before django-health-check's own timeout gives up on us.
                timeout=self.timeout.total_seconds(),
            )
        except ConfigurationError as exc:
            raise ServiceReturnedUnexpectedResult(
                "invalid JETSTREAM_BRIDGE settings; run `manage.py check`"
            ) from exc
        if report.healthy:
            return
        message = "; ".join(report.problems) or report.status
        if report.status == UNREACHABLE:
            raise ServiceUnavailable(message) from report.error
        raise ServiceReturnedUnexpectedResult(message) from report.error
