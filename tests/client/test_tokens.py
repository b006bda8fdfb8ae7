"""TokenSigner verification against a real server: forged tokens, the public-key cache's bounds, claims.

Each test performs an attack (a forged kid, a disabled key's cached public key, algorithm confusion,
unparseable or wrong claims) and shows it is refused with InvalidTokenError, and at what cost in calls.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator

import grpc
import jwt
import pytest

from crypto_client import Algorithm, CryptoClient, InvalidTokenError, TokenSigner
from crypto_client.tokens import MAX_TOKEN_CHARS
from tests.client.faults import Fault, FaultInjector
from tests.conftest import ServerHandle, Ticks

NOW = 1_800_000_000.0  # the wall-clock time tokens are checked at (verify's `now`)


@pytest.fixture
def crypto(faulty_server: ServerHandle) -> Iterator[CryptoClient]:
    with CryptoClient(faulty_server.address, "acme") as client:
        yield client


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


@pytest.fixture
def key_id(crypto: CryptoClient) -> str:
    return crypto.create_key(algorithm=Algorithm.ED25519).key_id


@pytest.fixture
def signer(crypto: CryptoClient, key_id: str, ticks: Ticks) -> TokenSigner:
    return TokenSigner(crypto, key_id, clock=ticks)


def _b64(data: bytes) -> str:
    return jwt.utils.base64url_encode(data).decode()


def _json_b64(value: object) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _with_header(token: str, **changes: object) -> str:
    """`token` with its header changed (its signature no longer matches, which must not matter)."""
    _, payload_b64, signature_b64 = token.split(".")
    header = {**jwt.get_unverified_header(token), **changes}
    return f"{_json_b64(header)}.{payload_b64}.{signature_b64}"


def _calls(faults: FaultInjector) -> int:
    return faults.attempts["GetPublicKey"] + faults.attempts["GetKey"]


def test_a_valid_token_verifies_with_its_audience_and_issuer(crypto: CryptoClient, key_id: str) -> None:
    signer = TokenSigner(crypto, key_id, audience="gateway", issuer="caas-auth")
    token = signer.sign({"sub": "user-1", "exp": NOW + 60, "nbf": NOW, "iat": NOW})
    claims = signer.verify(token, now=NOW)
    assert claims == {"sub": "user-1", "exp": NOW + 60, "nbf": NOW, "iat": NOW, "iss": "caas-auth", "aud": "gateway"}
    assert jwt.get_unverified_header(token)["kid"] == f"{key_id}/1", "the kid format is unchanged"
    assert signer.verify(token, now=NOW + 60 + 29)["sub"] == "user-1", "30 s leeway for clock skew"
    assert signer.verify(token, now=NOW - 29)["sub"] == "user-1"


@pytest.mark.parametrize("versions", [[999] * 20, list(range(999, 979, -1)), [2, 7, 2**31, 4_294_967_295, 3]])
def test_forged_kid_versions_are_invalid_tokens_and_cost_one_lookup(
    signer: TokenSigner, key_id: str, faults: FaultInjector, ticks: Ticks, versions: list[int]
) -> None:
    token = signer.sign({"sub": "admin"})
    before, public_keys_before = _calls(faults), faults.attempts["GetPublicKey"]
    for version in versions:
        with pytest.raises(InvalidTokenError):  # was InvalidArgumentError from the service, one call each
            signer.verify(_with_header(token, kid=f"{key_id}/{version}"))
    assert faults.attempts["GetPublicKey"] - public_keys_before == 1
    assert _calls(faults) - before <= 2, "one GetPublicKey refused, one GetKey to learn the newest version"
    assert signer.verify(token)["sub"] == "admin", "the real version still verifies"
    ticks.now += 30
    refused_again = _calls(faults)
    with pytest.raises(InvalidTokenError):
        signer.verify(_with_header(token, kid=f"{key_id}/999"))
    assert _calls(faults) > refused_again, "the refusal is remembered for 30 s only"


@pytest.mark.parametrize(
    "kid", ["{key}/0", "{key}/-1", "{key}/1e3", "{key}/01", "{key}/\u0661", "{key}/4294967296", "{key}", "other/1", 7]
)
def test_malformed_or_foreign_kids_are_refused_without_a_call(
    signer: TokenSigner, key_id: str, faults: FaultInjector, kid: object
) -> None:
    token = signer.sign({"sub": "admin"})
    before = _calls(faults)
    forged_kid = kid.format(key=key_id) if isinstance(kid, str) else kid
    with pytest.raises(InvalidTokenError):
        signer.verify(_with_header(token, kid=forged_kid))
    assert _calls(faults) == before


def test_concurrent_forgeries_of_one_version_make_one_call(
    signer: TokenSigner, key_id: str, faults: FaultInjector
) -> None:
    forged = _with_header(signer.sign({"sub": "admin"}), kid=f"{key_id}/999")
    faults.plan("GetPublicKey", Fault(delay_s=0.3))  # the first lookup is slow; the others arrive meanwhile
    outcomes: list[BaseException | None] = []

    def attempt() -> None:
        try:
            signer.verify(forged)
            outcomes.append(None)
        except Exception as error:
            outcomes.append(error)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == 8 and all(isinstance(o, InvalidTokenError) for o in outcomes)
    assert faults.attempts["GetPublicKey"] == 1


def test_a_disabled_key_stops_verifying_within_the_public_key_lifetime(
    crypto: CryptoClient, signer: TokenSigner, key_id: str, faults: FaultInjector, ticks: Ticks
) -> None:
    token = signer.sign({"sub": "user-1"})
    assert signer.verify(token)["sub"] == "user-1"
    crypto.disable_key(key_id)
    ticks.now += 299
    assert signer.verify(token)["sub"] == "user-1", "the cached public key verifies for its 5 minute lifetime"
    ticks.now += 1
    with pytest.raises(InvalidTokenError):
        signer.verify(token)  # fetched again: GetPublicKey refuses a disabled key
    refused = faults.attempts["GetPublicKey"]
    for _ in range(10):
        with pytest.raises(InvalidTokenError):
            signer.verify(token)
    assert faults.attempts["GetPublicKey"] == refused, "the refusal is remembered"
    crypto.enable_key(key_id)
    ticks.now += 30
    assert signer.verify(token)["sub"] == "user-1", "an enabled key verifies again once the refusal lapses"


def test_a_service_without_an_answer_is_not_remembered_as_a_refusal(signer: TokenSigner, faults: FaultInjector) -> None:
    token = signer.sign({"sub": "user-1"})
    faults.plan("GetPublicKey", Fault(code=grpc.StatusCode.INTERNAL))
    with pytest.raises(InvalidTokenError):
        signer.verify(token)
    assert signer.verify(token)["sub"] == "user-1"


def test_a_version_signed_after_a_forgery_named_it_still_verifies(
    crypto: CryptoClient, signer: TokenSigner, key_id: str
) -> None:
    token = signer.sign({"sub": "user-1"})
    with pytest.raises(InvalidTokenError):
        signer.verify(_with_header(token, kid=f"{key_id}/2"))  # version 2 does not exist yet
    crypto.rotate_key(key_id)
    rotated = signer.sign({"sub": "user-2"})
    assert jwt.get_unverified_header(rotated)["kid"] == f"{key_id}/2"
    assert signer.verify(rotated)["sub"] == "user-2"


def _forgeries(crypto: CryptoClient, key_id: str, signer: TokenSigner) -> dict[str, str]:
    """Tokens an attacker can make from a genuine token and the public key."""
    genuine = signer.sign({"sub": "user-1", "exp": NOW + 60})
    header_b64, payload_b64, signature_b64 = genuine.split(".")
    header = jwt.get_unverified_header(genuine)
    admin_b64 = _json_b64({"sub": "admin", "exp": NOW + 60})
    pem = crypto.get_public_key(key_id).pem.encode()

    def hs256(secret: bytes) -> str:
        signing_input = f"{_json_b64({**header, 'alg': 'HS256'})}.{admin_b64}"
        return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"

    signature = bytearray(jwt.utils.base64url_decode(signature_b64))
    signature[0] ^= 1
    return {
        "tampered payload": f"{header_b64}.{admin_b64}.{signature_b64}",
        "tampered signature": f"{header_b64}.{payload_b64}.{_b64(bytes(signature))}",
        "no signature": f"{header_b64}.{payload_b64}.",
        "alg none": f"{_json_b64({**header, 'alg': 'none'})}.{admin_b64}.",
        "alg HS256 keyed with the public key PEM": hs256(pem),
        "alg HS256 keyed with the PEM, stripped": hs256(pem.strip()),
        "alg ES256 on an Ed25519 key": _with_header(genuine, alg="ES256"),
        "no kid": f"{_json_b64({'alg': 'EdDSA', 'typ': 'JWT'})}.{payload_b64}.{signature_b64}",
        "header not JSON": f"{_b64(b'{')}.{payload_b64}.{signature_b64}",
        "header nested too deep": f"{_b64(b'[' * 5000)}.{payload_b64}.{signature_b64}",
        "over the size bound": genuine + "A" * MAX_TOKEN_CHARS,
        "two parts": f"{header_b64}.{payload_b64}",
        "not base64": f"{header_b64}.{payload_b64}.!!!",
        "empty": "",
    }


@pytest.mark.parametrize(
    "name",
    [
        "tampered payload",
        "tampered signature",
        "no signature",
        "alg none",
        "alg HS256 keyed with the public key PEM",
        "alg HS256 keyed with the PEM, stripped",
        "alg ES256 on an Ed25519 key",
        "no kid",
        "header not JSON",
        "header nested too deep",
        "over the size bound",
        "two parts",
        "not base64",
        "empty",
    ],
)
def test_forged_tokens_are_invalid(crypto: CryptoClient, key_id: str, signer: TokenSigner, name: str) -> None:
    forged = _forgeries(crypto, key_id, signer)[name]
    with pytest.raises(InvalidTokenError):
        signer.verify(forged, now=NOW)


def test_a_tampered_es256_token_is_invalid(crypto: CryptoClient, ticks: Ticks) -> None:
    signer = TokenSigner(crypto, crypto.create_key(algorithm=Algorithm.ECDSA_P256_SHA256).key_id, clock=ticks)
    token = signer.sign({"sub": "user-1"})
    assert signer.verify(token)["sub"] == "user-1"
    header_b64, _, signature_b64 = token.split(".")
    with pytest.raises(InvalidTokenError):
        signer.verify(f"{header_b64}.{_json_b64({'sub': 'admin'})}.{signature_b64}")
    with pytest.raises(InvalidTokenError):
        signer.verify(_with_header(token, alg="EdDSA"))


Claims = dict[str, object]


@pytest.mark.parametrize(
    ("claims", "verifier"),
    [
        pytest.param({"exp": NOW - 31}, {}, id="expired beyond the leeway"),
        pytest.param({"exp": NOW}, {"leeway_s": 0}, id="expired at exp"),
        pytest.param({"nbf": NOW + 31}, {}, id="not yet valid"),
        pytest.param({"iat": NOW + 31}, {}, id="issued in the future"),
        pytest.param({"exp": "soon"}, {}, id="non-numeric exp"),
        pytest.param({"exp": str(int(NOW + 60))}, {}, id="exp as a numeric string"),
        pytest.param({"exp": True}, {}, id="exp as a boolean"),
        pytest.param({"exp": 10**400}, {}, id="exp beyond a float"),
        pytest.param({"nbf": [1]}, {}, id="non-numeric nbf"),
        pytest.param({"aud": "billing"}, {"audience": "gateway"}, id="wrong aud"),
        pytest.param({}, {"audience": "gateway"}, id="missing aud"),
        pytest.param({"aud": "gateway"}, {}, id="aud not expected"),
        pytest.param({"iss": "someone-else"}, {"issuer": "caas-auth"}, id="wrong iss"),
        pytest.param({}, {"issuer": "caas-auth"}, id="missing iss"),
        pytest.param({"sub": 42}, {}, id="non-string sub"),
    ],
)
def test_tokens_with_unacceptable_claims_are_invalid(
    crypto: CryptoClient, key_id: str, signer: TokenSigner, claims: Claims, verifier: dict[str, object]
) -> None:
    token = signer.sign(claims)  # genuinely signed: only the claims are wrong
    strict = TokenSigner(crypto, key_id, **verifier)
    with pytest.raises(InvalidTokenError):
        strict.verify(token, now=NOW)


@pytest.mark.parametrize(
    "make",
    [
        lambda c, k: TokenSigner(c, k, leeway_s=-1),
        lambda c, k: TokenSigner(c, k, public_key_ttl_s=0),
        lambda c, k: TokenSigner(c, k, refusal_ttl_s=0),
        lambda c, k: TokenSigner(c, k, max_cached_versions=0),
        lambda c, k: TokenSigner(c, k, audience=""),
    ],
)
def test_settings_are_checked_at_construction(
    crypto: CryptoClient, key_id: str, make: Callable[[CryptoClient, str], TokenSigner]
) -> None:
    with pytest.raises(ValueError):
        make(crypto, key_id)
