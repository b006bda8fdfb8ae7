"""ListKeyVersions: every version of a key, oldest first, a page at a time; and Key.version_count.

One store: what each store answers for a range of versions is proven on every store by
tests/storage/test_contract_versions.py; this file checks the RPC (page tokens and sizes, effective states,
errors). Who may call it (exactly the keys GetKey shows a label-narrowed principal) is in the access matrices
(tests/transport/identity_support.py RPC_CALLS, run by test_mtls_access.py and test_jwt_access.py).
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle, expect_error

V = resources_pb2
TENANT = "acme"
MISSING_KEY = "00000000-0000-4000-8000-000000000000"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
INVALID_FIELD = "ERROR_REASON_INVALID_FIELD"


@pytest.fixture
def backend() -> str:
    return "embedded"


def _key_with_versions(server: ServerHandle, count: int, tenant: str = TENANT) -> str:
    key_id = server.create_key(tenant).key_id
    for _ in range(count - 1):
        server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=tenant, key_id=key_id))
    return key_id


def _page(server: ServerHandle, key_id: str, **fields: object) -> key_pb.ListKeyVersionsResponse:
    request = key_pb.ListKeyVersionsRequest(tenant_id=fields.pop("tenant_id", TENANT), key_id=key_id, **fields)
    return server.keys.ListKeyVersions(request)


def _all_versions(server: ServerHandle, key_id: str, page_size: int) -> tuple[list[resources_pb2.KeyVersion], int]:
    versions: list[resources_pb2.KeyVersion] = []
    token = ""
    pages = 0
    while True:
        page = _page(server, key_id, page_size=page_size, page_token=token)
        pages += 1
        assert len(page.versions) <= page_size
        versions += page.versions
        token = page.next_page_token
        if not token:
            return versions, pages


def _token(body: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def test_pages_of_ten_return_all_25_versions_once_in_order(server: ServerHandle) -> None:
    key_id = _key_with_versions(server, 25)
    versions, pages = _all_versions(server, key_id, page_size=10)
    assert [v.version for v in versions] == list(range(1, 26))
    assert pages == 3
    assert {v.state for v in versions} == {V.KEY_VERSION_STATE_ENABLED}
    assert all(v.HasField("created_at") and v.HasField("expires_at") for v in versions)


def test_get_key_says_how_many_versions_the_key_has(server: ServerHandle) -> None:
    created = server.create_key(TENANT)
    assert created.version_count == 1
    rotated = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=created.key_id)).key
    assert rotated.version_count == 2
    key_id = _key_with_versions(server, 12)
    got = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key_id)).key
    assert got.version_count == got.primary_version == 12
    listed = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=TENANT, key_type=V.KEY_TYPE_DATA)).keys
    assert sorted(key.version_count for key in listed) == [2, 12]


def test_page_size_zero_means_50_and_the_last_page_has_no_token(server: ServerHandle) -> None:
    key_id = _key_with_versions(server, 51)
    first = _page(server, key_id)
    assert [v.version for v in first.versions] == list(range(1, 51))
    assert first.next_page_token
    last = _page(server, key_id, page_token=first.next_page_token)
    assert [v.version for v in last.versions] == [51]
    assert last.next_page_token == ""
    exact = _page(server, key_id, page_size=51)
    assert len(exact.versions) == 51 and exact.next_page_token == ""


def test_versions_show_their_effective_states(server: ServerHandle) -> None:
    key_id = _key_with_versions(server, 6)
    server.keys.DisableKeyVersion(key_pb.DisableKeyVersionRequest(tenant_id=TENANT, key_id=key_id, version=3))
    server.keys.ScheduleKeyVersionDestruction(
        key_pb.ScheduleKeyVersionDestructionRequest(
            tenant_id=TENANT, key_id=key_id, version=4, waiting_period=Duration(seconds=86400)
        )
    )
    server.keys.ScheduleKeyVersionDestruction(
        key_pb.ScheduleKeyVersionDestructionRequest(
            tenant_id=TENANT, key_id=key_id, version=5, waiting_period=Duration(seconds=2 * 86400)
        )
    )
    server.clock.advance(timedelta(days=1, seconds=1))
    assert server.running.destroyer is not None
    server.running.destroyer.run_once()  # destroys version 4; version 5 is due tomorrow
    # min_decryption_version 2: version 1 refuses to decrypt, so it shows DISABLED.
    server.keys.UpdateKey(
        key_pb.UpdateKeyRequest(
            tenant_id=TENANT,
            key_id=key_id,
            update_mask=FieldMask(paths=["min_decryption_version"]),
            min_decryption_version=2,
        )
    )

    versions, _ = _all_versions(server, key_id, page_size=2)
    assert [v.state for v in versions] == [
        V.KEY_VERSION_STATE_DISABLED,
        V.KEY_VERSION_STATE_ENABLED,
        V.KEY_VERSION_STATE_DISABLED,
        V.KEY_VERSION_STATE_DESTROYED,
        V.KEY_VERSION_STATE_DESTROY_SCHEDULED,
        V.KEY_VERSION_STATE_ENABLED,
    ]
    assert versions[3].HasField("destroyed_at") and versions[4].HasField("destroy_at")
    assert not versions[4].HasField("destroyed_at")


def test_encryptions_are_counted_per_version(server: ServerHandle) -> None:
    key_id = server.create_key(TENANT).key_id
    server.encrypt(TENANT, key_id, b"one")
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key_id))
    first, second = _page(server, key_id).versions
    # Stored as reserved by the usage budget (a block at a time, docs/api.md): at least the one made.
    assert first.encryptions >= 1 and second.encryptions == 0


def test_a_page_token_is_bound_to_its_key_and_tenant(server: ServerHandle) -> None:
    key_id = _key_with_versions(server, 3)
    other = _key_with_versions(server, 3)
    token = _page(server, key_id, page_size=1).next_page_token
    assert token
    assert [v.version for v in _page(server, key_id, page_size=1, page_token=token).versions] == [2]
    list_keys_token = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=TENANT, page_size=1)).next_page_token
    assert list_keys_token
    for request in (
        key_pb.ListKeyVersionsRequest(tenant_id=TENANT, key_id=other, page_token=token),
        key_pb.ListKeyVersionsRequest(tenant_id="globex", key_id=key_id, page_token=token),
        key_pb.ListKeyVersionsRequest(tenant_id=TENANT, key_id=key_id, page_token=list_keys_token),
    ):
        expect_error(
            lambda request=request: server.keys.ListKeyVersions(request),  # type: ignore[misc]
            INVALID,
            INVALID_FIELD,
            "page_token",
        )


@pytest.mark.parametrize("page_size", [-1, 1001, 2**31 - 1])
def test_page_size_out_of_range_is_rejected(server: ServerHandle, page_size: int) -> None:
    key_id = _key_with_versions(server, 1)
    expect_error(lambda: _page(server, key_id, page_size=page_size), INVALID, INVALID_FIELD, "page_size")


@pytest.mark.parametrize(
    "after",
    [-1, 2**32, 2**70, True, 1.5, "1", None],
    ids=["negative", "beyond-uint32", "beyond-int64", "bool", "float", "text", "null"],
)
def test_a_forged_token_with_an_impossible_position_is_rejected(server: ServerHandle, after: object) -> None:
    """The token is the caller's to alter: a position no store could take is refused, never INTERNAL."""
    key_id = _key_with_versions(server, 1)
    token = _token({"v": 1, "scope": ["versions", TENANT, key_id], "after": after})
    expect_error(lambda: _page(server, key_id, page_token=token), INVALID, INVALID_FIELD, "page_token")


