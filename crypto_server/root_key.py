"""The root key-encryption key: wraps every tenant's master key, never stored in the key store.

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
from pathlib import Path

from crypto_server.config import ConfigError, Settings
from crypto_server.domain.key_wrap import KEY_BYTES, root_key_fingerprint
from crypto_server.storage.private_files import PRIVATE_FILE_MODE, ensure_private_directory, restrict_to_owner

log = logging.getLogger(__name__)
GENERATED_FILE_NAME = "root.key"


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
    return _decode(text, source)


def _loaded(key: bytes, source: str) -> bytes:
    log.info("root key loaded", extra={"source": source, "fingerprint": root_key_fingerprint(key)})
    return key


def load_root_key(settings: Settings) -> bytes:
    """From CRYPTO_ROOT_KEY, else CRYPTO_ROOT_KEY_FILE, else a development key
    generated once into the data directory (mode 0600), with a warning."""
    if settings.root_key:
        # The variable stays in /proc/<pid>/environ for the life of the process, readable by the same user.
        log.warning(
            "the root key comes from the CRYPTO_ROOT_KEY variable, which the process environment keeps; "
            "use CRYPTO_ROOT_KEY_FILE in production"
        )
        return _loaded(_decode(settings.root_key, "CRYPTO_ROOT_KEY"), "CRYPTO_ROOT_KEY")
    if settings.root_key_file:
        source = f"CRYPTO_ROOT_KEY_FILE {settings.root_key_file}"
        return _loaded(_read_key_file(settings.root_key_file, source, settings), "CRYPTO_ROOT_KEY_FILE")
    path = settings.data_dir / GENERATED_FILE_NAME
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
    return _loaded(_decode(path.read_text(), f"root key file {path}"), "generated")


def load_other_root_key(settings: Settings) -> bytes | None:
    """CRYPTO_OTHER_ROOT_KEY_FILE: a second root key that unwraps (never wraps), for root key rotation."""
    if settings.other_root_key_file is None:
        return None
    source = f"CRYPTO_OTHER_ROOT_KEY_FILE {settings.other_root_key_file}"
    return _loaded(_read_key_file(settings.other_root_key_file, source, settings), "CRYPTO_OTHER_ROOT_KEY_FILE")
