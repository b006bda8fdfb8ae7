"""Every setting the server reads is documented, and validated as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crypto_server.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent


def _variables_read() -> set[str]:
    source = (ROOT / "crypto_server" / "config.py").read_text()
    return set(re.findall(r'"((?:CRYPTO|MONGODB|REDIS)_[A-Z_]+)"', source))


@pytest.mark.parametrize("document", ["README.md", "docs/operations.md"])
def test_every_variable_is_documented(document: str) -> None:
    text = (ROOT / document).read_text()
    variables = _variables_read()
    assert len(variables) >= 20
    assert sorted(v for v in variables if f"`{v}`" not in text) == []


def test_defaults_match_the_documentation() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 3009, 16)
    assert settings.max_plaintext_bytes == 1024 * 1024
    assert (settings.keyring_ttl_s, settings.keyring_size, settings.cache_ttl_s) == (300.0, 10_000, 3600.0)
    assert (settings.mongodb_uri, settings.redis_url, settings.metrics_port) == (None, None, None)
    assert settings.mongodb_database == "caas_crypto"
    assert settings.max_batch_items == 1000


def test_secrets_never_appear_in_the_settings_repr() -> None:
    settings = Settings.from_env(
        {"CRYPTO_ROOT_KEY": "c2VjcmV0", "MONGODB_URI": "mongodb://user:hunter2@db", "REDIS_URL": "redis://:pw@r"}
    )
    text = repr(settings)
    assert "c2VjcmV0" not in text and "hunter2" not in text and ":pw@" not in text


def test_metrics_port_zero_means_any_free_port() -> None:
    assert Settings.from_env({"CRYPTO_METRICS_PORT": "0"}).metrics_port == 0
    with pytest.raises(ConfigError, match="CRYPTO_METRICS_PORT"):
        Settings.from_env({"CRYPTO_METRICS_PORT": "web"})
