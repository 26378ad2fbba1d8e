"""The KMIP client talks only to the server its CA vouches for *at that host name*.

A throwaway PKI (one CA, a client certificate, server certificates for different names)
and a real TLS listener on loopback that records what a client sends. The project's
``clients.kmip_client`` + ``KmipKeyProvider`` wrap a stand-in tenant key against it: with
a certificate for another host the handshake fails, nothing reaches the listener, and the
error says what to check; with a certificate for 127.0.0.1 the request does reach it (so
the listener can see a leak when there is one).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ArchiveKmsError, ConfigurationError
from archive_kms.keys.kmip import KmipKeyProvider
from archive_kms.keys.refs import parse_key_ref

L2 = bytes(range(0xA0, 0xC0))  # stand-in for a tenant key: what must never reach an impostor


def _write_key(path: Path, key) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _issue(ca_key, ca_name, name: str, san: list[x509.GeneralName], usage, tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(tmp / f"{name}.key", key)
    return tmp / f"{name}.pem", tmp / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test KMIP CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths = {"ca": tmp / "ca.pem"}
    paths["client"], paths["client_key"] = _issue(
        ca_key, ca_name, "client", [x509.DNSName("archive-kms")], ExtendedKeyUsageOID.CLIENT_AUTH, tmp
    )
    paths["evil"], paths["evil_key"] = _issue(
        ca_key, ca_name, "evil", [x509.DNSName("evil.example")], ExtendedKeyUsageOID.SERVER_AUTH, tmp
    )
    paths["loopback"], paths["loopback_key"] = _issue(
        ca_key,
        ca_name,
        "loopback",
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ExtendedKeyUsageOID.SERVER_AUTH,
        tmp,
    )
    return paths


class _RecordingTlsServer:
    """Accepts TLS connections with the given certificate and keeps every byte received."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.received = bytearray()
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(cert, key)
        self._ctx.load_verify_locations(ca)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            try:
                with self._ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(1.0)
                    while chunk := tls.recv(65536):  # never answers: the client times out
                        self.received.extend(chunk)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)


def _wrap_against(server: _RecordingTlsServer, pki: dict[str, Path]) -> BaseException:
    settings = Settings(
        kmip_host="127.0.0.1",
        kmip_port=server.port,
        kmip_ca_cert=str(pki["ca"]),
        kmip_client_cert=str(pki["client"]),
        kmip_client_key=str(pki["client_key"]),
    )

    def client():
        c = clients.kmip_client(settings)
        c.proxy.timeout = 2  # the recording server never answers a request
        return c

    provider = KmipKeyProvider(parse_key_ref(f"kmip://127.0.0.1:{server.port}/1"), client)
    with pytest.raises(ArchiveKmsError) as info:
        provider.wrap(SecretBytes(L2), context={"tenant": "acme"})
    return info.value


def test_a_certificate_for_another_host_is_refused_before_any_byte_is_sent(pki) -> None:
    server = _RecordingTlsServer(pki["evil"], pki["evil_key"], pki["ca"])
    try:
        error = _wrap_against(server, pki)
    finally:
        server.close()
    assert isinstance(error, ConfigurationError) and not error.retryable, repr(error)
    assert "certificate" in str(error) and "kmip_host" in str(error)
    assert bytes(server.received) == b""
    assert L2.hex() not in str(error)


def test_a_certificate_for_the_host_is_accepted(pki) -> None:
    """The control: the same listener with a certificate for 127.0.0.1 gets the request."""
    server = _RecordingTlsServer(pki["loopback"], pki["loopback_key"], pki["ca"])
    try:
        error = _wrap_against(server, pki)
    finally:
        server.close()
    assert not isinstance(error, ConfigurationError), repr(error)  # it timed out waiting for an answer
    assert len(server.received) > 0
