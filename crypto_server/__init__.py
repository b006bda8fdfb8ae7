"""The caas crypto service: per-tenant key management and AES-256-GCM over gRPC."""

__version__ = "0.1.0"
