"""Certificates, tokens, policies and the per-RPC call table for the access-control tests."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import duration_pb2, field_mask_pb2

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc, key_service_pb2_grpc, resources_pb2
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.domain.access_policy import Permission
from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.key_backup import (
    BackupMetadata,
    BackupVersion,
    KeyBackup,
    seal_for_public_key,
)
from crypto_server.domain.keys import KeyPolicy, KeyType
from crypto_server.transport.authorization import REQUIRED_PERMISSIONS

TENANT = "acme"
OTHER_TENANT = "globex"
# Holds admin narrowed to labels no key has, for the right tenant: a valid identity no RPC accepts (token tests;
# principal_lacking is the "right tenant, wrong permission" of the RPC matrix).
NO_RPC_PERMISSION = "spiffe://caas/test/audit-reader"
OPERATOR = "spiffe://caas/test/operator"
OTHER_TENANT_OPERATOR = "spiffe://caas/test/globex-operator"
MESSAGING = "spiffe://caas/ns/messaging/sa/chat"
# Every permission, admin and audit_read included, narrowed to team=messaging, in TENANT and a tenant with no
# keys yet (FRESH_TENANT): what a narrowed grant may do to the objects of a whole tenant.
NARROWED_ADMIN = "spiffe://caas/test/narrowed-admin"
FRESH_TENANT = "initech"
# decrypt on every key, encrypt only on team=messaging keys.
DECRYPTS_ALL_ENCRYPTS_MESSAGING = "spiffe://caas/test/decrypt-all-encrypt-messaging"
ALL_PERMISSIONS = [
    "encrypt", "decrypt", "generate_data_key", "mac", "sign", "session_keys", "manage_keys", "read_keys",
]  # fmt: skip


def principal_holding(permissions: tuple[str, ...]) -> str:
    return "spiffe://caas/test/holds/" + "+".join(permissions)


def principal_lacking(permissions: tuple[str, ...]) -> str:
    """Holds every permission for TENANT except these: "right tenant, wrong permission" for any RPC."""
    return "spiffe://caas/test/lacks/" + "+".join(permissions)


def matrix_policy() -> dict[str, Any]:
    """One principal per permission set the RPCs need, an operator, another tenant's operator, and the
    messaging service narrowed to keys labelled team=messaging."""
    rules: list[dict[str, Any]] = [
        {"principals": [principal_holding(needed)], "tenants": [TENANT], "permissions": list(needed)}
        for needed in sorted({tuple(p.value for p in perms) for perms in REQUIRED_PERMISSIONS.values()})
    ]
    rules += [
        {
            "principals": [principal_lacking(needed)],
            "tenants": [TENANT],
            "permissions": [p.value for p in Permission if p.value not in needed],
        }
        for needed in sorted({tuple(p.value for p in perms) for perms in REQUIRED_PERMISSIONS.values()})
    ]
    rules += [
        {"principals": [OPERATOR], "tenants": "*", "permissions": ALL_PERMISSIONS},
        {"principals": [OTHER_TENANT_OPERATOR], "tenants": [OTHER_TENANT], "permissions": ALL_PERMISSIONS},
        # admin narrowed to labels: the tenant-wide calls admin opens need a grant without labels.
        {"principals": [NO_RPC_PERMISSION], "tenants": [TENANT], "permissions": ["admin"], "labels": {"team": "none"}},
        {
            "principals": ["spiffe://caas/ns/messaging/*"],
            "tenants": [TENANT],
            "permissions": ALL_PERMISSIONS,
            "labels": {"team": "messaging"},
        },
        {
            "principals": [NARROWED_ADMIN],
            "tenants": [TENANT, FRESH_TENANT],
            "permissions": [*ALL_PERMISSIONS, "admin", "audit_read"],
            "labels": {"team": "messaging"},
        },
        {"principals": [DECRYPTS_ALL_ENCRYPTS_MESSAGING], "tenants": [TENANT], "permissions": ["decrypt"]},
        {
            "principals": [DECRYPTS_ALL_ENCRYPTS_MESSAGING],
            "tenants": [TENANT],
            "permissions": ["encrypt"],
            "labels": {"team": "messaging"},
        },
    ]
    return {"version": 1, "rules": rules}


# The matrix servers' backup private key (CRYPTO_BACKUP_PRIVATE_KEY_FILE), so ImportKey has backups to open.
BACKUP_PRIVATE_KEY = x25519.X25519PrivateKey.generate()


def write_backup_private_key(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            BACKUP_PRIVATE_KEY.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


def fresh_backup(
    tenant_id: str = TENANT, key_type: KeyType = KeyType.DATA, labels: dict[str, str] | None = None
) -> bytes:
    """A backup of a new key of `tenant_id` (a key id no server has), for BACKUP_PRIVATE_KEY: ImportKey succeeds."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    metadata = BackupMetadata(
        tenant_id=tenant_id,
        key_id=str(uuid.uuid4()),
        parent_key_id=None,
        key_type=key_type,
        algorithm=Algorithm.AES_256_GCM,
        disabled=False,
        created_at=now,
        policy=KeyPolicy(expire_after=None, rotation_period=None),
        labels=labels or {},
        primary_version=1,
        versions=(BackupVersion(1, now, None, 0, None),),
        exported_at=now,
    )
    return seal_for_public_key(KeyBackup(metadata, (os.urandom(32),)), BACKUP_PRIVATE_KEY.public_key())


