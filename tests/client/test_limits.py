"""The client and the server's resource limits: every reason typed, quota refusals retried only as told."""

from __future__ import annotations

import pytest

from crypto_client import QuotaExceededError, StreamIdleError, StreamLimitError
from crypto_client.errors import _BY_REASON
from crypto_client.v1 import errors_pb2
from tests.client.conftest import MakeClient
from tests.client.faults import FaultInjector
from tests.conftest import StartServer


def test_every_error_reason_in_the_schema_has_a_typed_error() -> None:
    reasons = {name for name, _ in errors_pb2.ErrorReason.items() if name != "ERROR_REASON_UNSPECIFIED"}
    assert sorted(reasons - set(_BY_REASON)) == []


def test_limit_refusals_that_repeating_cannot_fix_are_not_retried() -> None:
    assert not StreamLimitError("x").transient
    assert not StreamIdleError("x").transient
    assert QuotaExceededError("x").transient


def test_a_quota_refusal_is_retried_after_the_delay_the_server_gives(
    start_server: StartServer, faults: FaultInjector, make_client: MakeClient
) -> None:
    # 3 tokens: CreateKey and two Encrypts; the third Encrypt waits 1/2 s for a token, as the server says.
    handle = start_server(interceptors=[faults], tenant_rate=2.0, tenant_burst=3)
    crypto = make_client(handle.address)
    key = crypto.create_key()
    crypto.encrypt(key.key_id, b"x")
    crypto.encrypt(key.key_id, b"x")
    before = faults.attempts["Encrypt"]
    assert crypto.encrypt(key.key_id, b"x").key_version == 1
    assert faults.attempts["Encrypt"] - before == 2
    assert crypto.stats().retries == 1


def test_a_quota_refusal_with_a_long_delay_fails_at_once_with_the_delay(
    start_server: StartServer, faults: FaultInjector, make_client: MakeClient
) -> None:
    handle = start_server(interceptors=[faults], tenant_rate=0.001, tenant_burst=2)
    crypto = make_client(handle.address)
    key = crypto.create_key()
    crypto.encrypt(key.key_id, b"x")
    before = faults.attempts["Encrypt"]
    with pytest.raises(QuotaExceededError) as caught:
        crypto.encrypt(key.key_id, b"x")
    assert faults.attempts["Encrypt"] - before == 1
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 100
    assert caught.value.reason == "ERROR_REASON_TENANT_QUOTA"
