"""Access tokens (JWT, HS256 pinned) and opaque token hashing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from structlog.testing import capture_logs

from service.domain.auth.tokens import (
    AUDIENCE,
    ISSUER,
    AccessTokens,
    AuthUser,
    InvalidToken,
    hash_token,
    new_opaque_token,
)
from service.settings import Settings

SECRET = "unit-test-secret-that-is-long-enough-0123456789"
USER = AuthUser(uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), is_admin=False)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(USER.id),
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": uuid.uuid4().hex,
        "typ": "access",
        "adm": False,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hmac_token(
    header: dict[str, Any], claims: dict[str, Any], secret: str = SECRET, digest: Any = hashlib.sha256
) -> str:
    """A token with any header, HMAC-signed by hand (PyJWT refuses to write some of these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture
def tokens() -> AccessTokens:
    return AccessTokens(SECRET, ttl_seconds=900, leeway_seconds=0)


def test_round_trip_carries_the_required_claims(tokens: AccessTokens) -> None:
    """An issued token decodes to its user and carries iss, aud, sub, iat, exp = iat + ttl,
    a unique jti and typ=access, signed with HS256."""
    admin = AuthUser(uuid.uuid4(), is_admin=True)
    issued = tokens.issue(admin)
    assert tokens.decode(issued.token) == admin
    assert issued.expires_in == 900
    header = jwt.get_unverified_header(issued.token)
    assert header["alg"] == "HS256"
    claims = jwt.decode(issued.token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["iss"] == "vigil" and claims["aud"] == "vigil-api" and claims["typ"] == "access"
    assert claims["sub"] == str(admin.id) and claims["jti"] == issued.jti and claims["adm"] is True
    assert claims["exp"] - claims["iat"] == 900
    assert tokens.issue(admin).jti != issued.jti


def test_expired_token_is_refused_as_expired(tokens: AccessTokens) -> None:
    """A token past its exp is refused with reason 'expired'."""
    old = tokens.issue(USER, now=datetime.now(UTC) - timedelta(hours=1), ttl_seconds=60)
    with pytest.raises(InvalidToken) as err:
        tokens.decode(old.token)
    assert err.value.reason == "expired"


def test_leeway_tolerates_small_clock_skew() -> None:
    """With the default 5 s leeway a token that expired 2 s ago still passes (instances' clocks differ)."""
    skewed = AccessTokens(SECRET, ttl_seconds=60)
    token = skewed.issue(USER, now=datetime.now(UTC) - timedelta(seconds=62), ttl_seconds=60).token
    assert skewed.decode(token) == USER


def test_token_from_another_secret_is_refused(tokens: AccessTokens) -> None:
    """A token signed with a different key is invalid."""
    other = AccessTokens("another-secret-that-is-also-long-enough-xyz", 900)
    with pytest.raises(InvalidToken) as err:
        tokens.decode(other.issue(USER).token)
    assert err.value.reason == "invalid"


def test_changed_payload_or_signature_is_refused(tokens: AccessTokens) -> None:
    """Swapping the payload (another sub, same signature) or flipping the signature is refused."""
    head, _, sig = tokens.issue(USER).token.split(".")
    forged_payload = _b64(json.dumps(_claims(sub=str(uuid.uuid4()))).encode())
    with pytest.raises(InvalidToken):
        tokens.decode(f"{head}.{forged_payload}.{sig}")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    with pytest.raises(InvalidToken):
        tokens.decode(f"{head}.{tokens.issue(USER).token.split('.')[1]}.{flipped}")


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(_hmac_token({"alg": "none", "typ": "JWT"}, _claims()).rsplit(".", 1)[0] + ".", id="alg-none"),
        pytest.param(_hmac_token({"alg": "None", "typ": "JWT"}, _claims()).rsplit(".", 1)[0] + ".", id="alg-None"),
        pytest.param(_hmac_token({"alg": "HS512", "typ": "JWT"}, _claims(), digest=hashlib.sha512), id="HS512"),
        pytest.param(_hmac_token({"alg": "RS256", "typ": "JWT"}, _claims()), id="RS256-header-HMAC-signature"),
        pytest.param(_hmac_token({"typ": "JWT"}, _claims()), id="no-alg"),
    ],
)
def test_algorithm_other_than_hs256_is_refused(tokens: AccessTokens, token: str) -> None:
    """alg none, HS512 (even with the right key), an RS256 header over an HMAC signature
    (algorithm confusion) and a missing alg are all refused: the algorithm is pinned."""
    with pytest.raises(InvalidToken) as err:
        tokens.decode(token)
    assert err.value.reason == "invalid"


