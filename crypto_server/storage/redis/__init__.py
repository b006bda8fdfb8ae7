"""Redis in front of the key store: a shared cache of keys and the invalidation channel.

Redis holds only what the store holds — wrapped key material and metadata,
never an unwrapped key — so reading Redis gives nothing the database would not.

Redis is an optimisation, never a dependency: when it cannot be reached,
lookups go to the store, writes still succeed, errors are logged at most once
per interval, and Redis is left alone for a short back-off so that a dead
Redis costs no time per request. Caching resumes by itself when it returns.

One module per job:

- `guard`: a client that fails fast, and the back-off that turns an outage into cache misses;
- `key_codec`: a Key as the JSON a cache entry holds;
- `cache`: the cache-aside wrapper of the store's key reading and writing roles;
- `invalidation`: key changes told to every server over pub/sub.
"""
