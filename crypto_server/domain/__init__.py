"""Keys, versions, states, key wrapping and the ciphertext format.

Nothing here knows about protobuf, gRPC, SQLite, BSON or Redis.
"""
