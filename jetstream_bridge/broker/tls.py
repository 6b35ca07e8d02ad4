"""TLS that cannot be stripped: no credentials on a socket that is not TLS when TLS is expected.

nats-py upgrades a ``nats://`` or even a ``tls://`` connection to TLS only when the server's
first ``INFO`` says ``tls_required``; a server (or a man in the middle) that leaves it out gets
a plaintext ``CONNECT`` carrying the user and password, and the connection looks healthy.
``GuardedClient`` closes that gap with two small overrides of nats-py's client:

* when the server only *offers* TLS (``tls_available``, a server with ``allow_non_tls``), it
  is upgraded as if required, as the Go client does for a secure connection;
* right before ``CONNECT`` is written, the transport itself is checked: if it is not TLS, the
  attempt fails with ``TlsNotOffered`` and nothing is sent. Reconnects go through the same path.

Both lean on nats-py internals (``_process_info``, ``_connect_command``, the transport's
stream writer); they fail closed: a transport we cannot recognise as TLS counts as plaintext.
"""

from __future__ import annotations

from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient

from ..core.settings import BridgeConfig


class TlsNotOffered(nats.errors.Error):
    """The server did not start TLS although the settings require it; nothing was sent."""

    def __str__(self) -> str:
        return "nats: the server did not offer TLS; refusing to send CONNECT in plaintext"


def expects_tls(config: BridgeConfig) -> bool:
    """Tell whether the settings ask for TLS: any TLS file or option, or a tls:// or wss:// URL."""
    if config.tls_ca_file or config.tls_cert_file or config.tls_handshake_first:
        return True
    return any(url.lower().startswith(("tls://", "wss://")) for url in config.nats_urls)


def transport_is_tls(transport: object) -> bool:
    """Tell whether nats-py's transport runs over TLS (``False`` when it cannot tell)."""
    writer = getattr(transport, "_io_writer", None)
    if writer is not None:
        return writer.get_extra_info("ssl_object") is not None
    # The websocket transport records whether it connected with an SSL context.
    return getattr(transport, "_using_tls", None) is True


class GuardedClient(NatsClient):
    """nats-py's client that refuses to authenticate over plaintext when TLS is expected."""

    def __init__(self, *, require_tls: bool) -> None:
        super().__init__()
        self._jsb_require_tls = require_tls

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if (
            self._jsb_require_tls
            and initial_connection
            and info.get("tls_available")
            and not info.get("tls_required")
        ):
            # nats-py reads this same dict next to decide on the upgrade.
            info["tls_required"] = True
        await super()._process_info(info, initial_connection=initial_connection)

    def _connect_command(self) -> bytes:
        if self._jsb_require_tls and not transport_is_tls(self._transport):
            raise TlsNotOffered()
        command: bytes = super()._connect_command()
        return command
