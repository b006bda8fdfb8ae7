"""The `mode` or `sampled:N` form of the settings that choose which calls get a record (CRYPTO_AUDIT_CRYPTO,
CRYPTO_ACCESS_LOG)."""

from __future__ import annotations


def parse_sampling(text: str, modes: tuple[str, ...]) -> tuple[str, int]:
    """`(mode, 1)` for one of `modes`, `("sampled", N)` for `sampled:N` with N >= 1; else ValueError naming the
    accepted forms."""
    value = text.strip().lower()
    if value in modes:
        return value, 1
    if value.startswith("sampled:"):
        try:
            every = int(value.removeprefix("sampled:"))
        except ValueError:
            every = 0
        if every >= 1:
            return "sampled", every
    raise ValueError(f"must be {', '.join(modes)} or sampled:N (N >= 1), got {text!r}")
