"""Where keys live: the storage port and its adapters."""
