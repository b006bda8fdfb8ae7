"""Who is making the current RPC, for code far from gRPC (authorization, the audit trail).

The transport sets it once per call, before the handler runs, and resets it when the call ends. It lives
here rather than in transport/ so that the service layer and the audit code can read it without importing
gRPC.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

IdentityMethod = Literal["mtls", "jwt", "none"]


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one RPC.

    `name`: the client certificate's spiffe:// URI SAN (else its subject CN) for "mtls", the token's `sub`
    for "jwt", and "anonymous" for "none" (no identity was presented: development mode, or a refused call).
    """

    name: str
    method: IdentityMethod


ANONYMOUS = Principal(name="anonymous", method="none")

current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)
