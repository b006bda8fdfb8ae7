"""Client side of the caas crypto service.

`crypto_client.v1` holds the generated protobuf messages and gRPC stubs for
`caas.crypto.v1` (regenerate with `make proto`; never edit by hand).
"""
