"""Authentication and TLS against real nats-server processes configured for each mechanism.

Every mechanism the settings offer (USER/PASSWORD, TOKEN, NKEY_SEED, CREDS_FILE, TLS client
certificates) gets its own spawned server: the right credentials round-trip a message through a
stream, the wrong ones fail with our own exception within a bounded time, and no secret shows up
in logs, exception text or the parsed config.

Key material is made here, offline: nkeys with the ``nkeys`` package, the operator/account/user
JWT chain of a creds file by signing the claims with those nkeys (what ``nsc`` does), and the
certificates with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jetstream_bridge.broker import Connection
from jetstream_bridge.core.errors import AuthenticationFailed, NatsError
from jetstream_bridge.core.settings import BridgeConfig, parse_config
from jetstream_bridge.testing.server import NatsServer, ServerNotFound, find_nats_server

try:
    find_nats_server()
except ServerNotFound as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"needs a nats-server binary: {exc}", allow_module_level=True)

CONNECT_TIMEOUT = 2.0
# A refused connect must end within the connect timeout plus closing overhead, never hang.
FAIL_WITHIN = CONNECT_TIMEOUT + 2.0

USER = "bridge"
PASSWORD = "Corr3ct-Pa55word-91c2"
WRONG_PASSWORD = "WRONGSECRET-pw-4d7e"
TOKEN = "Corr3ct-Token-5b8a"
WRONG_TOKEN = "WRONGSECRET-token-0c1f"


# -- helpers ---------------------------------------------------------------------------------


def make_config(url: str, **extra: Any) -> BridgeConfig:
    config, problems = parse_config(
        {
            "DESTINATION_APP": "peer",
            "NATS_URLS": [url],
            "CONNECT_TIMEOUT": f"{CONNECT_TIMEOUT:g}s",
            "REQUEST_TIMEOUT": "3s",
            **extra,
        }
    )
    assert config is not None, problems
    return config


def round_trip(config: BridgeConfig) -> bytes:
    """Connect with ``config``, store one message in a fresh stream and read it back."""

    async def scenario() -> bytes:
        conn = Connection(config)
        name = f"SEC_{uuid.uuid4().hex[:8]}"
        try:
            await conn.jsm.create_stream(
                {"name": name, "subjects": [f"{name}.>"], "storage": "memory"}
            )
            try:
                ack = await conn.publish(f"{name}.event", b'{"ok":true}')
                stored = await conn.jsm.get_message(name, ack.seq)
            finally:
                await conn.jsm.delete_stream(name)
        finally:
            await conn.close()
        assert stored is not None
        return stored.data

    return asyncio.run(scenario())


def refused(config: BridgeConfig) -> tuple[NatsError, float]:
    """Connect with ``config`` and return the error it fails with and how long that took."""

    async def scenario() -> tuple[NatsError, float]:
        conn = Connection(config)
        started = time.monotonic()
        try:
            # The cap turns a hang into a failure instead of waiting for pytest-timeout.
            await asyncio.wait_for(conn.connect(), FAIL_WITHIN)
        except NatsError as exc:
            return exc, time.monotonic() - started
        except asyncio.TimeoutError:
            pytest.fail(f"connect to {conn.urls_for_humans} still pending after {FAIL_WITHIN}s")
        finally:
            await conn.close()
        pytest.fail(f"connected to {conn.urls_for_humans} although it should be refused")

    return asyncio.run(scenario())


def everything_printed(
    caplog: pytest.LogCaptureFixture, exc: BaseException, config: BridgeConfig
) -> str:
    """Join what a user could ever see: log records (with extras), the error chain, the config."""
    formatter = logging.Formatter()
    parts = [caplog.text, repr(config), str(config), ", ".join(config.redacted_urls)]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(vars(record)))  # extras such as ``servers`` live here
        if record.exc_info:
            parts.append(formatter.formatException(record.exc_info))
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.extend([str(error), repr(error), "".join(traceback.format_exception(error))])
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def assert_refused_without_leaking(
    config: BridgeConfig, caplog: pytest.LogCaptureFixture, *secrets: str
) -> NatsError:
    exc, elapsed = refused(config)
    assert elapsed < FAIL_WITHIN, f"took {elapsed:.1f}s to fail: {exc}"
    text = everything_printed(caplog, exc, config)
    for secret in secrets:
        where = text.find(secret)
        assert where < 0, f"secret leaked in: ...{text[max(0, where - 200) : where]}<SECRET>"
    return exc


@pytest.fixture(autouse=True)
def _capture_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="jetstream_bridge")
    caplog.set_level(logging.DEBUG, logger="nats")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


def serve(config: str, *, scheme: str = "nats") -> Iterator[NatsServer]:
    server = NatsServer(config=config, scheme=scheme)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


# -- nkeys and JWTs --------------------------------------------------------------------------


def new_nkey(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public(kp: nkeys.KeyPair) -> str:
    return str(kp.public_key.decode())


def seed(kp: nkeys.KeyPair) -> str:
    return str(kp.seed.decode())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def sign_jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any]) -> str:
    """Encode NATS v2 JWT claims signed by ``issuer`` (what nsc and nats-io/jwt do)."""
    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": public(issuer),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    body = json.dumps(claims, separators=(",", ":")).encode()
    claims["jti"] = base64.b32encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}"
    return f"{signing_input}.{_b64url(issuer.sign(signing_input.encode()))}"


UNLIMITED_ACCOUNT = {
    "type": "account",
    "limits": {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
        # JetStream is off for an account unless its JWT grants storage.
        "mem_storage": -1,
        "disk_storage": -1,
        "streams": -1,
        "consumer": -1,
    },
}
UNLIMITED_USER = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}


def write_creds(path: Path, user_jwt: str, user: nkeys.KeyPair) -> str:
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed(user)}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
    path.chmod(0o600)
    return str(path)


@dataclass(frozen=True)
class Operator:
    """A trust chain: the server config that trusts it and a user's creds file under it."""

    server_config: str
    creds_file: str
    user_seed: str


