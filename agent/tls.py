"""Client certificates (mTLS), both ends: PEM files in, Twisted TLS options out,
and who a verified peer is.

The agent's `mtls:` doors (agent.doors.mtls) and agent-scheduler share this, so
a certificate the one side accepts is loaded the same way by the other. Every
problem with a file is a ValueError that names the file and what is wrong with
it: an operator reads it at start, not a pyOpenSSL traceback.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from OpenSSL import SSL, crypto
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator


def load_authorities(path: str) -> list[ssl.Certificate]:
    """Every certificate in a PEM file (one CA, or a bundle of several)."""
    data = _read(path, "CA certificates")
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise ValueError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return [ssl.Certificate.loadPEM(cert.public_bytes(Encoding.PEM)) for cert in found]


def load_identity(cert_path: str, key_path: str) -> ssl.PrivateCertificate:
    """This end's certificate and its private key (the same file may hold both)."""
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private key")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(f"{cert_path} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise ValueError(f"the private key in {key_path} is encrypted: the agent starts "
                         "unattended, so give it an unencrypted key (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{key_path} holds no PEM private key") from None
    if _public(key.public_key()) != _public(certificate.public_key()):
        raise ValueError(f"the private key in {key_path} does not belong to the certificate "
                         f"in {cert_path}")
    return ssl.PrivateCertificate.fromCertificateAndKeyPair(
        ssl.Certificate(crypto.X509.from_cryptography(certificate)),
        ssl.KeyPair(crypto.PKey.from_cryptography_key(key)))


def server_options(identity: ssl.PrivateCertificate,
                   authorities: list[ssl.Certificate]) -> ssl.CertificateOptions:
    """A server that completes a handshake only with a client whose certificate one
    of `authorities` signed: a trustRoot on the server side means VERIFY_PEER and
    VERIFY_FAIL_IF_NO_PEER_CERT, so a client without one is refused too."""
    return ssl.CertificateOptions(privateKey=identity.privateKey.original,
                                  certificate=identity.original,
                                  trustRoot=ssl.trustRootFromCertificates(authorities))


def client_options(hostname: str, identity: ssl.PrivateCertificate | None,
                   authorities: list[ssl.Certificate]) -> IOpenSSLClientConnectionCreator:
    """A client that shows `identity` and accepts only a server whose certificate one
    of `authorities` signed for `hostname` (a DNS name, or an IP address, which must
    then be in the certificate's subjectAltName as an IP address)."""
    return ssl.optionsForClientTLS(hostname, ssl.trustRootFromCertificates(authorities),
                                   clientCertificate=identity)


@dataclass(frozen=True)
class ClientTLS:
    """What a client trusts (CA certificates) and shows (its certificate, if any),
    loaded once; options_for(hostname) for each connection."""

    authorities: tuple[ssl.Certificate, ...]
    identity: ssl.PrivateCertificate | None = None

    @classmethod
    def from_files(cls, ca: str, cert: str | None = None, key: str | None = None) -> ClientTLS:
        """key defaults to cert: one file may hold both."""
        identity = load_identity(cert, key or cert) if cert else None
        return cls(tuple(load_authorities(ca)), identity)

    def options_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        return client_options(hostname, self.identity, list(self.authorities))


def tls_error_text(error: Exception) -> str:
    """An OpenSSL error as its reasons ("certificate verify failed"), not a list of tuples."""
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        reasons = [entry[-1] for entry in error.args[0] if isinstance(entry, tuple) and entry]
        if reasons:
            return "; ".join(str(r) for r in reasons)
    return str(error) or type(error).__name__


def peer_certificate_subject(transport) -> str | None:
    """The subject of the certificate the peer proved it holds, as an RFC 4514
    string ("CN=scheduler-1,O=ops"), or None: not TLS, no handshake yet, or no
    verified certificate (an `ssl:` door asks for none).

    Only the verified chain counts, never a certificate the peer merely sent.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, SSL.Connection):
        return None
    chain = handle.get_verified_chain()
    if not chain:
        return None
    return chain[0].to_cryptography().subject.rfc4514_string()


def _public(key) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
