"""Generated protobuf and gRPC stubs for caas.crypto.v1 (see protos/). Do not edit."""
