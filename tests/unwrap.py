"""Unwrapping for tests, from the root key down through the stored records (the production unwrap of one version;
for a decoder written from docs/ciphertext-format.md alone, see tests/offline_recovery.py)."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain.key_wrap import WrappingKey
from crypto_server.domain.keys import Key
from crypto_server.service.key_versions import with_every_version
from crypto_server.service.keyring import unwrap_version
from tests.conftest import ServerHandle


def unwrapped_material(server: ServerHandle, key: Key) -> list[bytes]:
    """Every version's raw bytes, unwrapped here from the root key down (not by the server's code path)."""
    store = server.running.store
    key = with_every_version(store, key)
    parents: dict[int, WrappingKey]
    if key.parent_key_id is None:
        if server.settings.root_key is not None:
            parents = {0: AESGCM(base64.b64decode(server.settings.root_key))}
        else:
            # A root key in an HSM unwraps only inside it: through the server's handle to it.
            parents = {0: server.running.keyring.root}
    else:
        parent = store.get_key(key.tenant_id, key.parent_key_id)
        assert parent is not None
        parents = {n + 1: AESGCM(m) for n, m in enumerate(unwrapped_material(server, parent))}
    return [unwrap_version(parents[v.parent_version], key, v) for v in key.versions]
