"""gRPC: thin servicers, the proto <-> domain mapping, the error table and the RPC middleware."""
