"""Throwaway certificates for the mTLS tests, made at test time with `cryptography`.

make_tls_files(directory) writes, each as PEM:
- ca.pem: the CA the agent trusts (caCerts=); server.pem/server.key: the agent's
  certificate, for localhost, 127.0.0.1 and ::1; client.pem/client.key: a client
  certificate that CA signed (CN=scheduler-1);
- other-ca.pem, stranger.pem/stranger.key: a client certificate another CA signed.
P-256 keys: generating them takes milliseconds.
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_CN = "scheduler-1"


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    stranger_cert: Path
    stranger_key: Path

    def mtls(self, port: int | str = 0, **extra: str) -> str:
        """The `mtls:` endpoint string for a door with these files."""
        words = [f"mtls:{port}", f"privateKey={self.server_key}", f"certKey={self.server_cert}",
                 f"caCerts={self.ca}", *(f"{k}={v}" for k, v in extra.items())]
        return ":".join(words)


def make_tls_files(directory: Path) -> TLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _authority("agent test CA")
    other_key, other = _authority("some other CA")
    server_key, server = _leaf(ca_key, ca, "agent", server=True)
    client_key, client = _leaf(ca_key, ca, CLIENT_CN, server=False)
    stranger_key, stranger = _leaf(other_key, other, CLIENT_CN, server=False)
    write = _Writer(directory)
    return TLSFiles(
        ca=write.cert("ca.pem", ca), server_cert=write.cert("server.pem", server),
        server_key=write.key("server.key", server_key),
        client_cert=write.cert("client.pem", client), client_key=write.key("client.key", client_key),
        other_ca=write.cert("other-ca.pem", other),
        stranger_cert=write.cert("stranger.pem", stranger),
        stranger_key=write.key("stranger.key", stranger_key))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def _authority(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, _name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca: x509.Certificate, common_name: str, *, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(common_name, ca.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


class _Writer:
    def __init__(self, directory: Path):
        self._directory = directory

    def cert(self, name: str, cert: x509.Certificate) -> Path:
        path = self._directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def key(self, name: str, key) -> Path:
        path = self._directory / name
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return path
