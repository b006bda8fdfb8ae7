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


def _documented_defaults() -> dict[str, str]:
    """The configuration reference's rows whose default is one literal value: variable -> that value."""
    text = (ROOT / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`<]+)`(?: \([^)|]*\))? \|", text, flags=re.MULTILINE)
    return dict(rows)


def test_defaults_match_the_documentation() -> None:
    # Setting each variable to the value the documentation gives as its default changes nothing.
    documented = _documented_defaults()
    assert len(documented) >= 30, "the configuration reference table was not found"
    defaults = Settings.from_env({})
    differing = sorted(name for name, value in documented.items() if Settings.from_env({name: value}) != defaults)
    assert differing == [], f"documented defaults the server does not use: {differing}"


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


def test_access_log_modes_are_read_and_anything_else_refused() -> None:
    assert Settings.from_env({}).access_log == "all"
    assert Settings.from_env({"CRYPTO_ACCESS_LOG": "errors"}).access_log == "errors"
    assert Settings.from_env({"CRYPTO_ACCESS_LOG": " Sampled:100 "}).access_log == "sampled:100"
    for bad in ("none", "some", "sampled", "sampled:0", "sampled:-3", "sampled:ten", "errors:2"):
        with pytest.raises(ConfigError, match=re.escape("CRYPTO_ACCESS_LOG must be all, errors or sampled:N")):
            Settings.from_env({"CRYPTO_ACCESS_LOG": bad})


def test_stream_and_rpc_limits_follow_the_workers_unless_set() -> None:
    assert Settings.from_env({"CRYPTO_WORKERS": "2"}).stream_limit == 1
    assert Settings.from_env({"CRYPTO_WORKERS": "40"}).concurrent_rpc_limit == 320
    assert Settings.from_env({"CRYPTO_MAX_STREAMS": "3"}).stream_limit == 3
    with pytest.raises(ConfigError, match="CRYPTO_MAX_STREAMS"):
        Settings.from_env({"CRYPTO_WORKERS": "4", "CRYPTO_MAX_STREAMS": "4"})  # no worker left for health


def test_limits_that_could_never_be_met_are_refused() -> None:
    with pytest.raises(ConfigError, match="CRYPTO_TENANT_BURST"):
        Settings.from_env({"CRYPTO_TENANT_BURST": "10"})  # below the 1000-item batch
    with pytest.raises(ConfigError, match="CRYPTO_MAX_BATCH_BYTES"):
        Settings.from_env({"CRYPTO_MAX_BATCH_ITEMS": "100000"})  # the answer could not fit one message
    assert Settings.from_env({"CRYPTO_TENANT_RATE": "0", "CRYPTO_TENANT_BURST": "1"}).tenant_rate == 0
    with pytest.raises(ConfigError, match="CRYPTO_KEY_USAGE_SOFT_LIMIT"):
        Settings.from_env({"CRYPTO_KEY_USAGE_SOFT_LIMIT": "10", "CRYPTO_KEY_USAGE_HARD_LIMIT": "5"})
    with pytest.raises(ConfigError, match="CRYPTO_KEY_USAGE_HARD_LIMIT"):
        Settings.from_env({"CRYPTO_KEY_USAGE_HARD_LIMIT": str(2**32 + 1)})  # past the AES-GCM bound


_HSM = {
    "CRYPTO_ROOT_KEY_PROVIDER": "pkcs11",
    "CRYPTO_PKCS11_LIBRARY": "/usr/lib/softhsm/libsofthsm2.so",
    "CRYPTO_PKCS11_TOKEN_LABEL": "caas",
    "CRYPTO_PKCS11_PIN_FILE": "/run/secrets/hsm_pin",
    "CRYPTO_PKCS11_KEY_LABEL": "root-1",
}


def test_the_hsm_settings_are_read_as_documented() -> None:
    settings = Settings.from_env({**_HSM, "MONGODB_URI": "mongodb://db"})
    assert settings.root_key_provider == "pkcs11" and settings.has_root_key
    assert (settings.pkcs11_library, settings.pkcs11_pin_file) == (
        Path("/usr/lib/softhsm/libsofthsm2.so"),
        Path("/run/secrets/hsm_pin"),
    )
    assert (settings.pkcs11_token_label, settings.pkcs11_key_label) == ("caas", "root-1")
    assert Settings.from_env({}).root_key_provider == "file"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CRYPTO_ROOT_KEY_PROVIDER": "vault"}, "CRYPTO_ROOT_KEY_PROVIDER must be file or pkcs11"),
        ({**_HSM, "CRYPTO_ROOT_KEY_FILE": "/k"}, "unset CRYPTO_ROOT_KEY and CRYPTO_ROOT_KEY_FILE"),
        ({**_HSM, "CRYPTO_PKCS11_KEY_LABEL": ""}, "needs CRYPTO_PKCS11_KEY_LABEL"),
        (
            {**_HSM, "CRYPTO_PKCS11_PIN_FILE": "", "CRYPTO_PKCS11_LIBRARY": ""},
            "needs CRYPTO_PKCS11_LIBRARY, CRYPTO_PKCS11_PIN_FILE",
        ),
        ({"CRYPTO_PKCS11_KEY_LABEL": "root-1"}, "only read with CRYPTO_ROOT_KEY_PROVIDER=pkcs11"),
        ({**_HSM, "CRYPTO_PKCS11_OTHER_KEY_LABEL": "root-1"}, "names the root key itself"),
        ({**_HSM, "CRYPTO_PKCS11_OTHER_KEY_LABEL": "old", "CRYPTO_OTHER_ROOT_KEY_FILE": "/o"}, "not both"),
        (
            {name: value for name, value in _HSM.items() if "KEY" not in name}
            | {"CRYPTO_PKCS11_OTHER_KEY_LABEL": "old"},
            "CRYPTO_PKCS11_OTHER_KEY_LABEL needs the root key set too",
        ),
        ({"CRYPTO_ROOT_KEY_FILE": "/k", "CRYPTO_PKCS11_OTHER_KEY_LABEL": "old"}, "needs CRYPTO_PKCS11_LIBRARY"),
    ],
)
def test_inconsistent_hsm_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)