def test_hand_made_hs256_token_is_accepted(tokens: AccessTokens) -> None:
    """Control for the tests above: the same hand-made construction with HS256 is valid."""
    assert tokens.decode(_hmac_token({"alg": "HS256", "typ": "JWT"}, _claims())) == USER


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"exp": None}, id="no-exp"),
        pytest.param({"iat": None}, id="no-iat"),
        pytest.param({"sub": None}, id="no-sub"),
        pytest.param({"jti": None}, id="no-jti"),
        pytest.param({"iss": None}, id="no-iss"),
        pytest.param({"aud": None}, id="no-aud"),
        pytest.param({"iss": "someone-else"}, id="wrong-iss"),
        pytest.param({"aud": "another-api"}, id="wrong-aud"),
        pytest.param({"typ": "refresh"}, id="wrong-typ"),
        pytest.param({"typ": None}, id="no-typ"),
        pytest.param({"sub": "not-a-uuid"}, id="sub-not-uuid"),
        pytest.param({"iat": int((datetime.now(UTC) + timedelta(hours=1)).timestamp())}, id="iat-in-future"),
    ],
)
def test_missing_or_wrong_claims_are_refused(tokens: AccessTokens, overrides: dict[str, Any]) -> None:
    """exp, iat, sub, jti, iss and aud are required; issuer, audience and typ must match; sub
    must be a user id; a token issued in the future is refused."""
    with pytest.raises(InvalidToken):
        tokens.decode(_hmac_token({"alg": "HS256", "typ": "JWT"}, _claims(**overrides)))


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9..", "🙂.🙂.🙂"])
def test_garbage_is_refused_not_crashed(tokens: AccessTokens, garbage: str) -> None:
    """Malformed tokens raise InvalidToken, never another exception."""
    with pytest.raises(InvalidToken):
        tokens.decode(garbage)


def test_empty_secret_gets_an_ephemeral_key_and_a_warning() -> None:
    """Without VIGIL_JWT_SECRET (development) a random key is generated per token service and
    jwt_secret_ephemeral is logged; tokens of one do not verify with another."""
    settings = Settings(env="development", jwt_secret="")
    with capture_logs() as logs:
        first = AccessTokens.from_settings(settings)
        second = AccessTokens.from_settings(settings)
    assert [e["event"] for e in logs].count("jwt_secret_ephemeral") == 2
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "jwt_secret_ephemeral")
    token = first.issue(USER).token
    assert first.decode(token) == USER
    with pytest.raises(InvalidToken):
        second.decode(token)


def test_configured_secret_is_used_without_warning() -> None:
    """With a secret, tokens from one service verify with another built from the same settings."""
    settings = Settings(env="test", jwt_secret=SECRET)
    with capture_logs() as logs:
        a, b = AccessTokens.from_settings(settings), AccessTokens.from_settings(settings)
    assert not [e for e in logs if e["event"] == "jwt_secret_ephemeral"]
    assert b.decode(a.issue(USER).token) == USER


def test_opaque_tokens_are_random_and_stored_as_sha256() -> None:
    """Opaque tokens carry 256 bits (43 URL-safe characters) and differ every time; their stored
    form is the hex SHA-256, deterministic and never the token itself."""
    a, b = new_opaque_token(), new_opaque_token()
    assert a != b and len(a) >= 43
    assert set(a) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert hash_token(a) == hashlib.sha256(a.encode()).hexdigest() == hash_token(a)
    assert len(hash_token(a)) == 64 and hash_token(a) != a