def issue_client_cert(
    ca: trustme.CA, *, spiffe_id: str | None = None, common_name: str | None = None
) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM) for a client, signed by `ca` (trustme issues no URI SANs)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
    certificate = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def write_server_files(ca: trustme.CA, directory: Path, *, client_ca: trustme.CA | None = None) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"cert": directory / "server.pem", "key": directory / "server.key", "ca": directory / "clients-ca.pem"}
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    (client_ca or ca).cert_pem.write_to_path(str(paths["ca"]))
    return paths


def tls_channel(
    address: str, server_ca: trustme.CA, client: tuple[bytes, bytes] | None = None, **options: Any
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server_ca.cert_pem.bytes(),
        private_key=client[0] if client else None,
        certificate_chain=client[1] if client else None,
    )
    return grpc.secure_channel(address, credentials, options=list(options.items()))


@dataclass
class TokenIssuer:
    """An EC P-256 JWT issuer and its JWKS."""

    issuer: str = "https://issuer.test"
    audience: str = "caas-crypto"
    kid: str = field(default_factory=lambda: base64.urlsafe_b64encode(os.urandom(6)).decode())
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def jwks(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def token(self, subject: str, *, lifetime_s: float = 300, **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": subject, "iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + lifetime_s}
        payload.update(claims)
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": self.kid})


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Stubs:
    keys: key_service_pb2_grpc.KeyServiceStub
    crypto: crypto_service_pb2_grpc.CryptoServiceStub

    @classmethod
    def on(cls, channel: grpc.Channel) -> Stubs:
        return cls(key_service_pb2_grpc.KeyServiceStub(channel), crypto_service_pb2_grpc.CryptoServiceStub(channel))


@dataclass
class TenantKeys:
    """Keys of TENANT (and what they made), created by the operator for the matrix to use."""

    data: str
    toggled: str
    hmac: str
    signing: str
    session: str
    ciphertext: bytes
    stream: bytes
    mac: bytes
    signature: bytes

    @classmethod
    def create(
        cls, stubs: Stubs, metadata: tuple[tuple[str, str], ...] = (), labels: dict[str, str] | None = None
    ) -> TenantKeys:
        def key(algorithm: int = resources_pb2.ALGORITHM_AES_256_GCM) -> str:
            request = key_pb.CreateKeyRequest(
                tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_DATA, algorithm=algorithm, labels=labels or {}
            )
            return str(stubs.keys.CreateKey(request, metadata=metadata).key.key_id)

        data, toggled = key(), key()
        hmac, signing = key(resources_pb2.ALGORITHM_HMAC_SHA256), key(resources_pb2.ALGORITHM_ED25519)
        session = stubs.keys.GenerateSessionKey(
            key_pb.GenerateSessionKeyRequest(tenant_id=TENANT, labels=labels or {}), metadata=metadata
        ).key.key_id
        sealed = stubs.crypto.Encrypt(
            crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=data, plaintext=b"secret"), metadata=metadata
        ).ciphertext
        stream = b"".join(
            reply.chunk
            for reply in stubs.crypto.EncryptStream(
                iter([crypto_pb.EncryptStreamRequest(tenant_id=TENANT, key_id=data, chunk=b"streamed")]),
                metadata=metadata,
            )
        )
        mac = stubs.crypto.ComputeMac(
            crypto_pb.ComputeMacRequest(tenant_id=TENANT, key_id=hmac, data=b"m"), metadata=metadata
        ).mac
        signature = stubs.crypto.Sign(
            crypto_pb.SignRequest(tenant_id=TENANT, key_id=signing, message=b"m"), metadata=metadata
        ).signature
        return cls(data, toggled, hmac, signing, session, sealed, stream, mac, signature)


