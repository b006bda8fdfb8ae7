"""The backup private key (CRYPTO_BACKUP_PRIVATE_KEY_FILE): opens key backups exported for its public key.

Read once at start-up from a file private to its owner (like a root key file), and held in memory only.
docs/backup.md says why it lives on the target deployment rather than travelling with ImportKey.
"""

from __future__ import annotations

import logging

from crypto_server.config import ConfigError, Settings
from crypto_server.domain.errors import BackupKeyUnsupported
from crypto_server.domain.key_backup import BackupPrivateKey, backup_key_fingerprint, parse_backup_private_key
from crypto_server.root_key import read_private_file

log = logging.getLogger(__name__)


def load_backup_private_key(settings: Settings) -> BackupPrivateKey | None:
    """The configured backup private key, or None. Raises ConfigError naming the setting."""
    if settings.backup_private_key_file is None:
        return None
    source = f"CRYPTO_BACKUP_PRIVATE_KEY_FILE {settings.backup_private_key_file}"
    text = read_private_file(settings.backup_private_key_file, source, settings)
    try:
        key = parse_backup_private_key(text.encode())
    except BackupKeyUnsupported as error:
        raise ConfigError(f"{source}: {error.message}") from None
    fingerprint = backup_key_fingerprint(key.public_key()).hex()
    log.info("backup private key loaded", extra={"source": source, "fingerprint": fingerprint})
    return key
