"""The blocking client and helpers are generated from the asyncio sources; the committed copy must be current."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

from crypto_client import AsyncCryptoClient, CryptoClient

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "unasync.py"


def _unasync() -> object:
    spec = importlib.util.spec_from_file_location("unasync_script", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_generated_blocking_code_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert _unasync().main(["--check"]) == 0, capsys.readouterr().err  # type: ignore[attr-defined]


def test_the_rewrite_turns_async_declarations_into_blocking_ones() -> None:
    rewrite = _unasync().rewrite  # type: ignore[attr-defined]
    source = (
        "async def get(self) -> AsyncIterator[Key]:\n"
        "    async with self._fetch_lock:\n"
        "        async for page in AsyncRetrying(**options):\n"
        "            return await self._call(grpc.aio.insecure_channel, _AsyncPublicKeyCache)\n"
    )
    assert rewrite(source) == (
        "def get(self) -> Iterator[Key]:\n"
        "    with self._fetch_lock:\n"
        "        for page in Retrying(**options):\n"
        "            return self._call(grpc.insecure_channel, _PublicKeyCache)\n"
    )


def test_both_clients_offer_the_same_methods_with_the_same_parameters() -> None:
    def methods(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    assert methods(AsyncCryptoClient) == methods(CryptoClient)