def test_a_forged_token_for_its_own_key_pages_from_where_it_says(server: ServerHandle) -> None:
    key_id = _key_with_versions(server, 4)
    token = _token({"v": 1, "scope": ["versions", TENANT, key_id], "after": 2})
    assert [v.version for v in _page(server, key_id, page_token=token).versions] == [3, 4]
    beyond = _token({"v": 1, "scope": ["versions", TENANT, key_id], "after": 2**32 - 1})
    assert list(_page(server, key_id, page_token=beyond).versions) == []


@pytest.mark.parametrize("token", ["garbage", "!!!", "e30", "eyJ2IjoyfQ", "x" * 5000])
def test_garbage_page_token_is_rejected(server: ServerHandle, token: str) -> None:
    key_id = _key_with_versions(server, 1)
    expect_error(lambda: _page(server, key_id, page_token=token), INVALID, INVALID_FIELD, "page_token")


def test_an_unknown_key_and_another_tenants_key_are_not_found(server: ServerHandle) -> None:
    key_id = _key_with_versions(server, 2)
    for tenant, missing in ((TENANT, MISSING_KEY), ("globex", key_id)):
        expect_error(
            lambda tenant=tenant, missing=missing: _page(server, missing, tenant_id=tenant),  # type: ignore[misc]
            grpc.StatusCode.NOT_FOUND,
            "ERROR_REASON_KEY_NOT_FOUND",
        )


@pytest.mark.parametrize(
    ("tenant", "key_id", "field"), [("", MISSING_KEY, "tenant_id"), (TENANT, "not-a-uuid", "key_id")]
)
def test_malformed_ids_are_invalid_arguments(server: ServerHandle, tenant: str, key_id: str, field: str) -> None:
    expect_error(lambda: _page(server, key_id, tenant_id=tenant), INVALID, INVALID_FIELD, field)
