"""The root key-encryption key: wraps every tenant's master key, never stored in the key store."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat

from crypto_server.config import ConfigError, Settings
from crypto_server.domain.key_wrap import KEY_BYTES

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


def load_root_key(settings: Settings) -> bytes:
    """From CRYPTO_ROOT_KEY, else CRYPTO_ROOT_KEY_FILE, else a development key
    generated once into the data directory (mode 0600), with a warning."""
    if settings.root_key:
        return _decode(settings.root_key, "CRYPTO_ROOT_KEY")
    if settings.root_key_file:
        try:
            text = settings.root_key_file.read_text()
        except OSError as error:
            raise ConfigError(
                f"CRYPTO_ROOT_KEY_FILE {settings.root_key_file} cannot be read: {error.strerror}"
            ) from None
        return _decode(text, f"CRYPTO_ROOT_KEY_FILE {settings.root_key_file}")
    path = settings.data_dir / GENERATED_FILE_NAME
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("root key file is readable by other users", extra={"path": str(path), "mode": oct(mode)})
    else:
        with os.fdopen(fd, "w") as out:
            out.write(base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n")
    log.warning(
        "using a development root key generated into the data directory; set CRYPTO_ROOT_KEY_FILE in production",
        extra={"path": str(path)},
    )
    return _decode(path.read_text(), f"root key file {path}")


def load_other_root_key(settings: Settings) -> bytes | None:
    """CRYPTO_OTHER_ROOT_KEY_FILE: a second root key that unwraps (never wraps), for root key rotation."""
    if settings.other_root_key_file is None:
        return None
    source = f"CRYPTO_OTHER_ROOT_KEY_FILE {settings.other_root_key_file}"
    try:
        text = settings.other_root_key_file.read_text()
    except OSError as error:
        raise ConfigError(f"{source} cannot be read: {error.strerror}") from None
    return _decode(text, source)
