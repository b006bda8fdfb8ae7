"""CryptoService: thin handlers over the crypto operations."""

from __future__ import annotations

import grpc

from crypto_client.v1 import crypto_service_pb2 as pb
from crypto_client.v1 import crypto_service_pb2_grpc
from crypto_server.service.crypto_operations import CryptoOperations


class CryptoServicer(crypto_service_pb2_grpc.CryptoServiceServicer):
    def __init__(self, operations: CryptoOperations) -> None:
        self._operations = operations

    def Encrypt(self, request: pb.EncryptRequest, context: grpc.ServicerContext) -> pb.EncryptResponse:
        result = self._operations.encrypt(request.tenant_id, request.key_id, request.plaintext, request.aad)
        return pb.EncryptResponse(ciphertext=result.ciphertext, key_id=result.key_id, key_version=result.key_version)

    def Decrypt(self, request: pb.DecryptRequest, context: grpc.ServicerContext) -> pb.DecryptResponse:
        result = self._operations.decrypt(request.tenant_id, request.ciphertext, request.aad, request.key_id)
        return pb.DecryptResponse(plaintext=result.plaintext, key_id=result.key_id, key_version=result.key_version)
