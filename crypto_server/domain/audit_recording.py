"""Which crypto-operation calls the audit trail records (CRYPTO_AUDIT_CRYPTO)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CryptoRecording:
    """Which crypto-operation calls are recorded (CRYPTO_AUDIT_CRYPTO)."""

    mode: str  # "all", "denied_only", "sampled" or "none"
    every: int = 1

    @classmethod
    def parse(cls, text: str) -> CryptoRecording:
        """Raises ValueError with a message naming the accepted forms."""
        value = text.strip().lower()
        if value in {"all", "denied_only", "none"}:
            return cls(value)
        if value.startswith("sampled:"):
            try:
                every = int(value.removeprefix("sampled:"))
            except ValueError:
                every = 0
            if every >= 1:
                return cls("sampled", every)
        raise ValueError(f"must be all, denied_only, sampled:N (N >= 1) or none, got {text!r}")

    def __str__(self) -> str:
        return f"sampled:{self.every}" if self.mode == "sampled" else self.mode
