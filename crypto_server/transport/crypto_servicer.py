"""CryptoService: thin handlers over the crypto operations."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from crypto_client.v1 import crypto_service_pb2 as pb
from crypto_client.v1 import crypto_service_pb2_grpc, errors_pb2
from crypto_server.domain.errors import CryptoServiceError, InvalidArgument
from crypto_server.service.crypto_operations import CryptoOperations
from crypto_server.service.macs_and_signatures import MacsAndSignatures
from crypto_server.transport.errors import describe
from crypto_server.transport.mapping import algorithm_to_proto
from crypto_server.transport.stream_messages import EncodedResponse, encode_stream_response


def item_error(error: CryptoServiceError) -> pb.ItemError:
    """One failed batch item, described as the error table describes a failed call."""
    described = describe(error)
    return pb.ItemError(
        code=described.code.value[0],
        message=described.message,
        reason=errors_pb2.ErrorReason.Name(described.reason),
        metadata=described.metadata,
    )


class CryptoServicer(crypto_service_pb2_grpc.CryptoServiceServicer):
    def __init__(self, operations: CryptoOperations, macs_and_signatures: MacsAndSignatures) -> None:
        self._operations = operations
        self._signatures = macs_and_signatures

    def Encrypt(self, request: pb.EncryptRequest, context: grpc.ServicerContext) -> pb.EncryptResponse:
        result = self._operations.encrypt(request.tenant_id, request.key_id, request.plaintext, request.aad)
        return pb.EncryptResponse(ciphertext=result.ciphertext, key_id=result.key_id, key_version=result.key_version)

    def Decrypt(self, request: pb.DecryptRequest, context: grpc.ServicerContext) -> pb.DecryptResponse:
        result = self._operations.decrypt(request.tenant_id, request.ciphertext, request.aad, request.key_id)
        return pb.DecryptResponse(plaintext=result.plaintext, key_id=result.key_id, key_version=result.key_version)

    def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateDataKeyResponse:
        data_key, wrapped = self._operations.generate_data_key(request.tenant_id, request.key_id, request.aad)
        return pb.GenerateDataKeyResponse(
            plaintext=b"" if request.without_plaintext else data_key,
            ciphertext=wrapped.ciphertext,
            key_id=wrapped.key_id,
            key_version=wrapped.key_version,
        )

    def ReEncrypt(self, request: pb.ReEncryptRequest, context: grpc.ServicerContext) -> pb.ReEncryptResponse:
        result = self._operations.re_encrypt(
            request.tenant_id,
            request.ciphertext,
            request.aad,
            source_key_id=request.source_key_id,
            destination_key_id=request.destination_key_id,
        )
        return pb.ReEncryptResponse(
            ciphertext=result.encrypted.ciphertext,
            key_id=result.encrypted.key_id,
            key_version=result.encrypted.key_version,
            source_key_id=result.source_key_id,
            source_key_version=result.source_key_version,
        )

    def BatchEncrypt(self, request: pb.BatchEncryptRequest, context: grpc.ServicerContext) -> pb.BatchEncryptResponse:
        # The request's items go to the service as they are (they have the fields BatchEncryptItem names).
        response = pb.BatchEncryptResponse()
        for outcome in self._operations.batch_encrypt(request.tenant_id, request.items):
            if isinstance(outcome, CryptoServiceError):
                response.results.add(error=item_error(outcome))
            else:
                response.results.add(
                    ciphertext=outcome.ciphertext, key_id=outcome.key_id, key_version=outcome.key_version
                )
        return response

    def BatchDecrypt(self, request: pb.BatchDecryptRequest, context: grpc.ServicerContext) -> pb.BatchDecryptResponse:
        response = pb.BatchDecryptResponse()
        for outcome in self._operations.batch_decrypt(request.tenant_id, request.items):
            if isinstance(outcome, CryptoServiceError):
                response.results.add(error=item_error(outcome))
            else:
                response.results.add(
                    plaintext=outcome.plaintext, key_id=outcome.key_id, key_version=outcome.key_version
                )
        return response

    def ComputeMac(self, request: pb.ComputeMacRequest, context: grpc.ServicerContext) -> pb.ComputeMacResponse:
        mac, version = self._signatures.compute_mac(
            request.tenant_id, request.key_id, request.data, request.key_version
        )
        return pb.ComputeMacResponse(mac=mac, key_id=request.key_id, key_version=version)

    def VerifyMac(self, request: pb.VerifyMacRequest, context: grpc.ServicerContext) -> pb.VerifyMacResponse:
        valid = self._signatures.verify_mac(
            request.tenant_id, request.key_id, request.data, request.mac, request.key_version
        )
        return pb.VerifyMacResponse(valid=valid)

    def Sign(self, request: pb.SignRequest, context: grpc.ServicerContext) -> pb.SignResponse:
        signed = self._signatures.sign(request.tenant_id, request.key_id, request.message)
        return pb.SignResponse(
            signature=signed.signature,
            key_id=signed.key_id,
            key_version=signed.key_version,
            algorithm=algorithm_to_proto(signed.algorithm),
        )

    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyResponse:
        valid = self._signatures.verify(
            request.tenant_id, request.key_id, request.message, request.signature, request.key_version
        )
        return pb.VerifyResponse(valid=valid)

    def GetPublicKey(self, request: pb.GetPublicKeyRequest, context: grpc.ServicerContext) -> pb.GetPublicKeyResponse:
        public = self._signatures.public_key(request.tenant_id, request.key_id, request.key_version)
        return pb.GetPublicKeyResponse(
            pem=public.pem,
            algorithm=algorithm_to_proto(public.algorithm),
            key_id=public.key_id,
            key_version=public.key_version,
        )

    # Answers with each EncryptStreamResponse already encoded (_responses), which the generated base does not type.
    def EncryptStream(  # type: ignore[override]
        self, request_iterator: Iterator[pb.EncryptStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[EncodedResponse]:
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("request", "the stream ended before its first message")
        used, sealed = self._operations.encrypt_stream(
            first.tenant_id, first.key_id, first.aad, _chunks(first.chunk, request_iterator)
        )
        yield from _responses(used.key_id, used.key_version, sealed)

    # Answers with each DecryptStreamResponse already encoded (_responses), which the generated base does not type.
    def DecryptStream(  # type: ignore[override]
        self, request_iterator: Iterator[pb.DecryptStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[EncodedResponse]:
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("request", "the stream ended before its first message")
        used, opened = self._operations.decrypt_stream(
            first.tenant_id, first.aad, first.key_id, _chunks(first.chunk, request_iterator)
        )
        yield from _responses(used.key_id, used.key_version, opened)


def _chunks(
    first: bytes, rest: Iterator[pb.EncryptStreamRequest] | Iterator[pb.DecryptStreamRequest]
) -> Iterator[bytes | memoryview]:
    # A chunk-only message arrives as a ChunkOnlyRequest whose chunk is a view (transport/stream_messages.py).
    yield first
    for message in rest:
        yield message.chunk


# The most stream bytes in one response message: far under the send limit, whatever the size of the
# request chunks (a 16 MiB chunk in gives 8 messages out). The client's 1 MiB chunks (about 1 MiB + tags
# out) still take one message each. How bytes are split across messages is not part of the format: the
# caller concatenates the chunks.
MAX_STREAM_RESPONSE_BYTES = 2 * 1024 * 1024


def _batches(pieces: list[bytes]) -> Iterator[list[bytes | memoryview]]:
    """`pieces` in order, grouped into batches of at most MAX_STREAM_RESPONSE_BYTES (a piece larger than that,
    a segment of up to 4 MiB, is cut into views)."""
    batch: list[bytes | memoryview] = []
    size = 0
    for piece in pieces:
        if size + len(piece) > MAX_STREAM_RESPONSE_BYTES and batch:
            yield batch
            batch, size = [], 0
        if len(piece) <= MAX_STREAM_RESPONSE_BYTES:
            batch.append(piece)
            size += len(piece)
            continue
        view = memoryview(piece)
        for start in range(0, len(piece), MAX_STREAM_RESPONSE_BYTES):
            part = view[start : start + MAX_STREAM_RESPONSE_BYTES]
            if len(part) == MAX_STREAM_RESPONSE_BYTES:
                yield [part]
            else:
                batch, size = [part], len(part)
    if batch:
        yield batch


def _responses(key_id: str, key_version: int, stream: Iterator[list[bytes]]) -> Iterator[EncodedResponse]:
    """Responses (EncryptStreamResponse or DecryptStreamResponse, encoded: transport/stream_messages.py) of at
    most MAX_STREAM_RESPONSE_BYTES each, in general one per request chunk; the first also says which key and
    version the stream uses."""
    first = True
    for pieces in stream:
        for batch in _batches(pieces):
            if first:
                yield encode_stream_response(batch, key_id, key_version)
                first = False
            else:
                yield encode_stream_response(batch)
