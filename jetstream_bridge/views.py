"""The health endpoint: JSON, 200 when healthy and 503 otherwise.

Mount it with ``path("health/jetstream/", include("jetstream_bridge.urls"))`` or route
``HealthView.as_view(...)`` yourself to set thresholds or named durables. Anyone gets the
status; the details (servers, streams, lag, error texts that may name the database host) go
only to staff users and to callers sending ``Authorization: Bearer <HEALTH_TOKEN>``
(``detail=True`` shows them to everyone, ``detail=False`` to no one). The body never holds
credentials: server URLs are redacted and error texts scrubbed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.utils.cache import add_never_cache_headers
from django.views import View

from .access import configured_token, may_see_async
from .exceptions import ConfigurationError
from .health import UNHEALTHY, Duration, check_async

logger = logging.getLogger(__name__)


class HealthView(View):
    """Run ``jetstream_bridge.health.check_async`` and answer with its report."""

    http_method_names = ["get", "head", "options"]

    durables: Sequence[str] = ()
    max_consumer_lag: int | None = None
    max_outbox_age: Duration | None = None
    max_dlq_depth: int | None = None
    timeout: float | None = None
    using: str | None = None
    # None: details for staff users and HEALTH_TOKEN holders only; True: for everyone;
    # False: for no one.
    detail: bool | None = None

    async def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        detail = self.detail
        if detail is None:
            detail = await may_see_async(request, configured_token("health_token"))
        try:
            report = await check_async(
                self.durables,
                max_consumer_lag=self.max_consumer_lag,
                max_outbox_age=self.max_outbox_age,
                max_dlq_depth=self.max_dlq_depth,
                timeout=self.timeout,
                using=self.using,
            )
        except ConfigurationError:
            logger.exception("health check: invalid JETSTREAM_BRIDGE settings")
            body: dict[str, Any] = {"status": UNHEALTHY}
            if detail:
                body["problems"] = ["invalid JETSTREAM_BRIDGE settings; run `manage.py check`"]
            status = 503
        else:
            body = report.to_dict() if detail else {"status": report.status}
            status = 200 if report.healthy else 503
        response = JsonResponse(body, status=status)
        add_never_cache_headers(response)
        return response


health = HealthView.as_view()
