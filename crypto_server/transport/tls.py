"""TLS for the gRPC port, with certificates re-read without a restart.

grpc asks `ServerCertificates.fetch` before every new connection's handshake; it answers None while the
files are unchanged (grpc keeps the configuration it has) and a new configuration once they change, so
operators can rotate short-lived certificates by replacing the files. A new version that is not a
certificate chain with its matching private key (a half-written file, a mismatched pair) is refused with
an error log, and the previous one stays in use. Connections already open keep their handshake.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


class CertificateError(ValueError):
    """The certificate files do not make a usable server identity."""


@dataclass(frozen=True, slots=True)
class _Files:
    chain: bytes
    key: bytes
    client_ca: bytes | None


def _check(files: _Files) -> None:
    try:
        chain = x509.load_pem_x509_certificates(files.chain)
    except ValueError as error:
        raise CertificateError(f"the certificate file holds no PEM certificate: {error}") from None
    try:
        key = serialization.load_pem_private_key(files.key, password=None)
    except (ValueError, TypeError) as error:
        raise CertificateError(f"the key file holds no unencrypted PEM private key: {error}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if chain[0].public_key().public_bytes(encoding, public) != key.public_key().public_bytes(encoding, public):
        raise CertificateError("the private key does not belong to the certificate (the first in the chain)")
    if files.client_ca is not None:
        try:
            x509.load_pem_x509_certificates(files.client_ca)
        except ValueError as error:
            raise CertificateError(f"the client CA file holds no PEM certificate: {error}") from None


class ServerCertificates:
    """The server's certificate chain and key, and the CA its clients' certificates must chain to (mTLS)."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self._paths = (cert_file, key_file, client_ca_file)
        self._lock = threading.Lock()
        try:
            self._files = self._read()
        except OSError as error:
            raise CertificateError(f"cannot read the TLS files: {error}") from None
        _check(self._files)
        self._rejected: _Files | None = None

    @property
    def mutual(self) -> bool:
        return self._paths[2] is not None

    def _read(self) -> _Files:
        cert_file, key_file, ca_file = self._paths
        return _Files(cert_file.read_bytes(), key_file.read_bytes(), ca_file.read_bytes() if ca_file else None)

    def _configuration(self, files: _Files) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(files.key, files.chain)], root_certificates=files.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that re-read the files before each new connection."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._files),
            self.fetch,  # type: ignore[arg-type]  # grpc takes None for "unchanged"; the stubs do not say so
            require_client_authentication=self.mutual,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed (and make a valid identity); None otherwise."""
        with self._lock:
            try:
                files = self._read()
            except OSError as error:
                log.error("cannot re-read the TLS files, keeping the certificate in use", extra={"error": str(error)})
                return None
            if files == self._files or files == self._rejected:
                return None
            try:
                _check(files)
            except CertificateError as error:
                self._rejected = files
                log.error("new TLS files refused, keeping the certificate in use", extra={"error": str(error)})
                return None
            self._files, self._rejected = files, None
            log.info("TLS certificate reloaded")
            return self._configuration(files)