def make_operator(directory: Path, label: str) -> Operator:
    operator = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    system = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_nkey(nkeys.PREFIX_BYTE_USER)
    # JetStream refuses to start in operator mode without a system account.
    operator_jwt = sign_jwt(
        operator,
        public(operator),
        f"{label}-op",
        {"type": "operator", "system_account": public(system)},
    )
    system_jwt = sign_jwt(operator, public(system), "SYS", {"type": "account"})
    account_jwt = sign_jwt(operator, public(account), f"{label}-acc", UNLIMITED_ACCOUNT)
    user_jwt = sign_jwt(account, public(user), f"{label}-user", UNLIMITED_USER)
    server_config = (
        f'operator: "{operator_jwt}"\n'
        f"system_account: {public(system)}\n"
        "resolver: MEMORY\n"
        f'resolver_preload: {{ {public(system)}: "{system_jwt}", '
        f'{public(account)}: "{account_jwt}" }}\n'
    )
    creds = write_creds(directory / f"{label}.creds", user_jwt, user)
    return Operator(server_config=server_config, creds_file=creds, user_seed=seed(user))


# -- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca_file: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), False
        )
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    names
                    or [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                False,
            )
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(workdir: Path) -> Pki:
    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, other_ca_key, server_key, client_key = key(), key(), key(), key()
    ca = _issue("jsb test CA", ca_key, None)
    other_ca = _issue("jsb unrelated CA", other_ca_key, None)
    return Pki(
        ca_file=_write_cert(workdir / "ca.pem", ca),
        server_cert=_write_cert(
            workdir / "server.pem", _issue("nats-server", server_key, (ca, ca_key), server=True)
        ),
        server_key=_write_key(workdir / "server-key.pem", server_key),
        client_cert=_write_cert(
            workdir / "client.pem", _issue("bridge-client", client_key, (ca, ca_key))
        ),
        client_key=_write_key(workdir / "client-key.pem", client_key),
        other_ca_file=_write_cert(workdir / "other-ca.pem", other_ca),
    )


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[NatsServer]:
    yield from serve(f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}')


@pytest.fixture(scope="module")
def token_server() -> Iterator[NatsServer]:
    yield from serve(f'authorization {{ token: "{TOKEN}" }}')


@pytest.fixture(scope="module")
def nkey_user() -> nkeys.KeyPair:
    return new_nkey(nkeys.PREFIX_BYTE_USER)


@pytest.fixture(scope="module")
def nkey_server(nkey_user: nkeys.KeyPair) -> Iterator[NatsServer]:
    yield from serve(f'authorization {{ users = [ {{ nkey: "{public(nkey_user)}" }} ] }}')


