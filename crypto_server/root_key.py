"""The root key-encryption key: wraps every tenant's master key, never stored in the key store.

Two providers (CRYPTO_ROOT_KEY_PROVIDER): `file`, 32 bytes from a file or variable held in memory as an AESGCM
object (FileRootKey), and `pkcs11`, a key object in an HSM that wraps and unwraps inside the token
(crypto_server/pkcs11_root_key.py). Both are a RootKey; nothing past this module knows which one it has.

A root key file must be private to its owner: one that other users can read is refused (ConfigError) unless
CRYPTO_ALLOW_INSECURE is set. Each loaded key is logged by its fingerprint only (`root_key_fingerprint`), so an
operator can tell which key a replica runs with, and compare it with what `crypto-rewrap-root` prints.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.config import ConfigError, Settings
from crypto_server.domain.key_wrap import KEY_BYTES, WrappingKey, root_key_fingerprint
from crypto_server.storage.private_files import PRIVATE_FILE_MODE, ensure_private_directory, restrict_to_owner

log = logging.getLogger(__name__)
GENERATED_FILE_NAME = "root.key"


@dataclass(frozen=True, slots=True)
class RootKeyStats:
    """What a root key has done since start-up, for metrics: wraps and unwraps, the failed ones (the key could not
    be used: not authentication failures), and the seconds they took in total."""

    operations: int = 0
    errors: int = 0
    seconds: float = 0.0
    available: bool = True


class RootKey(WrappingKey, Protocol):
    """The root of the key hierarchy: wraps master keys, the metadata key and the store's check value."""

    @property
    def fingerprint(self) -> str:
        """A name for the key that is safe to log and print (16 hex digits), the same in every process."""
        ...

    @property
    def source(self) -> str:
        """Where the key is (a variable, a file, a token and label), for log lines and messages."""
        ...

    def check(self) -> None:
        """Use the key once; raises RootKeyUnavailable when it cannot be used now (the health probe)."""
        ...

    def stats(self) -> RootKeyStats: ...

    def stop(self) -> None:
        """Let go of the key (sessions with the HSM); nothing to do for a key in memory."""
        ...


class FileRootKey:
    """A root key from a file or variable: AES-256-GCM in this process's memory."""

    def __init__(self, material: bytes, source: str) -> None:
        self._aead = AESGCM(material)
        self._fingerprint = root_key_fingerprint(material)
        self._source = source

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def source(self) -> str:
        return self._source

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes:
        return self._aead.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes:
        return self._aead.decrypt(nonce, data, associated_data)

    def check(self) -> None:
        return None

    def stats(self) -> RootKeyStats:
        return RootKeyStats()

    def stop(self) -> None:
        return None


def _decode(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source} must be base64 text") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{source} must decode to {KEY_BYTES} bytes, got {len(key)}")
    return key


def _open_to_others(status: os.stat_result) -> bool:
    """Whether users other than the file's owner may read or change it.

    The rule is PostgreSQL's for its private key files: a file owned by root may also be readable by its group,
    because Kubernetes Secret volumes mounted with an fsGroup are root-owned and group-readable (0440) whatever
    their defaultMode says.
    """
    mode = stat.S_IMODE(status.st_mode)
    if status.st_uid == 0:
        return bool(mode & 0o037)
    return bool(mode & 0o077)


def _read_key_file(path: Path, source: str, settings: Settings) -> bytes:
    return _decode(_read_private_file(path, source, settings), source)


def _read_private_file(path: Path, source: str, settings: Settings) -> str:
    try:
        with path.open() as key_file:
            status = os.fstat(key_file.fileno())
            text = key_file.read()
    except OSError as error:
        raise ConfigError(f"{source} cannot be read: {error.strerror}") from None
    if _open_to_others(status):
        mode = oct(stat.S_IMODE(status.st_mode))
        if not settings.allow_insecure:
            raise ConfigError(
                f"{source} is open to other users (mode {mode}): make it readable by its owner only "
                "(chmod 600), or set CRYPTO_ALLOW_INSECURE=1 to accept it knowingly"
            )
        log.warning(
            "accepting a root key file open to other users because CRYPTO_ALLOW_INSECURE is set",
            extra={"path": str(path), "mode": mode},
        )
    return text


def read_private_file(path: Path, source: str, settings: Settings) -> str:
    """A secret file's text (a root key, a PIN, the backup private key), refused (ConfigError) when other users
    may read or change it, unless CRYPTO_ALLOW_INSECURE is set."""
    return _read_private_file(path, source, settings)


