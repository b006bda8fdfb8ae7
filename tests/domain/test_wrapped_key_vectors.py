"""Wrapped-key known answers built from docs/ciphertext-format.md, checked against the production key wrapping.

The vectors (tests/vectors/wrapped_key_v1.json) come from tests/offline_recovery.py, which follows the page and
imports nothing from crypto_server. If the page and the code disagree, these tests fail.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain.algorithms import MAC, VERIFIER, Algorithm
from crypto_server.domain.key_managers import ALGORITHMS
from crypto_server.domain.key_wrap import (
    UnwrapFailed,
    WrappingContext,
    make_root_key_check,
    root_key_matches,
    unwrap_key,
    wrap_key,
)
from tests import offline_recovery as page
from tests.vectors.generate_wrapped_key_v1 import vectors as page_vectors

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent.parent / "vectors" / "wrapped_key_v1.json").read_text())
ROOT_KEY = bytes.fromhex(VECTORS["root_key"])
MASTER = VECTORS["master_key"]
# Every vector with the key that wraps it: the root key for the master key, the master key's material for the rest.
CASES = [(MASTER, ROOT_KEY)] + [(entry, bytes.fromhex(MASTER["material"])) for entry in VECTORS["wrapped_under_master"]]
CASE_IDS = [entry["name"] for entry, _ in CASES]


def _binding(entry: dict[str, Any]) -> page.Binding:
    return page.Binding(
        tenant_id=entry["tenant_id"],
        key_id=entry["key_id"],
        key_type=entry["key_type"],
        algorithm=entry["algorithm"],
        version=entry["version"],
        parent_version=entry["parent_version"],
    )


def _context(binding: page.Binding) -> WrappingContext:
    return WrappingContext(
        tenant_id=binding.tenant_id,
        key_id=binding.key_id,
        key_type=binding.key_type,
        version=binding.version,
        parent_version=binding.parent_version,
        algorithm=binding.algorithm,
    )


def _production_unwrap(parent_key: bytes, wrapped: bytes, binding: page.Binding) -> bytes:
    return unwrap_key(AESGCM(parent_key), wrapped, _context(binding))


def test_the_vector_file_is_what_the_page_based_generator_writes() -> None:
    assert page_vectors() == VECTORS


def test_master_key_is_wrapped_under_the_root_key_and_the_rest_under_its_version() -> None:
    assert MASTER["key_type"] == "MASTER"
    assert MASTER["parent_version"] == 0
    for entry in VECTORS["wrapped_under_master"]:
        assert entry["tenant_id"] == MASTER["tenant_id"]
        assert entry["parent_version"] == MASTER["version"]


@pytest.mark.parametrize(("entry", "parent_key"), CASES, ids=CASE_IDS)
def test_page_based_decoder_unwraps_the_vector(entry: dict[str, Any], parent_key: bytes) -> None:
    binding = _binding(entry)
    wrapped = bytes.fromhex(entry["wrapped"])
    assert len(wrapped) == 60
    assert wrapped[:12] == bytes.fromhex(entry["nonce"])
    assert binding.associated_data() == bytes.fromhex(entry["associated_data"])
    assert page.unwrap(parent_key, wrapped, binding) == bytes.fromhex(entry["material"])


@pytest.mark.parametrize(("entry", "parent_key"), CASES, ids=CASE_IDS)
def test_production_unwrap_key_opens_the_vector_to_the_same_material(entry: dict[str, Any], parent_key: bytes) -> None:
    wrapped = bytes.fromhex(entry["wrapped"])
    assert _production_unwrap(parent_key, wrapped, _binding(entry)) == bytes.fromhex(entry["material"])


@pytest.mark.parametrize(("entry", "parent_key"), CASES, ids=CASE_IDS)
def test_production_wrap_key_output_opens_with_the_page_based_decoder(entry: dict[str, Any], parent_key: bytes) -> None:
    binding = _binding(entry)
    material = os.urandom(32)
    wrapped = wrap_key(AESGCM(parent_key), material, _context(binding))
    assert page.unwrap(parent_key, wrapped, binding) == material


# One other value per binding field; where a vector already has it, the fallback in the test is used.
ONE_FIELD_CHANGED = {
    "tenant_id": "acme.corq",
    "key_id": "00000000-0000-4000-8000-000000000000",
    "key_type": "DATA",
    "algorithm": "HMAC_SHA256",
    "version": 4,
    "parent_version": 1,
}
FALLBACK = {"key_type": "MASTER", "algorithm": "AES_256_GCM"}


@pytest.mark.parametrize(("entry", "parent_key"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("field", ONE_FIELD_CHANGED)
def test_changing_one_binding_field_fails_both_decoders(entry: dict[str, Any], parent_key: bytes, field: str) -> None:
    binding = _binding(entry)
    value = ONE_FIELD_CHANGED[field]
    if value == getattr(binding, field):
        value = FALLBACK[field]
    moved = replace(binding, **{field: value})
    wrapped = bytes.fromhex(entry["wrapped"])
    with pytest.raises(InvalidTag):
        page.unwrap(parent_key, wrapped, moved)
    with pytest.raises(UnwrapFailed):
        _production_unwrap(parent_key, wrapped, moved)


@pytest.mark.parametrize(("entry", "parent_key"), CASES, ids=CASE_IDS)
def test_another_parent_key_fails_both_decoders(entry: dict[str, Any], parent_key: bytes) -> None:
    other_parent = bytes(b ^ 1 for b in parent_key)
    wrapped = bytes.fromhex(entry["wrapped"])
    with pytest.raises(InvalidTag):
        page.unwrap(other_parent, wrapped, _binding(entry))
    with pytest.raises(UnwrapFailed):
        _production_unwrap(other_parent, wrapped, _binding(entry))


def test_root_key_check_vector_opens_under_its_root_key_only() -> None:
    check = bytes.fromhex(VECTORS["root_key_check"])
    assert len(check) == 28
    assert page.root_key_check_opens(ROOT_KEY, check)
    assert root_key_matches(AESGCM(ROOT_KEY), check)
    other_root = bytes(32)
    assert not page.root_key_check_opens(other_root, check)
    assert not root_key_matches(AESGCM(other_root), check)


def test_production_root_key_check_opens_with_the_page_based_check() -> None:
    check = make_root_key_check(AESGCM(ROOT_KEY))
    assert page.root_key_check_opens(ROOT_KEY, check)
    assert not page.root_key_check_opens(bytes(32), check)


@pytest.mark.parametrize(
    "entry", [e for e in VECTORS["wrapped_under_master"] if "public_key_pem" in e], ids=lambda e: e["name"]
)
def test_signing_key_material_is_read_as_the_page_says(entry: dict[str, Any]) -> None:
    manager = ALGORITHMS.find(Algorithm(entry["algorithm"]))
    assert manager is not None
    verifier = manager.primitive(VERIFIER, bytes.fromhex(entry["material"]))
    assert verifier.public_key_pem() == entry["public_key_pem"]


@pytest.mark.parametrize("entry", [e for e in VECTORS["wrapped_under_master"] if "mac" in e], ids=lambda e: e["name"])
def test_hmac_key_material_is_read_as_the_page_says(entry: dict[str, Any]) -> None:
    material = bytes.fromhex(entry["material"])
    manager = ALGORITHMS.find(Algorithm(entry["algorithm"]))
    assert manager is not None
    assert manager.primitive(MAC, material).compute(bytes.fromhex(entry["mac_message"])) == bytes.fromhex(entry["mac"])
