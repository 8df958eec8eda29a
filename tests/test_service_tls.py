"""The daemon and the SDK over TLS (mqtts://) to a private Mosquitto with a certificate from a test CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run

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


@pytest.fixture
def tls_broker(tmp_path: Path) -> tuple[Mosquitto, Path]:
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("livepatchd test CA", ca_key, ca=True)
    srv = _cert("127.0.0.1", srv_key, issuer=ca.subject, issuer_key=ca_key)
    files = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM), "server.crt": srv.public_bytes(
        serialization.Encoding.PEM), "server.key": _pem_key(srv_key)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    broker = Mosquitto(tmp_path / "mosquitto", extra_conf=f"allow_anonymous true\ncertfile {tmp_path / 'server.crt'}\n"
                       f"keyfile {tmp_path / 'server.key'}\n")
    broker.start()
    yield broker, tmp_path / "ca.crt"  # type: ignore[misc]
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