@pytest.fixture(scope="module")
def operator(workdir: Path) -> Operator:
    return make_operator(workdir, "trusted")


@pytest.fixture(scope="module")
def creds_server(operator: Operator) -> Iterator[NatsServer]:
    yield from serve(operator.server_config)


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[NatsServer]:
    yield from serve(
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", '
        f'ca_file: "{pki.ca_file}", verify: true, timeout: 2 }}',
        scheme="tls",
    )


def with_credentials(url: str, userinfo: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{userinfo}@{rest}"


# -- user / password -------------------------------------------------------------------------


def test_password__settings_user_and_password_connect(password_server: NatsServer) -> None:
    config = make_config(password_server.url, USER=USER, PASSWORD=PASSWORD)
    assert round_trip(config) == b'{"ok":true}'


def test_password__credentials_in_the_url_connect(password_server: NatsServer) -> None:
    url = with_credentials(password_server.url, f"{USER}:{PASSWORD}")
    assert round_trip(make_config(url)) == b'{"ok":true}'


def test_password__wrong_settings_password_is_refused_without_leaking(
    password_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(password_server.url, USER=USER, PASSWORD=WRONG_PASSWORD)
    exc = assert_refused_without_leaking(config, caplog, WRONG_PASSWORD, PASSWORD)
    assert isinstance(exc, AuthenticationFailed)
    assert "PASSWORD" in str(exc)  # the message says which settings to check


def test_password__wrong_url_password_is_refused_without_leaking(
    password_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(with_credentials(password_server.url, f"{USER}:{WRONG_PASSWORD}"))
    exc = assert_refused_without_leaking(config, caplog, WRONG_PASSWORD)
    assert isinstance(exc, AuthenticationFailed)
    assert f"{USER}:***@127.0.0.1:{password_server.port}" in str(exc)
    # The leak check above saw the connection's own logging, not an empty capture.
    assert any("Authorization Violation" in r.getMessage() for r in caplog.records)


def test_password__missing_credentials_are_refused(
    password_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    exc = assert_refused_without_leaking(make_config(password_server.url), caplog)
    assert isinstance(exc, AuthenticationFailed)


# -- token -----------------------------------------------------------------------------------


def test_token__settings_token_connects(token_server: NatsServer) -> None:
    assert round_trip(make_config(token_server.url, TOKEN=TOKEN)) == b'{"ok":true}'


def test_token__token_in_the_url_connects(token_server: NatsServer) -> None:
    assert round_trip(make_config(with_credentials(token_server.url, TOKEN))) == b'{"ok":true}'


def test_token__wrong_settings_token_is_refused_without_leaking(
    token_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(token_server.url, TOKEN=WRONG_TOKEN)
    exc = assert_refused_without_leaking(config, caplog, WRONG_TOKEN, TOKEN)
    assert isinstance(exc, AuthenticationFailed)


def test_token__wrong_url_token_is_refused_without_leaking(
    token_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(with_credentials(token_server.url, WRONG_TOKEN))
    exc = assert_refused_without_leaking(config, caplog, WRONG_TOKEN)
    assert isinstance(exc, AuthenticationFailed)
    assert f"***@127.0.0.1:{token_server.port}" in str(exc)


# -- nkey ------------------------------------------------------------------------------------


def test_nkey__seed_of_a_known_user_connects(
    nkey_server: NatsServer, nkey_user: nkeys.KeyPair
) -> None:
    assert round_trip(make_config(nkey_server.url, NKEY_SEED=seed(nkey_user))) == b'{"ok":true}'


def test_nkey__seed_of_an_unknown_user_is_refused_without_leaking(
    nkey_server: NatsServer, nkey_user: nkeys.KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = seed(new_nkey(nkeys.PREFIX_BYTE_USER))
    config = make_config(nkey_server.url, NKEY_SEED=stranger)
    exc = assert_refused_without_leaking(config, caplog, stranger, seed(nkey_user))
    assert isinstance(exc, AuthenticationFailed)


def test_nkey__malformed_seed_fails_without_leaking(
    nkey_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = "SUNOTAVALIDSEEDBUTSECRETANYWAY7Q2"
    config = make_config(nkey_server.url, NKEY_SEED=garbage)
    exc = assert_refused_without_leaking(config, caplog, garbage)
    assert isinstance(exc, AuthenticationFailed)
    assert "NKEY_SEED" in str(exc)


# -- creds file (operator / account / user JWTs) ---------------------------------------------


def test_creds__user_creds_of_a_trusted_account_connect(
    creds_server: NatsServer, operator: Operator
) -> None:
    config = make_config(creds_server.url, CREDS_FILE=operator.creds_file)
    assert round_trip(config) == b'{"ok":true}'


def test_creds__missing_creds_file_fails_at_once_naming_the_setting(
    creds_server: NatsServer, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(workdir / "nowhere.creds")
    exc = assert_refused_without_leaking(make_config(creds_server.url, CREDS_FILE=missing), caplog)
    assert isinstance(exc, AuthenticationFailed)
    assert "CREDS_FILE" in str(exc)
    assert missing in str(exc)


def test_creds__creds_from_another_operator_are_refused_without_leaking(
    creds_server: NatsServer, operator: Operator, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = make_operator(workdir, "untrusted")
    config = make_config(creds_server.url, CREDS_FILE=stranger.creds_file)
    exc = assert_refused_without_leaking(config, caplog, stranger.user_seed, operator.user_seed)
    assert isinstance(exc, AuthenticationFailed)


# -- TLS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tls", "nats"])
def test_tls__client_certificate_signed_by_the_server_ca_connects(
    tls_server: NatsServer, pki: Pki, scheme: str
) -> None:
    # tls:// starts TLS at once; nats:// upgrades because the server's INFO requires TLS.
    assert tls_server.url.startswith("tls://127.0.0.1:")
    config = make_config(
        tls_server.url.replace("tls://", f"{scheme}://"),
        TLS_CA_FILE=pki.ca_file,
        TLS_CERT_FILE=pki.client_cert,
        TLS_KEY_FILE=pki.client_key,
    )
    assert round_trip(config) == b'{"ok":true}'


def test_tls__untrusted_server_certificate_fails_clearly(
    tls_server: NatsServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        tls_server.url,
        TLS_CA_FILE=pki.other_ca_file,
        TLS_CERT_FILE=pki.client_cert,
        TLS_KEY_FILE=pki.client_key,
    )
    exc = assert_refused_without_leaking(config, caplog)
    assert isinstance(exc, AuthenticationFailed)
    assert "certificate verify failed" in str(exc)


def test_tls__missing_client_certificate_fails_clearly(
    tls_server: NatsServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tls_server.url, TLS_CA_FILE=pki.ca_file)
    exc = assert_refused_without_leaking(config, caplog)
    assert isinstance(exc, AuthenticationFailed)
    assert "certificate" in str(exc)


def test_tls__unreadable_tls_file_fails_at_once_naming_the_setting(
    tls_server: NatsServer, pki: Pki, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(workdir / "no-such-ca.pem")
    config = make_config(
        tls_server.url,
        TLS_CA_FILE=missing,
        TLS_CERT_FILE=pki.client_cert,
        TLS_KEY_FILE=pki.client_key,
    )
    exc = assert_refused_without_leaking(config, caplog)
    assert isinstance(exc, AuthenticationFailed)
    assert "TLS_CA_FILE" in str(exc)
    assert missing in str(exc)


def test_tls__client_key_that_does_not_match_the_certificate_fails_clearly(
    tls_server: NatsServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        tls_server.url,
        TLS_CA_FILE=pki.ca_file,
        TLS_CERT_FILE=pki.client_cert,
        TLS_KEY_FILE=pki.server_key,
    )
    exc = assert_refused_without_leaking(config, caplog)
    assert isinstance(exc, AuthenticationFailed)
    assert "TLS_CERT_FILE" in str(exc)


def test_tls__encrypted_client_key_fails_instead_of_prompting(
    tls_server: NatsServer, pki: Pki, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # OpenSSL's default would ask for the passphrase on the terminal: a hang in a worker.
    encrypted = workdir / "client-key-encrypted.pem"
    key = serialization.load_pem_private_key(Path(pki.client_key).read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"Corr3ct-Passphrase"),
        )
    )
    config = make_config(
        tls_server.url,
        TLS_CA_FILE=pki.ca_file,
        TLS_CERT_FILE=pki.client_cert,
        TLS_KEY_FILE=str(encrypted),
    )
    exc = assert_refused_without_leaking(config, caplog, "Corr3ct-Passphrase")
    assert isinstance(exc, AuthenticationFailed)
    assert "TLS_KEY_FILE" in str(exc)
