"""ListKeys: stable oldest-first paging with filters on type and effective state."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle, expect_error


@pytest.fixture
def backend() -> str:
    """One store: what each store answers (paging with ties, the type and state filters) is proven on every
    store by tests/storage/test_contract.py; this file checks the RPC (page tokens, page sizes, mapping)."""
    return "embedded"


def _list_all(server: ServerHandle, tenant: str, page_size: int, **filters: int) -> tuple[list[str], int]:
    ids: list[str] = []
    token = ""
    pages = 0
    while True:
        page = server.keys.ListKeys(
            key_pb.ListKeysRequest(tenant_id=tenant, page_size=page_size, page_token=token, **filters)
        )
        pages += 1
        assert len(page.keys) <= page_size
        ids += [key.key_id for key in page.keys]
        token = page.next_page_token
        if not token:
            return ids, pages


def test_pages_cover_every_key_once_in_creation_order(server: ServerHandle) -> None:
    created = []
    for key_type in [resources_pb2.KEY_TYPE_MASTER] + [resources_pb2.KEY_TYPE_DATA] * 7:
        created.append(server.create_key("t1", key_type).key_id)
        server.clock.advance(timedelta(seconds=1))
    ids, pages = _list_all(server, "t1", page_size=3)
    assert ids == created
    assert pages == 3


def test_keys_created_in_the_same_instant_are_still_paged_exactly_once(server: ServerHandle) -> None:
    created = {server.create_key("t1").key_id for _ in range(10)}
    ids, _ = _list_all(server, "t1", page_size=2, key_type=resources_pb2.KEY_TYPE_DATA)
    assert sorted(ids) == sorted(created)
    assert len(ids) == len(set(ids))


def test_default_page_size_is_50(server: ServerHandle) -> None:
    for _ in range(55):
        server.create_key("t1")
    page = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1"))
    assert len(page.keys) == 50
    assert page.next_page_token


def test_filters_by_type_and_effective_state(server: ServerHandle) -> None:
    data = server.create_key("t1")
    session = server.create_key("t1", resources_pb2.KEY_TYPE_SESSION)
    disabled = server.create_key("t1")
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=disabled.key_id))
    short = server.create_key("t1", expire_after=Duration(seconds=7200))
    server.clock.advance(timedelta(hours=2))

    def listed(**filters: int) -> set[str]:
        ids, _ = _list_all(server, "t1", page_size=2, **filters)
        return set(ids)

    assert listed(key_type=resources_pb2.KEY_TYPE_SESSION) == {session.key_id}
    assert listed(state=resources_pb2.KEY_STATE_DISABLED) == {disabled.key_id}
    assert listed(state=resources_pb2.KEY_STATE_EXPIRED) == {short.key_id}
    enabled = listed(state=resources_pb2.KEY_STATE_ENABLED, key_type=resources_pb2.KEY_TYPE_DATA)
    assert enabled == {data.key_id}
    # The session key's default 24 h has not passed yet.
    assert session.key_id in listed(state=resources_pb2.KEY_STATE_ENABLED)


def test_a_page_token_cannot_be_reused_with_other_filters_or_another_tenant(server: ServerHandle) -> None:
    for _ in range(3):
        server.create_key("t1")
    token = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1", page_size=1)).next_page_token
    assert token
    for request in (
        key_pb.ListKeysRequest(tenant_id="t2", page_size=1, page_token=token),
        key_pb.ListKeysRequest(tenant_id="t1", page_size=1, page_token=token, key_type=resources_pb2.KEY_TYPE_DATA),
    ):
        expect_error(
            lambda request=request: server.keys.ListKeys(request),  # type: ignore[misc]
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_INVALID_FIELD",
            "page_token",
        )


def test_a_tenant_without_keys_lists_nothing_and_gets_no_master_key(server: ServerHandle) -> None:
    page = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="nobody"))
    assert list(page.keys) == []
    assert page.next_page_token == ""
    assert list(server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="nobody")).keys) == []
