"""Who is calling: the principal of each RPC, from its client certificate or its bearer token.

- mTLS: the verified client certificate's `spiffe://` URI SAN (a SPIFFE X.509 SVID), else its subject CN.
  grpc only hands over a certificate it verified against CRYPTO_TLS_CLIENT_CA_FILE.
- Bearer JWT (`authorization: Bearer <JWT>`): verified with PyJWT against the public keys of a JWKS file
  (re-read on change): signature, `exp`/`nbf` with a small leeway, `iss` and `aud`. The principal is `sub`.
  A token, when present, is the call's identity (a per-call credential beats the connection's), and an
  invalid one is refused rather than ignored.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from crypto_server.call_context import ANONYMOUS, Principal, current_principal
from crypto_server.domain.errors import Unauthenticated
from crypto_server.watched_file import WatchedFile

__all__ = ["ANONYMOUS", "Principal", "TokenVerifier", "current_principal", "parse_jwks", "principal_of"]

_AUTHORIZATION = "authorization"
_BEARER = "bearer "
# Clock skew tolerated on exp/nbf/iat.
JWT_LEEWAY_S = 30
# Asymmetric algorithms only (no `none`, no HS*: a public key must never serve as an HMAC secret), each
# with the key type it needs, so the key decides and a token cannot pick another family.
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS256": (rsa.RSAPublicKey,),
    "ES256": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey,),
}
MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True, slots=True)
class _IssuerKey:
    algorithm: str
    key: object


def parse_jwks(raw: bytes) -> Mapping[str, _IssuerKey]:
    """The JWKS's public keys by `kid`. Raises ValueError for a set this server will not use."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from None
    except RecursionError:
        raise ValueError("nested too deeply to be a JWKS") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError("a JWKS needs a non-empty 'keys' list")
    keys: dict[str, _IssuerKey] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or not entry["kid"]:
            raise ValueError(f"keys[{index}] needs a 'kid'")
        if "d" in entry or entry.get("kty") == "oct":
            raise ValueError(f"keys[{index}] is a private or symmetric key; the JWKS holds issuer public keys only")
        algorithm = entry.get("alg")
        if algorithm not in _KEY_TYPES:
            raise ValueError(f"keys[{index}] needs 'alg' set to one of {', '.join(_KEY_TYPES)}")
        try:
            public = jwt.PyJWK(entry, algorithm).key
        except jwt.PyJWTError as error:
            raise ValueError(f"keys[{index}]: {error}") from None
        if not isinstance(public, _KEY_TYPES[algorithm]):
            raise ValueError(f"keys[{index}]: a {entry.get('kty')} key cannot be used with {algorithm}")
        keys[entry["kid"]] = _IssuerKey(algorithm, public)
    return keys


class TokenVerifier:
    """Verifies bearer JWTs of one issuer for one audience."""

    def __init__(self, jwks: WatchedFile[Mapping[str, _IssuerKey]], *, issuer: str, audience: str) -> None:
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience

    def subject(self, token: str) -> str:
        """The token's `sub`, once every check passed. Raises Unauthenticated."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("the bearer token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is not a JWT") from None
        kid = header.get("kid")
        issuer_key = self._jwks.current().get(kid) if isinstance(kid, str) else None
        # The key's own algorithm, never the header's choice: `alg: none` or HS256 over an RSA key fail here.
        if issuer_key is None or header.get("alg") != issuer_key.algorithm:
            raise Unauthenticated("the bearer token is not signed by a key of the configured issuer")
        try:
            claims = jwt.decode(
                token,
                key=issuer_key.key,  # type: ignore[arg-type]
                algorithms=[issuer_key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=JWT_LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the bearer token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the bearer token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the bearer token is from another issuer") from None
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is invalid (signature or claims)") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("the bearer token has no subject")
        return subject


def _bearer_token(context: grpc.ServicerContext) -> str | None:
    for name, value in context.invocation_metadata():
        if name == _AUTHORIZATION:
            if not isinstance(value, str) or not value[: len(_BEARER)].lower() == _BEARER:
                raise Unauthenticated("the authorization header must be 'Bearer <JWT>'")
            return value[len(_BEARER) :].strip()
    return None


@functools.lru_cache(maxsize=1024)
def certificate_principal(pem: bytes) -> str:
    """The principal a verified client certificate names: its one spiffe:// URI SAN, else its subject CN."""
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe_ids = [
            uri for uri in names.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")
        ]
    except x509.ExtensionNotFound:
        spiffe_ids = []
    if len(spiffe_ids) > 1:
        raise Unauthenticated("the client certificate names several SPIFFE ids")
    if spiffe_ids:
        return spiffe_ids[0]
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common_names and isinstance(common_names[0].value, str) and common_names[0].value:
        return common_names[0].value
    raise Unauthenticated("the client certificate names neither a SPIFFE id nor a common name")


def principal_of(context: grpc.ServicerContext, tokens: TokenVerifier | None = None) -> Principal:
    """The caller of this RPC; ANONYMOUS when it presented nothing. Raises Unauthenticated for an identity
    presented but not valid (a bad token, or a token when this server verifies none)."""
    token = _bearer_token(context)
    if token is not None:
        if tokens is None:
            raise Unauthenticated("this server accepts no bearer tokens (CRYPTO_JWKS_FILE is not set)")
        return Principal(tokens.subject(token), "jwt")
    certificates = context.auth_context().get("x509_pem_cert")
    if certificates:
        return Principal(certificate_principal(certificates[0]), "mtls")
    return ANONYMOUS
