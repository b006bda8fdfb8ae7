"""Per-tenant token buckets, on an injected monotonic clock."""

from __future__ import annotations

import pytest

from crypto_server.domain.errors import QuotaExceeded
from crypto_server.service.quotas import NoQuotas, TenantQuotas, quotas_for
from tests.conftest import Ticks


def test_a_tenant_gets_its_burst_then_waits_for_the_rate() -> None:
    clock = Ticks(start=1000.0)
    quotas = TenantQuotas(rate=10, burst=5, monotonic=clock)
    for _ in range(5):
        quotas.charge("a")
    with pytest.raises(QuotaExceeded) as refused:
        quotas.charge("a")
    assert refused.value.retry_after_s == pytest.approx(0.1)
    clock.now += 0.1
    quotas.charge("a")
    quotas.charge("b", cost=5)  # another tenant is untouched


def test_a_batch_costs_one_token_per_item_and_says_how_long_to_wait() -> None:
    clock = Ticks(start=1000.0)
    quotas = TenantQuotas(rate=100, burst=50, monotonic=clock)
    quotas.charge("a", cost=40)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.charge("a", cost=20)
    assert refused.value.retry_after_s == pytest.approx(0.1)  # 10 tokens short at 100 per second
    clock.now += 0.1
    quotas.charge("a", cost=20)


def test_memory_is_bounded_by_forgetting_the_least_recently_seen_tenant() -> None:
    clock = Ticks(start=1000.0)
    quotas = TenantQuotas(rate=1, burst=1, max_tenants=2, monotonic=clock)
    quotas.charge("a")
    quotas.charge("b")
    quotas.charge("c")  # forgets "a"
    assert len(quotas) == 2
    with pytest.raises(QuotaExceeded):
        quotas.charge("c")
    with pytest.raises(QuotaExceeded):
        quotas.charge("b")


def test_overlong_tenant_ids_share_one_bucket_instead_of_filling_memory() -> None:
    quotas = TenantQuotas(rate=1, burst=1, monotonic=Ticks(start=1000.0))
    quotas.charge("x" * 100_000)
    with pytest.raises(QuotaExceeded):
        quotas.charge("y" * 100_000)
    assert len(quotas) == 1


def test_rate_zero_turns_quotas_off() -> None:
    quotas = quotas_for(0, 1)
    assert isinstance(quotas, NoQuotas)
    for _ in range(1000):
        quotas.charge("a", cost=1000)
