"""Start-up refuses a store that holds keys but has lost what proves which keys may read them.

The attacks: delete the root key check (any root key would then record itself as the right one), or delete
the wrapped metadata key (a fresh one would then tag whatever the attacker wrote).
"""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path

import grpc
import pytest

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import key_service_pb2_grpc, resources_pb2
from crypto_server.config import ConfigError
from crypto_server.domain.key_integrity import METADATA_KEY_RECORD
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import Launch, ServerHandle, StartServer
from tests.servers import MongoServer
from tests.test_main import _run_to_exit


def _delete_meta(server: ServerHandle, name: str, mongo_server: MongoServer | None) -> None:
    if server.settings.mongodb_uri:
        assert mongo_server is not None
        mongo_server.client()[server.settings.mongodb_database]["store_meta"].delete_one({"_id": name})
    else:
        with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
            assert db.execute("DELETE FROM store_meta WHERE name = ?", (name,)).rowcount == 1


@pytest.mark.parametrize("backend", ["embedded", "mongo"], indirect=True)
@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("root_key_check", "holds keys but no root key check value"),
        (METADATA_KEY_RECORD, "holds keys but no metadata key"),
    ],
)
def test_a_keyed_store_missing_a_check_refuses_to_start(
    start_server: StartServer, request: pytest.FixtureRequest, record: str, message: str
) -> None:
    server = start_server()
    server.create_key("t1")
    server.stop()
    mongo = request.getfixturevalue("mongo_server") if server.settings.mongodb_uri else None
    _delete_meta(server, record, mongo)
    # Any root key at all, as the attacker would try, is refused; so is the right one.
    with pytest.raises(ConfigError, match="refusing to start"):
        start_server(root_key=base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(ConfigError, match=message):
        start_server()


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_an_empty_store_creates_its_checks(start_server: StartServer) -> None:
    server = start_server()
    assert server.running.store.get_root_key_check() is not None
    assert server.running.store.get_meta(METADATA_KEY_RECORD) is not None


def test_the_server_process_exits_2_with_one_clear_line(launch: Launch, tmp_path: Path) -> None:
    server = launch()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            key_pb.CreateKeyRequest(tenant_id="t", key_type=resources_pb2.KEY_TYPE_DATA)
        )
    assert server.terminate() == 0
    with sqlite3.connect(tmp_path / "data" / SqliteKeyStore.FILE_NAME) as db:
        db.execute("DELETE FROM store_meta WHERE name = 'root_key_check'")
    code, stderr = _run_to_exit({"CRYPTO_DATA_DIR": str(tmp_path / "data")})
    assert code == 2
    assert "no root key check value" in stderr
    assert "Traceback" not in stderr
