"""More of the storage contract, on every store (SQLite, MongoDB, MongoDB behind the Redis cache): store behaviour
that gRPC tests used to show by running on every backend, and now show on one store (see each test's note).

The stores are wired by tests/storage/test_contract.py's `stores` fixture.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.keys import KeyType
from crypto_server.storage.port import KeyQuery
from tests.storage import test_contract as contract
from tests.storage.test_contract import NOW, Stores

stores = contract.stores

# The longest tenant id the service accepts, of every character it allows (tests/transport/test_bad_input.py).
LONGEST_TENANT = "T" + "a1_.-" * 12 + "xyz"


def test_a_key_of_each_algorithm_reads_back_with_its_algorithm(stores: Stores) -> None:
    # MACs and signatures (tests/transport/test_macs_and_signatures.py) run on one store: this is their store part.
    algorithms = [Algorithm.AES_256_GCM, Algorithm.HMAC_SHA256, Algorithm.ED25519, Algorithm.ECDSA_P256_SHA256]
    keys = [replace(contract._key(), algorithm=algorithm) for algorithm in algorithms]
    for key in keys:
        stores.serving.insert_key(key)
    for key in keys:
        for _ in range(2):  # the second read comes from the cache, if any
            got = stores.serving.get_key("t1", key.key_id)
            assert got == key
            assert got is not None and got.algorithm is key.algorithm
    listed = stores.serving.list_keys(KeyQuery("t1", limit=10, now=NOW))
    assert {key.key_id: key.algorithm for key in listed} == {key.key_id: key.algorithm for key in keys}


def test_the_longest_tenant_id_of_every_allowed_character_reads_back_and_lists(stores: Stores) -> None:
    # tests/transport/test_bad_input.py accepts this tenant id over gRPC on one store: this is the store part.
    assert len(LONGEST_TENANT) == 64
    master = contract._key(LONGEST_TENANT, KeyType.MASTER)
    data = contract._key(LONGEST_TENANT)
    for key in (master, data):
        stores.serving.insert_key(key)
    assert stores.serving.get_key(LONGEST_TENANT, data.key_id) == data
    assert stores.serving.get_master_key(LONGEST_TENANT) == master
    listed = stores.serving.list_keys(KeyQuery(LONGEST_TENANT, limit=10, now=NOW))
    assert sorted(key.key_id for key in listed) == sorted([master.key_id, data.key_id])
    assert stores.serving.get_key(LONGEST_TENANT[:-1], data.key_id) is None, "a prefix is another tenant"


def test_another_tenants_key_gets_no_version(stores: Stores) -> None:
    # Tenant isolation (tests/transport/test_tenant_isolation.py) runs on one store: the service reads the key by
    # (tenant, key id) first, and a writer naming the wrong tenant changes nothing either.
    key = contract._key()
    stores.serving.insert_key(key)
    assert stores.serving.get_key("t1", key.key_id) is not None  # now in the cache, if any
    foreign = replace(key, tenant_id="t2").with_new_primary(contract._version(2))
    assert not stores.serving.add_version(foreign, key.revision)
    assert stores.serving.get_key("t2", key.key_id) is None
    assert stores.serving.get_key("t1", key.key_id) == key
    assert stores.store.get_key("t1", key.key_id) == key
    assert stores.serving.get_key("t1", str(uuid.uuid4())) is None
