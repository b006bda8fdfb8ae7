"""Which crypto-operation calls the audit trail records (CRYPTO_AUDIT_CRYPTO)."""

from __future__ import annotations

from dataclasses import dataclass

from crypto_server.domain.sampling import parse_sampling


@dataclass(frozen=True, slots=True)
class CryptoRecording:
    """Which crypto-operation calls are recorded (CRYPTO_AUDIT_CRYPTO)."""

    mode: str  # "all", "denied_only", "sampled" or "none"
    every: int = 1

    @classmethod
    def parse(cls, text: str) -> CryptoRecording:
        """Raises ValueError with a message naming the accepted forms."""
        return cls(*parse_sampling(text, ("all", "denied_only", "none")))

    def __str__(self) -> str:
        return f"sampled:{self.every}" if self.mode == "sampled" else self.mode
