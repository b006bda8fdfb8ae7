"""Use cases: key lifecycle and crypto operations, over the storage port."""