def _loaded(key: RootKey) -> RootKey:
    log.info("root key loaded", extra={"source": key.source, "fingerprint": key.fingerprint})
    return key


def _file_key(material: bytes, source: str) -> RootKey:
    return _loaded(FileRootKey(material, source))


def read_pin(settings: Settings) -> str:
    """The token's user PIN from CRYPTO_PKCS11_PIN_FILE, private to its owner like a root key file."""
    assert settings.pkcs11_pin_file is not None, "the settings require a PIN file with a PKCS#11 key"
    source = f"CRYPTO_PKCS11_PIN_FILE {settings.pkcs11_pin_file}"
    text = _read_private_file(settings.pkcs11_pin_file, source, settings).strip()
    if not text:
        raise ConfigError(f"{source} is empty")
    return text


def _pkcs11_key(settings: Settings, label: str, setting: str) -> RootKey:
    # Imported here: python-pkcs11 is an optional dependency (the [hsm] extra), needed only with a token.
    from crypto_server.pkcs11_root_key import open_pkcs11_root_key

    return _loaded(open_pkcs11_root_key(settings, label, setting, read_pin(settings)))


def load_root_key(settings: Settings) -> RootKey:
    """From the token with CRYPTO_ROOT_KEY_PROVIDER=pkcs11; else from CRYPTO_ROOT_KEY, else CRYPTO_ROOT_KEY_FILE,
    else, for a development server only (loopback, no TLS, no policy), a key generated once into the data
    directory (mode 0600), with a warning; otherwise ConfigError (exit 2)."""
    if settings.root_key_provider == "pkcs11":
        assert settings.pkcs11_key_label is not None, "the settings require a key label with the pkcs11 provider"
        return _pkcs11_key(settings, settings.pkcs11_key_label, "CRYPTO_PKCS11_KEY_LABEL")
    if settings.root_key:
        # The variable stays in /proc/<pid>/environ for the life of the process, readable by the same user.
        log.warning(
            "the root key comes from the CRYPTO_ROOT_KEY variable, which the process environment keeps; "
            "use CRYPTO_ROOT_KEY_FILE in production"
        )
        return _file_key(_decode(settings.root_key, "CRYPTO_ROOT_KEY"), "CRYPTO_ROOT_KEY")
    if settings.root_key_file:
        source = f"CRYPTO_ROOT_KEY_FILE {settings.root_key_file}"
        return _file_key(_read_key_file(settings.root_key_file, source, settings), "CRYPTO_ROOT_KEY_FILE")
    path = settings.data_dir / GENERATED_FILE_NAME
    if not (settings.loopback_only and not settings.tls and settings.policy_file is None):
        # A key generated beside the database protects nothing from whoever can read the database's disk, and a
        # server reachable from elsewhere, or with identities and a policy, is not a development server.
        raise ConfigError(
            "no root key is set: set CRYPTO_ROOT_KEY_FILE (or CRYPTO_ROOT_KEY_PROVIDER=pkcs11); a development root "
            "key is generated only for a server on loopback without TLS or a policy"
            + (f" (to keep the one generated earlier, set CRYPTO_ROOT_KEY_FILE={path})" if path.exists() else "")
        )
    try:
        ensure_private_directory(settings.data_dir)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        restrict_to_owner(path)
    except OSError as error:
        raise ConfigError(f"cannot create the development root key {path}: {error.strerror}") from None
    else:
        with os.fdopen(fd, "w") as out:
            os.fchmod(fd, PRIVATE_FILE_MODE)  # whatever the umask
            out.write(base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n")
    log.warning(
        "using a development root key generated into the data directory; set CRYPTO_ROOT_KEY_FILE in production",
        extra={"path": str(path)},
    )
    return _file_key(_decode(path.read_text(), f"root key file {path}"), "generated")


def load_other_root_key(settings: Settings) -> RootKey | None:
    """A second root key that unwraps (never wraps), for root key rotation and for moving the root key into an
    HSM or out of it: CRYPTO_OTHER_ROOT_KEY_FILE, or CRYPTO_PKCS11_OTHER_KEY_LABEL (a key in the token)."""
    if settings.pkcs11_other_key_label is not None:
        return _pkcs11_key(settings, settings.pkcs11_other_key_label, "CRYPTO_PKCS11_OTHER_KEY_LABEL")
    if settings.other_root_key_file is None:
        return None
    source = f"CRYPTO_OTHER_ROOT_KEY_FILE {settings.other_root_key_file}"
    return _file_key(_read_key_file(settings.other_root_key_file, source, settings), "CRYPTO_OTHER_ROOT_KEY_FILE")
