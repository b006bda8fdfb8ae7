"""Key wrapping binds wrapped material to the exact key version it belongs to."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain.key_wrap import (
    WRAPPED_KEY_BYTES,
    UnwrapFailed,
    WrappingContext,
    make_root_key_check,
    root_key_fingerprint,
    root_key_matches,
    unwrap_key,
    wrap_key,
)

BINDING = WrappingContext(
    tenant_id="t1",
    key_id="k1",
    key_type="DATA",
    version=2,
    parent_version=1,
    algorithm="AES_256_GCM",
)


def test_wrap_then_unwrap_returns_the_material() -> None:
    parent = AESGCM(os.urandom(32))
    material = os.urandom(32)
    wrapped = wrap_key(parent, material, BINDING)
    assert len(wrapped) == WRAPPED_KEY_BYTES
    assert material not in wrapped
    assert unwrap_key(parent, wrapped, BINDING) == material


@pytest.mark.parametrize(
    "change",
    [
        {"tenant_id": "t2"},
        {"key_id": "k2"},
        {"key_type": "SESSION"},
        {"version": 3},
        {"parent_version": 2},
        {"algorithm": "HMAC_SHA256"},
    ],
)
def test_wrapped_material_moved_to_another_binding_does_not_unwrap(change: dict[str, object]) -> None:
    parent = AESGCM(os.urandom(32))
    wrapped = wrap_key(parent, os.urandom(32), BINDING)
    with pytest.raises(UnwrapFailed):
        unwrap_key(parent, wrapped, replace(BINDING, **change))


def test_another_parent_cannot_unwrap() -> None:
    wrapped = wrap_key(AESGCM(os.urandom(32)), os.urandom(32), BINDING)
    with pytest.raises(UnwrapFailed):
        unwrap_key(AESGCM(os.urandom(32)), wrapped, BINDING)


def test_root_key_check_recognises_only_its_own_root_key() -> None:
    root = AESGCM(os.urandom(32))
    check = make_root_key_check(root)
    assert root_key_matches(root, check)
    assert not root_key_matches(AESGCM(os.urandom(32)), check)
    assert not root_key_matches(root, check[:5])


def test_root_key_fingerprint_is_the_documented_hmac_and_tells_keys_apart() -> None:
    # HMAC-SHA256(bytes 0..31, "caas.crypto.v1/root-key-fingerprint"), first 8 bytes.
    assert root_key_fingerprint(bytes(range(32))) == "aef1c464a585f920"
    assert root_key_fingerprint(os.urandom(32)) != root_key_fingerprint(bytes(range(32)))