Call = Callable[[Stubs, TenantKeys, tuple[tuple[str, str], ...]], object]


def _stream(responses: Iterator[Any]) -> list[Any]:
    return list(responses)


def _disable_and_enable(s: Stubs, k: TenantKeys, m: tuple[tuple[str, str], ...]) -> object:
    s.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=k.data), metadata=m)
    s.keys.DisableKeyVersion(key_pb.DisableKeyVersionRequest(tenant_id=TENANT, key_id=k.data, version=1), metadata=m)
    return s.keys.EnableKeyVersion(
        key_pb.EnableKeyVersionRequest(tenant_id=TENANT, key_id=k.data, version=1), metadata=m
    )


def _schedule_and_cancel(s: Stubs, k: TenantKeys, m: tuple[tuple[str, str], ...], *, version: int) -> object:
    if version:
        s.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=k.data), metadata=m)
        s.keys.ScheduleKeyVersionDestruction(
            key_pb.ScheduleKeyVersionDestructionRequest(tenant_id=TENANT, key_id=k.data, version=version),
            metadata=m,
        )
    else:
        s.keys.ScheduleKeyDestruction(key_pb.ScheduleKeyDestructionRequest(tenant_id=TENANT, key_id=k.data), metadata=m)
    return s.keys.CancelKeyDestruction(
        key_pb.CancelKeyDestructionRequest(tenant_id=TENANT, key_id=k.data, version=version), metadata=m
    )


def _schedule_and_cancel_tenant(s: Stubs, m: tuple[tuple[str, str], ...]) -> object:
    s.keys.ScheduleTenantDestruction(key_pb.ScheduleTenantDestructionRequest(tenant_id=TENANT), metadata=m)
    return s.keys.CancelTenantDestruction(key_pb.CancelTenantDestructionRequest(tenant_id=TENANT), metadata=m)


