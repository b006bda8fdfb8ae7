"""Who is calling: the principal of the RPC being served, set by the transport middleware once per call.

A ContextVar rather than an argument, so that the audit trail (and, later, anything else that must say who
acted) can read it without every service signature carrying a transport concept.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    method: str  # "mtls", "jwt" or "none"


current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)
