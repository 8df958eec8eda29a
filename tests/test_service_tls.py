"""The daemon, the SDK and lpctl over TLS (mqtts://) to a private Mosquitto with a certificate from a test CA;
then with client certificates required (mutual TLS, the certificate's name as the MQTT user name)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import BrokerUnreachable, LivepatchClient


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
          issuer_key: ec.EllipticCurvePrivateKey | None = None, ca: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(tmp: Path, names: list[str]) -> None:
    """A test CA (ca.crt) and, signed by it, a certificate and key per name (<name>.crt, <name>.key)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("livepatchd test CA", ca_key, ca=True)
    (tmp / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, issuer=ca.subject, issuer_key=ca_key)
        (tmp / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / f"{name}.key").write_bytes(_pem_key(key))


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    _issue(tmp_path, ["server"])
    broker = Mosquitto(tmp_path / "mosquitto", extra_conf=f"allow_anonymous true\ncertfile {tmp_path / 'server.crt'}\n"
                       f"keyfile {tmp_path / 'server.key'}\n")
    broker.start()
    yield broker, tmp_path / "ca.crt"
    broker.stop()


@pytest.fixture
def mtls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    """Client certificates required; a client's user name is its certificate's common name."""
    _issue(tmp_path, ["server", "daemon", "operator"])
    broker = Mosquitto(tmp_path / "mosquitto", extra_conf=(
        f"allow_anonymous false\ncertfile {tmp_path / 'server.crt'}\nkeyfile {tmp_path / 'server.key'}\n"
        f"cafile {tmp_path / 'ca.crt'}\nrequire_certificate true\nuse_identity_as_username true\n"))
    broker.start()
    yield broker, tmp_path
    broker.stop()


# paho-mqtt leaks the SSL socket of a connect whose TLS handshake fails (it raises before keeping it); the
# garbage collector then reports it. That is the negative case below, on purpose.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_daemon_and_sdk_over_tls(tls_broker: tuple[Mosquitto, Path], tmp_path: Path) -> None:
    broker, ca = tls_broker
    url = f"mqtts://127.0.0.1:{broker.port}"
    lpd = DaemonThread(daemon_settings(tmp_path / "lpd", url, tls_ca_file=ca)).start()
    try:
        async def main() -> None:
            trusted = ssl.create_default_context(cafile=str(ca))
            async with LivepatchClient(url, lpd.host, tls_context=trusted, timeout=10) as c:
                info = await c.info()
                assert info.host == lpd.host
            with pytest.raises(BrokerUnreachable):  # the system trust store does not know the test CA
                async with LivepatchClient(url, lpd.host, timeout=3) as c:
                    await c.info()
        run(main())
    finally:
        lpd.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above: refused handshakes
def test_client_certificates(mtls_broker: tuple[Mosquitto, Path], tmp_path: Path) -> None:
    broker, pki = mtls_broker
    url = f"mqtts://127.0.0.1:{broker.port}"
    lpd = DaemonThread(daemon_settings(tmp_path / "lpd", url, tls_ca_file=pki / "ca.crt",
                                       tls_cert_file=pki / "daemon.crt", tls_key_file=pki / "daemon.key")).start()
    try:
        base = ["--broker", url, "--host", lpd.host, "--timeout", "5", "--tls-ca", str(pki / "ca.crt")]
        operator = ["--tls-cert", str(pki / "operator.crt"), "--tls-key", str(pki / "operator.key")]
        result = CliRunner().invoke(app, [*base, *operator, "--json", "info"])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["data"]["host"] == lpd.host
        result = CliRunner().invoke(app, [*base, "info"])  # no client certificate: the broker refuses
        assert result.exit_code == 3
        assert "broker" in result.stderr
        result = CliRunner().invoke(app, [*base, "--tls-cert", str(pki / "nope.crt"), "info"])
        assert result.exit_code == 2
        assert "cannot load the TLS files" in result.stderr
    finally:
        lpd.stop()