# Every RPC, called for TENANT the way a legitimate caller would.
RPC_CALLS: dict[str, Call] = {
    "CreateKey": lambda s, k, m: s.keys.CreateKey(
        key_pb.CreateKeyRequest(tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_DATA), metadata=m
    ),
    "GetKey": lambda s, k, m: s.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=k.data), metadata=m),
    "ListKeys": lambda s, k, m: s.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=TENANT), metadata=m),
    "RotateKey": lambda s, k, m: s.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=k.data), metadata=m),
    "UpdateKey": lambda s, k, m: s.keys.UpdateKey(
        key_pb.UpdateKeyRequest(
            tenant_id=TENANT,
            key_id=k.data,
            update_mask=field_mask_pb2.FieldMask(paths=["rotation_period"]),
            rotation_period=duration_pb2.Duration(seconds=30 * 86400),
        ),
        metadata=m,
    ),
    "DisableKey": lambda s, k, m: s.keys.DisableKey(
        key_pb.DisableKeyRequest(tenant_id=TENANT, key_id=k.toggled), metadata=m
    ),
    "EnableKey": lambda s, k, m: s.keys.EnableKey(
        key_pb.EnableKeyRequest(tenant_id=TENANT, key_id=k.toggled), metadata=m
    ),
    "GenerateSessionKey": lambda s, k, m: s.keys.GenerateSessionKey(
        key_pb.GenerateSessionKeyRequest(tenant_id=TENANT), metadata=m
    ),
    "GetSessionKey": lambda s, k, m: s.keys.GetSessionKey(
        key_pb.GetSessionKeyRequest(tenant_id=TENANT, key_id=k.session), metadata=m
    ),
    "ReadAuditLog": lambda s, k, m: s.keys.ReadAuditLog(key_pb.ReadAuditLogRequest(tenant_id=TENANT), metadata=m),
    "ExportKey": lambda s, k, m: s.keys.ExportKey(key_pb.ExportKeyRequest(tenant_id=TENANT, key_id=k.data), metadata=m),
    "ImportKey": lambda s, k, m: s.keys.ImportKey(
        key_pb.ImportKeyRequest(tenant_id=TENANT, backup=fresh_backup()), metadata=m
    ),
    "Encrypt": lambda s, k, m: s.crypto.Encrypt(
        crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=k.data, plaintext=b"p"), metadata=m
    ),
    "Decrypt": lambda s, k, m: s.crypto.Decrypt(
        crypto_pb.DecryptRequest(tenant_id=TENANT, ciphertext=k.ciphertext), metadata=m
    ),
    "GenerateDataKey": lambda s, k, m: s.crypto.GenerateDataKey(
        crypto_pb.GenerateDataKeyRequest(tenant_id=TENANT, key_id=k.data), metadata=m
    ),
    "ReEncrypt": lambda s, k, m: s.crypto.ReEncrypt(
        crypto_pb.ReEncryptRequest(tenant_id=TENANT, ciphertext=k.ciphertext, destination_key_id=k.data), metadata=m
    ),
    "BatchEncrypt": lambda s, k, m: s.crypto.BatchEncrypt(
        crypto_pb.BatchEncryptRequest(
            tenant_id=TENANT, items=[crypto_pb.BatchEncryptRequest.Item(key_id=k.data, plaintext=b"p")]
        ),
        metadata=m,
    ),
    "BatchDecrypt": lambda s, k, m: s.crypto.BatchDecrypt(
        crypto_pb.BatchDecryptRequest(
            tenant_id=TENANT, items=[crypto_pb.BatchDecryptRequest.Item(ciphertext=k.ciphertext)]
        ),
        metadata=m,
    ),
    "ComputeMac": lambda s, k, m: s.crypto.ComputeMac(
        crypto_pb.ComputeMacRequest(tenant_id=TENANT, key_id=k.hmac, data=b"m"), metadata=m
    ),
    "VerifyMac": lambda s, k, m: s.crypto.VerifyMac(
        crypto_pb.VerifyMacRequest(tenant_id=TENANT, key_id=k.hmac, data=b"m", mac=k.mac), metadata=m
    ),
    "Sign": lambda s, k, m: s.crypto.Sign(
        crypto_pb.SignRequest(tenant_id=TENANT, key_id=k.signing, message=b"m"), metadata=m
    ),
    "Verify": lambda s, k, m: s.crypto.Verify(
        crypto_pb.VerifyRequest(tenant_id=TENANT, key_id=k.signing, message=b"m", signature=k.signature), metadata=m
    ),
    "GetPublicKey": lambda s, k, m: s.crypto.GetPublicKey(
        crypto_pb.GetPublicKeyRequest(tenant_id=TENANT, key_id=k.signing), metadata=m
    ),
    "EncryptStream": lambda s, k, m: _stream(
        s.crypto.EncryptStream(
            iter([crypto_pb.EncryptStreamRequest(tenant_id=TENANT, key_id=k.data, chunk=b"x")]), metadata=m
        )
    ),
    "DecryptStream": lambda s, k, m: _stream(
        s.crypto.DecryptStream(iter([crypto_pb.DecryptStreamRequest(tenant_id=TENANT, chunk=k.stream)]), metadata=m)
    ),
    # Each leaves the key (or tenant) as it found it, so the matrix's other calls are unaffected.
    "DisableKeyVersion": lambda s, k, m: _disable_and_enable(s, k, m),
    "EnableKeyVersion": lambda s, k, m: s.keys.EnableKeyVersion(
        key_pb.EnableKeyVersionRequest(tenant_id=TENANT, key_id=k.data, version=1), metadata=m
    ),
    "ScheduleKeyVersionDestruction": lambda s, k, m: _schedule_and_cancel(s, k, m, version=1),
    "ScheduleKeyDestruction": lambda s, k, m: _schedule_and_cancel(s, k, m, version=0),
    "CancelKeyDestruction": lambda s, k, m: _schedule_and_cancel(s, k, m, version=0),
    "ScheduleTenantDestruction": lambda s, k, m: _schedule_and_cancel_tenant(s, m),
    "CancelTenantDestruction": lambda s, k, m: _schedule_and_cancel_tenant(s, m),
    "ListKeyVersions": lambda s, k, m: s.keys.ListKeyVersions(
        key_pb.ListKeyVersionsRequest(tenant_id=TENANT, key_id=k.data), metadata=m
    ),
}
