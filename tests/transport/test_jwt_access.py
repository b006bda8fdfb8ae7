"""Bearer JWTs over TLS (no client certificates): every RPC, and every way a token can be wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from crypto_client import ClientConfig, CryptoClient, UnauthenticatedError, tls_credentials
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.app import CryptoServer, build_server
from crypto_server.config import Settings
from crypto_server.transport.authorization import REQUIRED_PERMISSIONS
from tests.conftest import FakeClock, error_info
from tests.transport.identity_support import (
    NO_RPC_PERMISSION,
    OPERATOR,
    OTHER_TENANT_OPERATOR,
    RPC_CALLS,
    TENANT,
    Stubs,
    TenantKeys,
    TokenIssuer,
    bearer,
    matrix_policy,
    principal_holding,
    principal_lacking,
    tls_channel,
    write_backup_private_key,
    write_server_files,
)


@dataclass
class JwtServer:
    running: CryptoServer
    stubs: Stubs
    issuer: TokenIssuer
    jwks_file: Path
    keys: TenantKeys
    ca_file: Path

    @property
    def address(self) -> str:
        return f"localhost:{self.running.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtServer]:
    directory = tmp_path_factory.mktemp("jwt")
    ca = trustme.CA()
    files = write_server_files(ca, directory / "tls")
    issuer = TokenIssuer()
    jwks_file = directory / "jwks.json"
    jwks_file.write_text(json.dumps(issuer.jwks()))
    policy_file = directory / "policy.yaml"
    policy_file.write_text(json.dumps(matrix_policy()))
    settings = Settings(
        host="127.0.0.1",
        port=0,
        workers=8,
        data_dir=directory / "data",
        root_key=base64.b64encode(os.urandom(32)).decode(),
        tls_cert_file=files["cert"],
        tls_key_file=files["key"],
        jwks_file=jwks_file,
        jwt_issuer=issuer.issuer,
        jwt_audience=issuer.audience,
        policy_file=policy_file,
        backup_private_key_file=write_backup_private_key(directory / "backup.pem"),
        reload_interval_s=0,
    )
    running = build_server(settings, clock=FakeClock())
    channel = tls_channel(f"localhost:{running.port}", ca)
    stubs = Stubs.on(channel)
    keys = TenantKeys.create(stubs, bearer(issuer.token(OPERATOR)))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield JwtServer(running, stubs, issuer, jwks_file, keys, ca_file)
    channel.close()
    running.stop(0)


def _fails(call: object, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code() == code, caught.value.details()
    assert error_info(caught.value).reason == reason


@pytest.mark.parametrize("rpc", sorted(RPC_CALLS))
def test_rpc_needs_a_token_with_its_permission_for_its_tenant(served: JwtServer, rpc: str) -> None:
    call, stubs, keys, issuer = RPC_CALLS[rpc], served.stubs, served.keys, served.issuer
    needed = tuple(permission.value for permission in REQUIRED_PERMISSIONS[rpc])
    _fails(lambda: call(stubs, keys, ()), grpc.StatusCode.UNAUTHENTICATED, "ERROR_REASON_UNAUTHENTICATED")
    for principal in (OTHER_TENANT_OPERATOR, principal_lacking(needed)):
        token = bearer(issuer.token(principal))
        _fails(
            lambda token=token: call(stubs, keys, token),
            grpc.StatusCode.PERMISSION_DENIED,
            "ERROR_REASON_PERMISSION_DENIED",
        )
    call(stubs, keys, bearer(issuer.token(principal_holding(needed))))


def _part(document: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()


def _none_token(subject: str, issuer: TokenIssuer) -> str:
    claims = {"sub": subject, "iss": issuer.issuer, "aud": issuer.audience, "exp": 4_000_000_000}
    return f"{_part({'alg': 'none', 'typ': 'JWT', 'kid': issuer.kid})}.{_part(claims)}."


def _hs256_with_public_key(subject: str, issuer: TokenIssuer) -> str:
    """The RS/HS confusion attack: the issuer's public key used as an HMAC secret (built by hand: PyJWT
    itself refuses to sign so)."""
    public_pem = issuer.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    claims = {"sub": subject, "iss": issuer.issuer, "aud": issuer.audience, "exp": 4_000_000_000}
    signing_input = f"{_part({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.kid})}.{_part(claims)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = OPERATOR
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_bad_tokens_are_unauthenticated(served: JwtServer) -> None:
    issuer = served.issuer
    stranger = TokenIssuer(kid=issuer.kid)  # same kid, another key: a forged signature
    bad = {
        "expired": issuer.token(OPERATOR, lifetime_s=-3600),
        "not yet valid": issuer.token(OPERATOR, nbf=4_000_000_000 - 1),
        "wrong audience": issuer.token(OPERATOR, aud="another-service"),
        "wrong issuer": issuer.token(OPERATOR, iss="https://evil.test"),
        "wrong issuer key": stranger.token(OPERATOR),
        "alg none": _none_token(OPERATOR, issuer),
        "HS256 with the public key": _hs256_with_public_key(OPERATOR, issuer),
        "tampered": _tampered(issuer.token(NO_RPC_PERMISSION)),
        "garbage": "not-a-jwt",
    }
    request = key_pb.ListKeysRequest(tenant_id=TENANT)
    for what, token in bad.items():
        with pytest.raises(grpc.RpcError) as caught:
            served.stubs.keys.ListKeys(request, metadata=bearer(token))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
    with pytest.raises(grpc.RpcError) as caught:
        served.stubs.keys.ListKeys(request, metadata=(("authorization", "Basic b3A6cHc="),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    served.stubs.keys.ListKeys(request, metadata=bearer(issuer.token(OPERATOR)))


def test_jwks_is_reloaded_when_the_issuer_adds_a_key(served: JwtServer) -> None:
    rotated = TokenIssuer()
    request = key_pb.ListKeysRequest(tenant_id=TENANT)
    _fails(
        lambda: served.stubs.keys.ListKeys(request, metadata=bearer(rotated.token(OPERATOR))),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_UNAUTHENTICATED",
    )
    original = served.jwks_file.read_text()
    try:
        both = {"keys": served.issuer.jwks()["keys"] + rotated.jwks()["keys"]}
        served.jwks_file.write_text(json.dumps(both))
        served.stubs.keys.ListKeys(request, metadata=bearer(rotated.token(OPERATOR)))
        served.stubs.keys.ListKeys(request, metadata=bearer(served.issuer.token(OPERATOR)))
    finally:
        served.jwks_file.write_text(original)


def test_client_asks_its_token_provider_before_every_attempt(served: JwtServer) -> None:
    issued: list[str] = []

    def fresh_token() -> str:
        issued.append(served.issuer.token(OPERATOR))
        return issued[-1]

    config = ClientConfig(credentials=tls_credentials(served.ca_file), token_provider=fresh_token)
    with CryptoClient(served.address, TENANT, config) as client:
        client.get_key(served.keys.data, use_cache=False)
        client.get_key(served.keys.data, use_cache=False)
    assert len(issued) == 2
    anonymous = ClientConfig(credentials=tls_credentials(served.ca_file))
    with CryptoClient(served.address, TENANT, anonymous) as client, pytest.raises(UnauthenticatedError):
        client.get_key(served.keys.data, use_cache=False)
