"""TokenSigner: JWTs (EdDSA with Ed25519 keys, ES256 with ECDSA P-256 keys) signed by the service.

The private key never leaves the service. Verification is local, with PyJWT: the
public key of each (key, version) is fetched from the service and cached for a
bounded time, so verifying a token on the gateway's hot path costs no call and a
key disabled in the service stops verifying within that time. A token's `kid`
header is "<key id>/<version>", so tokens signed before a rotation keep verifying.

API keys for storage: `seal_api_key` / `open_api_key` encrypt them under an
AES key, bound to their owner, so a sealed key copied to another owner does
not open.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jwt

from crypto_client._async.client import AsyncCryptoClient
from crypto_client._jwt import (
    INVALID,
    JWT_ALGORITHM,
    KID_VERSION,
    MAX_KEY_VERSION,
    MAX_TOKEN_CHARS,
    InvalidTokenError,
    VerificationKey,
    b64,
    jose_signature,
    numeric_date,
    verification_key,
)
from crypto_client._synchronization import AsyncLock
from crypto_client.errors import (
    CryptoClientError,
    FailedPreconditionError,
    InvalidArgumentError,
    KeyNotFoundError,
    PermissionDeniedError,
)


class _AsyncPublicKeyCache:
    """The public keys of one signing key's versions, fetched from the service and kept for a bounded time.

    - A fetched public key is used for `ttl_s`, then fetched again: GetPublicKey refuses a disabled key,
      so a key disabled in the service stops verifying tokens within `ttl_s`.
    - A refusal is remembered for `refusal_ttl_s`, so forged `kid`s cannot make each verification a call:
      a refused key (disabled, deleted, not a signing key) makes no further call until the refusal lapses;
      a version that does not exist costs one GetPublicKey and one GetKey (to learn the newest version;
      versions only grow), then every version above the newest is refused without a call until it lapses.
    - At most `max_versions` public keys are held, the least recently used dropped first.
    - One fetch at a time, so concurrent verifications of one unknown version make one call, not one each.
    Failures that say nothing about the key (the service unreachable, deadline, circuit open) are not
    remembered: the next verification asks again.
    """

    def __init__(
        self,
        client: AsyncCryptoClient,
        key_id: str,
        *,
        ttl_s: float,
        refusal_ttl_s: float,
        max_versions: int,
        clock: Callable[[], float],
        tenant_id: str | None,
    ) -> None:
        self._client = client
        self._key_id = key_id
        self._tenant_id = tenant_id
        self._ttl_s = ttl_s
        self._refusal_ttl_s = refusal_ttl_s
        self._max_versions = max_versions
        self._clock = clock
        self._keys: OrderedDict[int, VerificationKey] = OrderedDict()
        self._key_refused_at: float | None = None
        self._absent_from: tuple[int, float] | None = None  # (no version from this one up, learned at)
        self._lock = threading.Lock()  # guards the state above; never held during a call
        self._fetch_lock = AsyncLock()

    async def get(self, version: int) -> VerificationKey:
        """The public key of `version`, cached or fetched; InvalidTokenError if the service refuses it."""
        cached = self._cached(version)
        if cached is not None:
            return cached
        async with self._fetch_lock:
            cached = self._cached(version)  # another thread or task may have fetched (or been refused) meanwhile
            return cached if cached is not None else await self._fetch(version)

    def note_version_exists(self, version: int) -> None:
        """`version` exists (this process just signed with it): a remembered absence cannot cover it."""
        with self._lock:
            if self._absent_from is not None and self._absent_from[0] <= version:
                self._absent_from = (version + 1, self._absent_from[1])

    def _cached(self, version: int) -> VerificationKey | None:
        """The fresh cached key of `version`; None to fetch it; InvalidTokenError while a refusal holds."""
        now = self._clock()
        with self._lock:
            if self._key_refused_at is not None:
                if now - self._key_refused_at < self._refusal_ttl_s:
                    raise InvalidTokenError(INVALID)
                self._key_refused_at = None
            if self._absent_from is not None:
                lowest_absent, learned_at = self._absent_from
                if now - learned_at >= self._refusal_ttl_s:
                    self._absent_from = None
                elif version >= lowest_absent:
                    raise InvalidTokenError(INVALID)
            entry = self._keys.get(version)
            if entry is None:
                return None
            if now - entry.fetched_at >= self._ttl_s:
                del self._keys[version]
                return None
            self._keys.move_to_end(version)
            return entry

    async def _fetch(self, version: int) -> VerificationKey:
        try:
            public = await self._client.get_public_key(self._key_id, key_version=version, tenant_id=self._tenant_id)
        except InvalidArgumentError as error:  # the key has no such version
            await self._remember_absent(version)
            raise InvalidTokenError(INVALID) from error
        except (KeyNotFoundError, FailedPreconditionError, PermissionDeniedError) as error:
            with self._lock:
                self._key_refused_at = self._clock()
                self._keys.clear()  # every version of a refused key is refused
            raise InvalidTokenError(INVALID) from error
        except CryptoClientError as error:  # no answer about the key: remember nothing
            raise InvalidTokenError(INVALID) from error
        entry = verification_key(public, fetched_at=self._clock())
        with self._lock:
            self._keys[version] = entry
            self._keys.move_to_end(version)
            while len(self._keys) > self._max_versions:
                self._keys.popitem(last=False)
        return entry

    async def _remember_absent(self, version: int) -> None:
        """No version from `version` up exists (versions are 1..n and n only grows); asking for the newest
        version once lets a flood of made-up versions, in any order, cost no further call."""
        lowest_absent = version
        newest = await self._newest_version()
        if newest is not None:
            lowest_absent = min(lowest_absent, newest + 1)
        with self._lock:
            self._absent_from = (lowest_absent, self._clock())

    async def _newest_version(self) -> int | None:
        try:
            key = await self._client.get_key(self._key_id, use_cache=False, tenant_id=self._tenant_id)
        except CryptoClientError:
            return None  # the refusal alone still proved `version` and above absent
        return key.primary_version  # versions are 1 to the primary


class AsyncTokenSigner:
    """Signs JWTs with a signing key of the service and verifies them locally.

    Args:
        client: the client to call the service with.
        signing_key_id: an ED25519 (EdDSA) or ECDSA_P256_SHA256 (ES256) key.
        api_key_id: the AES key that seals API keys (`seal_api_key`), if used.
        audience: when set, `sign` adds it as `aud` (unless the claims carry one) and `verify` requires a
            token's `aud` to contain it. When not set, a token carrying an `aud` is refused.
        issuer: when set, `sign` adds it as `iss` (unless the claims carry one) and `verify` requires it.
        leeway_s: clock skew allowed when checking `exp`, `nbf` and `iat` (default 30 s).
        public_key_ttl_s: how long a fetched public key verifies before it is fetched again; the bound on
            how long a disabled key keeps verifying (default 5 minutes).
        refusal_ttl_s: how long an unknown or refused key (version) is remembered, so a flood of forged
            `kid`s costs the service a bounded number of calls (default 30 s).
        max_cached_versions: the most public keys held (default 64).
        clock: monotonic seconds for the cache lifetimes (injected by tests).
        tenant_id: the tenant both keys belong to (default: the client's).
    """

    def __init__(
        self,
        client: AsyncCryptoClient,
        signing_key_id: str,
        *,
        api_key_id: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 30.0,
        public_key_ttl_s: float = 300.0,
        refusal_ttl_s: float = 30.0,
        max_cached_versions: int = 64,
        clock: Callable[[], float] = time.monotonic,
        tenant_id: str | None = None,
    ) -> None:
        if not 0 <= leeway_s <= 300:
            raise ValueError("leeway_s must be between 0 and 300 seconds")
        if public_key_ttl_s <= 0 or refusal_ttl_s <= 0 or max_cached_versions < 1:
            raise ValueError("TokenSigner cache lifetimes and size must be positive")
        if audience == "" or issuer == "":
            raise ValueError("audience and issuer are None (not checked) or non-empty")
        self._client = client
        self._key_id = signing_key_id
        self._tenant_id = tenant_id
        self._api_key_id = api_key_id
        self._audience = audience
        self._issuer = issuer
        self._leeway_s = leeway_s
        self._public_keys = _AsyncPublicKeyCache(
            client,
            signing_key_id,
            ttl_s=public_key_ttl_s,
            refusal_ttl_s=refusal_ttl_s,
            max_versions=max_cached_versions,
            clock=clock,
            tenant_id=tenant_id,
        )

    async def sign(self, claims: Mapping[str, Any]) -> str:
        """A compact JWT of `claims` (plus the configured `iss`/`aud`), signed with the key's primary version.

        Raises:
            ValueError: the key is not an Ed25519 or ECDSA P-256 key.
            CryptoClientError: the service refused or could not sign.
        """
        key = await self._client.get_key(self._key_id, tenant_id=self._tenant_id)
        if key.algorithm not in JWT_ALGORITHM:
            raise ValueError(f"key {self._key_id} is {key.algorithm.value}; JWTs need ED25519 or ECDSA_P256_SHA256")
        body = dict(claims)
        if self._issuer is not None:
            body.setdefault("iss", self._issuer)
        if self._audience is not None:
            body.setdefault("aud", self._audience)
        payload = b64(json.dumps(body, separators=(",", ":")).encode())
        version = key.primary_version
        for _ in range(3):  # the primary may move under us (a rotation); re-sign with the right kid
            header = {"alg": JWT_ALGORITHM[key.algorithm], "typ": "JWT", "kid": f"{self._key_id}/{version}"}
            signing_input = f"{b64(json.dumps(header, separators=(',', ':')).encode())}.{payload}"
            signed = await self._client.sign(self._key_id, signing_input.encode(), tenant_id=self._tenant_id)
            if signed.key_version == version:
                self._public_keys.note_version_exists(version)
                return f"{signing_input}.{b64(jose_signature(signed.algorithm, signed.signature))}"
            version = signed.key_version
        raise RuntimeError("the signing key kept rotating while signing")

    async def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        """The claims of a token signed by this signer's key.

        Checks the signature with the public key of the version the `kid` names, under the one algorithm
        that key's type implies (never `none`, never HS*); `exp`, `nbf` and `iat` against `now` (default:
        the wall clock) with the configured leeway; `aud` and `iss` as configured.

        Raises:
            InvalidTokenError: for every reason a token does not verify, including a key (version) the
                service does not know or refuses, and a service that could not be asked for the public key.
        """
        try:
            if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
                raise InvalidTokenError(INVALID)
            version = self._kid_version(jwt.get_unverified_header(token).get("kid"))
            key = await self._public_keys.get(version)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.jwt_algorithm],
                audience=self._audience,
                issuer=self._issuer,
                # Times are checked below against an injectable `now`, with the same rules.
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
            self._check_times(claims, time.time() if now is None else now)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, OverflowError, RecursionError) as error:
            raise InvalidTokenError(INVALID) from error
        return claims

    def _kid_version(self, kid: object) -> int:
        """The version a `kid` of "<this key id>/<version>" names; other keys are refused without a call."""
        if not isinstance(kid, str):
            raise InvalidTokenError(INVALID)
        key_id, _, version_text = kid.rpartition("/")
        if key_id != self._key_id or not KID_VERSION.fullmatch(version_text):
            raise InvalidTokenError(INVALID)
        version = int(version_text)
        if version > MAX_KEY_VERSION:
            raise InvalidTokenError(INVALID)
        return version

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        """RFC 7519 NumericDates: `exp` must be after now, `nbf` and `iat` not after it (give or take leeway)."""
        leeway = self._leeway_s
        expires = numeric_date(claims, "exp")
        if expires is not None and now - leeway >= expires:
            raise InvalidTokenError(INVALID)
        for claim in ("nbf", "iat"):
            moment = numeric_date(claims, claim)
            if moment is not None and moment > now + leeway:
                raise InvalidTokenError(INVALID)

    # -- API keys at rest ---------------------------------------------------------------------

    async def seal_api_key(self, owner_id: str, api_key: str) -> bytes:
        aad = self._owner_aad(owner_id)
        return (
            await self._client.encrypt(self._api_key(), api_key.encode(), aad=aad, tenant_id=self._tenant_id)
        ).ciphertext

    async def open_api_key(self, owner_id: str, sealed: bytes) -> str:
        aad = self._owner_aad(owner_id)
        return (await self._client.decrypt(sealed, aad=aad, tenant_id=self._tenant_id)).plaintext.decode()

    def _api_key(self) -> str:
        if self._api_key_id is None:
            raise ValueError("TokenSigner(api_key_id=...) names the AES key for API keys")
        return self._api_key_id

    @staticmethod
    def _owner_aad(owner_id: str) -> bytes:
        return b"caas.gateway.api-key.v1\x00" + owner_id.encode()
