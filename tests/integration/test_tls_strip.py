"""TLS cannot be stripped: with TLS asked for, the connection is TLS or it fails, and no
credentials ever reach a plaintext socket.

A fake server on loopback answers ``INFO`` without ``tls_required`` (what a downgrading man in
the middle does) and records every byte it receives; real nats-servers cover the ways TLS
legitimately starts (server-required, server-offered, handshake first) and a certificate
issued for another host name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from jetstream_bridge.core.errors import AuthenticationFailed, NatsError
from jetstream_bridge.core.settings import BridgeConfig
from jetstream_bridge.testing.server import NatsServer
from tests.integration.test_security import (
    PASSWORD,
    USER,
    Pki,
    _capture_logs,  # noqa: F401 (autouse fixture)
    _issue,
    _write_cert,
    _write_key,
    assert_refused_without_leaking,
    make_config,
    pki,  # noqa: F401 (fixture)
    round_trip,
    serve,
    workdir,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.nats


class PlaintextServer:
    """A fake NATS server that never offers TLS and records what clients send it."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.received = bytearray()
        self.connections = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"INFO " + json.dumps(self.info).encode() + b"\r\n")
        await writer.drain()
        try:
            while chunk := await reader.read(4096):
                self.received += chunk
                if b"PING" in chunk:  # answer like a server, so a client would think it is in
                    writer.write(b"PONG\r\n")
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def attack(self, config_for: Any, caplog: pytest.LogCaptureFixture) -> NatsError:
        """Run the server while the bridge connects with ``config_for(port)``; return its error."""
        outcome: list[NatsError] = []

        async def scenario() -> None:
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            try:
                config = config_for(self.port)
                outcome.append(
                    await asyncio.to_thread(
                        assert_refused_without_leaking, config, caplog, PASSWORD
                    )
                )
            finally:
                server.close()
                await server.wait_closed()

        asyncio.run(scenario())
        return outcome[0]


PLAIN_INFO = {
    "server_id": "FAKE",
    "server_name": "fake",
    "version": "2.11.0",
    "proto": 1,
    "host": "127.0.0.1",
    "port": 4222,
    "headers": True,
    "max_payload": 1048576,
    "jetstream": True,
    "auth_required": True,
}


def _tls_url_with_settings_credentials(port: int, certs: Pki) -> BridgeConfig:
    return make_config(f"tls://127.0.0.1:{port}", USER=USER, PASSWORD=PASSWORD)


def _nats_url_with_ca_file(port: int, certs: Pki) -> BridgeConfig:
    return make_config(
        f"nats://127.0.0.1:{port}", USER=USER, PASSWORD=PASSWORD, TLS_CA_FILE=certs.ca_file
    )


def _tls_url_with_credentials_in_it(port: int, certs: Pki) -> BridgeConfig:
    return make_config(f"tls://{USER}:{PASSWORD}@127.0.0.1:{port}")


@pytest.mark.parametrize(
    "configure",
    [
        _tls_url_with_settings_credentials,
        _nats_url_with_ca_file,
        _tls_url_with_credentials_in_it,
    ],
)
def test_tls__a_server_that_does_not_start_tls_gets_no_credentials(
    pki: Pki,  # noqa: F811
    configure: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = PlaintextServer(PLAIN_INFO)
    exc = fake.attack(lambda port: configure(port, pki), caplog)

    assert fake.connections >= 1, "the bridge never reached the fake server"
    assert b"CONNECT" not in fake.received
    assert PASSWORD.encode() not in fake.received
    assert isinstance(exc, AuthenticationFailed)
    assert "did not start TLS" in str(exc)
    assert f"127.0.0.1:{fake.port}" in str(exc)  # names the (redacted) server


def test_tls__a_server_that_only_offers_tls_is_upgraded(pki: Pki) -> None:  # noqa: F811
    # allow_non_tls: INFO says tls_available, not tls_required; the Go client upgrades when
    # it wants a secure connection, and so does the bridge instead of refusing.
    server = NatsServer(
        config=f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", '
        f'timeout: 2 }}\nallow_non_tls: true\nauthorization {{ user: "{USER}", '
        f'password: "{PASSWORD}" }}'
    )
    server.start()
    try:
        config = make_config(server.url, USER=USER, PASSWORD=PASSWORD, TLS_CA_FILE=pki.ca_file)
        assert round_trip(config) == b'{"ok":true}'
    finally:
        server.cleanup()


def test_tls__handshake_first_connects_to_a_server_configured_for_it(
    pki: Pki,  # noqa: F811
) -> None:
    for server in serve(
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", '
        f"timeout: 2, handshake_first: true }}",
        scheme="tls",
    ):
        config = make_config(server.url, TLS_CA_FILE=pki.ca_file, TLS_HANDSHAKE_FIRST=True)
        assert round_trip(config) == b'{"ok":true}'


def test_tls__a_certificate_for_another_host_name_fails_clearly(
    pki: Pki,  # noqa: F811
    workdir: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A certificate from the trusted CA, but issued for another name than the one dialled.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("jsb mismatch CA", ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(
        "nats.other.example",
        server_key,
        (ca, ca_key),
        server=True,
        names=[
            x509.DNSName("nats.other.example"),
            x509.IPAddress(ipaddress.IPv4Address("10.9.8.7")),
        ],
    )
    ca_file = _write_cert(workdir / "mismatch-ca.pem", ca)
    cert_file = _write_cert(workdir / "mismatch-server.pem", cert)
    key_file = _write_key(workdir / "mismatch-server-key.pem", server_key)
    for server in serve(
        f'tls {{ cert_file: "{cert_file}", key_file: "{key_file}", timeout: 2 }}\n'
        f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}',
        scheme="tls",
    ):
        config = make_config(server.url, USER=USER, PASSWORD=PASSWORD, TLS_CA_FILE=ca_file)
        exc = assert_refused_without_leaking(config, caplog, PASSWORD)
        assert isinstance(exc, AuthenticationFailed)
        assert "mismatch" in str(exc) or "doesn't match" in str(exc), str(exc)
