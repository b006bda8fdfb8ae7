"""Benchmarks of the crypto service: `make bench` / `make bench-quick` (docs/performance.md)."""
