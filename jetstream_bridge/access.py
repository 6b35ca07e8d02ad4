"""Who may read the health details and the metrics: staff users, or callers with a token.

The health status (healthy or not) is public on purpose: load balancers read it. What lies
behind it (server names and versions, stream and consumer names, lag, error texts that may
name the database host) is for staff users and for callers sending
``Authorization: Bearer <token>`` with the token configured (``HEALTH_TOKEN``,
``METRICS_TOKEN``). An unset token admits nobody by token.
"""

from __future__ import annotations

import hmac
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest

from .conf import get_config
from .core.redaction import Secret
from .exceptions import ConfigurationError


def configured_token(name: str) -> Secret | None:
    """Return the ``health_token``/``metrics_token`` setting; ``None`` when unset or invalid."""
    try:
        token = getattr(get_config(), name)
    except ConfigurationError:
        return None
    return token if isinstance(token, Secret) and token.reveal() else None


def has_token(request: HttpRequest, token: Secret | None) -> bool:
    """Tell whether the request sends ``Authorization: Bearer <token>``."""
    if token is None:
        return False
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not sent:
        return False
    # Constant time: the comparison must not tell how much of a guess was right.
    return hmac.compare_digest(sent.strip().encode(), token.reveal().encode())


def _is_staff(user: Any) -> bool:
    return bool(getattr(user, "is_active", False) and getattr(user, "is_staff", False))


def may_see(request: HttpRequest, token: Secret | None) -> bool:
    """Tell whether the request comes from an active staff user or carries the token."""
    return has_token(request, token) or _is_staff(getattr(request, "user", None))


async def may_see_async(request: HttpRequest, token: Secret | None) -> bool:
    """Async twin of ``may_see``: the session's user is loaded off the event loop."""
    if has_token(request, token):
        return True
    if not hasattr(request, "user"):
        return False  # no AuthenticationMiddleware: nobody is logged in
    auser = getattr(request, "auser", None)  # Django >= 5.0
    user = await auser() if auser is not None else await sync_to_async(_loaded_user)(request)
    return _is_staff(user)


def _loaded_user(request: HttpRequest) -> Any:
    user = request.user
    _ = user.is_staff  # evaluate the lazy user here, in the sync thread
    return user
