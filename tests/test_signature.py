"""Tencent's webhook signature: its test vectors, rotation, and the four ways a check fails."""

from __future__ import annotations

import pytest

from bridge.errors import (
    MalformedSignature,
    MissingSignature,
    SignatureMismatch,
    StaleSignature,
    Unauthorized,
)
from bridge.secret import CallbackToken, Secret
from bridge.tencent.signature import SignatureCheck, expected_sign

APP = "1400000000"
# (token, RequestTime, Sign) from protocol.md; the first is Tencent's own sample.
VECTORS = [
    ("xxxxyyyy", "1669872112", "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"),
    ("my_token", "1700000000", "63b7452c43a5ccb94a07b830e8480f3d7a6d0de52a844288e48a3a4295affb4d"),
]


def check_at(now: float, *tokens: str, skew: float = 60.0) -> SignatureCheck:
    return SignatureCheck(tuple(Secret(t) for t in tokens), skew, clock=lambda: now)


@pytest.mark.parametrize(("token", "request_time", "sign"), VECTORS)
def test_tencents_test_vectors_give_tencents_sign(token: str, request_time: str, sign: str) -> None:
    assert expected_sign(token, request_time) == sign


@pytest.mark.parametrize(("token", "request_time", "sign"), VECTORS)
def test_a_test_vector_is_accepted_in_lower_and_upper_case(token: str, request_time: str, sign: str) -> None:
    check = check_at(int(request_time), token)
    check.verify(sign, request_time, APP)
    check.verify(sign.upper(), request_time, APP)


def test_during_a_rotation_either_token_is_accepted() -> None:
    (old, time_a, sign_a), (new, time_b, sign_b) = VECTORS
    check_at(int(time_a), old, new).verify(sign_a, time_a, APP)
    check_at(int(time_b), old, new).verify(sign_b, time_b, APP)


def test_the_sign_covers_requesttime_exactly_as_received() -> None:
    """A leading zero changes the hashed string although it is the same instant."""
    token, request_time, sign = VECTORS[1]
    with pytest.raises(SignatureMismatch):
        check_at(int(request_time), token).verify(sign, "0" + request_time, APP)


@pytest.mark.parametrize(
    ("sign", "request_time"),
    [(None, "1700000000"), (VECTORS[1][2], None), (None, None)],
    ids=["no Sign", "no RequestTime", "neither"],
)
def test_a_missing_sign_or_requesttime_fails_as_missing(sign: str | None, request_time: str | None) -> None:
    with pytest.raises(MissingSignature, match="signature missing"):
        check_at(1_700_000_000, "my_token").verify(sign, request_time, APP)


@pytest.mark.parametrize(
    ("sign", "request_time"),
    [
        ("63b7452c", "1700000000"),
        ("z" * 64, "1700000000"),
        (VECTORS[1][2] + "00", "1700000000"),
        (VECTORS[1][2], "-1700000000"),
        (VECTORS[1][2], "1700000000.0"),
        (VECTORS[1][2], "1" * 13),
        (VECTORS[1][2], ""),
    ],
)
def test_a_sign_that_is_not_sha256_hex_or_a_time_that_is_not_seconds_fails_as_malformed(
    sign: str, request_time: str
) -> None:
    with pytest.raises(MalformedSignature, match="signature malformed"):
        check_at(1_700_000_000, "my_token").verify(sign, request_time, APP)


@pytest.mark.parametrize("offset", [-61, 61, -86400, 10**9])
def test_a_requesttime_beyond_the_allowed_skew_either_way_fails_as_stale(offset: int) -> None:
    token, request_time, sign = VECTORS[1]
    with pytest.raises(StaleSignature, match=r"signature stale.*more than the 60 s allowed"):
        check_at(int(request_time) + offset, token).verify(sign, request_time, APP)


@pytest.mark.parametrize("offset", [-60, 0, 60])
def test_a_requesttime_within_the_skew_either_way_is_accepted(offset: int) -> None:
    token, request_time, sign = VECTORS[1]
    check_at(int(request_time) + offset, token).verify(sign, request_time, APP)


def test_a_sign_made_with_another_token_fails_as_a_mismatch_naming_neither_token_nor_digest() -> None:
    _token, request_time, sign = VECTORS[1]
    with pytest.raises(SignatureMismatch, match="signature mismatch") as failure:
        check_at(int(request_time), "the-real-token").verify(sign, request_time, APP)
    info = failure.value.info
    assert "the-real-token" not in info
    assert expected_sign("the-real-token", request_time) not in info
    assert sign not in info


def test_every_failure_is_a_401_with_its_own_error_code() -> None:
    kinds = (MissingSignature, MalformedSignature, StaleSignature, SignatureMismatch)
    assert all(issubclass(kind, Unauthorized) and kind.status == 401 for kind in kinds)
    assert len({kind.error_code for kind in kinds}) == 4


def test_a_secret_never_shows_its_value_when_printed() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in f"{secret} {secret!r} {secret:>20} {[secret]} {(secret,)}"
    assert secret.reveal() == "hunter2"
    assert "hunter2" not in repr(check_at(0, "hunter2"))


def test_a_token_bound_to_an_app_signs_for_that_app_only() -> None:
    token, request_time, sign = VECTORS[1]
    check = SignatureCheck((CallbackToken(token, "1400000001"),), 60.0, clock=lambda: int(request_time))
    check.verify(sign, request_time, "1400000001")
    with pytest.raises(SignatureMismatch) as refused:
        check.verify(sign, request_time, "1400000002")
    assert refused.value.info == (
        "signature mismatch: 'Sign' does not match any token configured for SdkAppid 1400000002"
    )


def test_a_bare_token_signs_for_any_app_beside_tokens_bound_to_apps() -> None:
    _token, request_time, sign = VECTORS[1]
    tokens = (CallbackToken("app-one-token", "1400000001"), CallbackToken("my_token"), Secret("old-bare"))
    check = SignatureCheck(tokens, 60.0, clock=lambda: int(request_time))
    for app in ("1400000001", "1400000002", "1400009999"):
        check.verify(sign, request_time, app)
    app_one = expected_sign("app-one-token", request_time)
    check.verify(app_one, request_time, "1400000001")
    with pytest.raises(SignatureMismatch):
        check.verify(app_one, request_time, "1400000002")


def test_a_token_bound_to_an_app_prints_its_app_but_never_its_value() -> None:
    token = CallbackToken("s3cr3t-value", "1400000001")
    assert "s3cr3t-value" not in f"{token} {token!r} {[token]}"
    assert "1400000001" in repr(token)
    assert token != CallbackToken("s3cr3t-value", "1400000002")
    assert token != CallbackToken("s3cr3t-value")
