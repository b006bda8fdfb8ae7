"""The client's list_key_versions (one page) and iter_key_versions (every page), and Key.version_count; run for
sync and asyncio against a real server (127.0.0.1, port 0)."""

from __future__ import annotations

import grpc
import pytest

from crypto_client import InvalidArgumentError, KeyNotFoundError, KeyVersionPage, KeyVersionState
from tests.client.conftest import MakeClient
from tests.client.faults import Fault, FaultInjector
from tests.conftest import ServerHandle


def test_pages_and_the_iterator_return_every_version_in_order(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    for _ in range(6):
        key = crypto.rotate_key(key.key_id)
    assert key.version_count == 7
    assert crypto.get_key(key.key_id, use_cache=False).version_count == 7

    first = crypto.list_key_versions(key.key_id, page_size=3)
    assert isinstance(first, KeyVersionPage)
    assert [v.version for v in first.versions] == [1, 2, 3]
    assert first.next_page_token
    second = crypto.list_key_versions(key.key_id, page_size=3, page_token=first.next_page_token)
    assert [v.version for v in second.versions] == [4, 5, 6]

    before = faults.attempts["ListKeyVersions"]
    listed = list(crypto.iter_key_versions(key.key_id, page_size=3))
    assert [v.version for v in listed] == list(range(1, 8))
    assert {v.state for v in listed} == {KeyVersionState.ENABLED}
    assert faults.attempts["ListKeyVersions"] - before == 3, "one call per page"


def test_a_transient_failure_is_retried_like_every_read(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    faults.plan("ListKeyVersions", Fault(code=grpc.StatusCode.UNAVAILABLE))
    assert [v.version for v in crypto.list_key_versions(key.key_id).versions] == [1]


def test_errors_are_the_clients_typed_errors(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    with pytest.raises(KeyNotFoundError):
        crypto.list_key_versions("00000000-0000-4000-8000-000000000000")
    with pytest.raises(InvalidArgumentError):
        crypto.list_key_versions(key.key_id, page_size=1001)
    with pytest.raises(InvalidArgumentError):
        crypto.list_key_versions(key.key_id, page_token="not-a-token")
