"""nats-py connect options from the bridge's settings: credentials and TLS.

Each credential is checked here, before connecting, so that a bad one fails at once with an
error naming the setting instead of looking like an unreachable server.
"""

from __future__ import annotations

import ssl
from typing import Any

from ..core.errors import AuthenticationFailed
from ..core.settings import BridgeConfig


def tls_context(config: BridgeConfig) -> ssl.SSLContext | None:
    """Return the TLS context for ``TLS_CA_FILE``/``TLS_CERT_FILE``, or ``None`` without TLS."""
    if not (config.tls_ca_file or config.tls_cert_file):
        return None
    # A missing, unreadable or mismatched file would otherwise escape ``connect()`` as a bare
    # OSError/ssl.SSLError, outside our exception tree; name the setting to fix instead.
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls_ca_file)
    except (OSError, ValueError) as exc:
        raise AuthenticationFailed(
            f"cannot load TLS_CA_FILE {config.tls_ca_file!r}: {exc}"
        ) from exc
    if config.tls_cert_file and config.tls_key_file:
        try:
            # An encrypted key must fail, not make OpenSSL prompt on the terminal (a hang).
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file, password=b"")
        except (OSError, ValueError) as exc:
            raise AuthenticationFailed(
                f"cannot load TLS_CERT_FILE {config.tls_cert_file!r} with TLS_KEY_FILE "
                f"{config.tls_key_file!r}: {exc} (the key must be unencrypted PEM and match "
                "the certificate)"
            ) from exc
    return context


def _check_nkey_seed(seed: str) -> None:
    # nats-py only decodes the seed mid-connect, and a bad one then surfaces as "could not
    # connect ... is the server running?". Check it here; ``from None`` keeps the decoder's
    # own exceptions (which could quote the input) out of every traceback.
    try:
        import nkeys

        nkeys.from_seed(bytearray(seed.strip().encode())).wipe()
    except ImportError:
        raise AuthenticationFailed("NKEY_SEED needs the nkeys package: pip install nkeys") from None
    except Exception:
        raise AuthenticationFailed(
            "NKEY_SEED in JETSTREAM_BRIDGE is not a valid nkey seed (a user seed starts with 'SU')."
        ) from None


def _check_creds_file(path: str) -> None:
    # nats-py reads the file on every (re)connect; an unreadable one would look like an
    # unreachable server until CONNECT_TIMEOUT. Fail at once, naming the setting.
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise AuthenticationFailed(
            f"cannot read CREDS_FILE {path!r}: {exc.strerror or exc}"
        ) from None


def auth_options(config: BridgeConfig) -> dict[str, Any]:
    """Return the keyword arguments for ``nats.aio.client.Client.connect`` that authenticate."""
    options: dict[str, Any] = {}
    if config.user and config.password:
        options["user"] = config.user
        options["password"] = config.password.reveal()
    if config.token:
        options["token"] = config.token.reveal()
    if config.nkey_seed:
        _check_nkey_seed(config.nkey_seed.reveal())
        options["nkeys_seed_str"] = config.nkey_seed.reveal()
    if config.creds_file:
        _check_creds_file(config.creds_file)
        options["user_credentials"] = config.creds_file
    tls = tls_context(config)
    if tls is not None:
        options["tls"] = tls
    if config.tls_handshake_first:
        options["tls_handshake_first"] = True
    return options
