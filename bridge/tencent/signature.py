"""Tencent's webhook authentication: the `Sign` and `RequestTime` query parameters.

With a token set in the Tencent console, Tencent appends `RequestTime` (Unix seconds) and
`Sign` = lowercase hex SHA-256 of token + `RequestTime` (the exact string in the URL) to every callback URL.
It is a plain hash, not an HMAC, and covers neither the body nor the app: it proves the sender knows the
token, and `RequestTime` bounds how long a captured URL can be replayed. So a token bound to an app
(`CallbackToken.sdk_app_id`, from `--callback-token APPID=TOKEN`) signs only callbacks naming that app in
`SdkAppid`; a bare token signs for any.

The check runs on the query alone, before the body is read, so a request without a valid signature costs
the bridge a hash per configured token and nothing more. Its errors say which check failed, never the
token or the expected digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.errors import MalformedSignature, MissingSignature, SignatureMismatch, StaleSignature
from bridge.secret import CallbackToken, Secret

SIGN = "Sign"
REQUEST_TIME = "RequestTime"
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Unix seconds: ten digits until the year 2286; twelve leave room without letting a huge number through.
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")


def expected_sign(token: str, request_time: str) -> str:
    """Tencent's `Sign` for `token` and the `RequestTime` string exactly as it appears in the URL."""
    return hashlib.sha256((token + request_time).encode("utf-8")).hexdigest()


def _signs_for(token: Secret, sdk_app_id: str) -> bool:
    return token.signs_for(sdk_app_id) if isinstance(token, CallbackToken) else True


@dataclass(slots=True)
class SignatureCheck:
    """Accepts a callback signed with one of `tokens` (several during a rotation) that signs for its app,
    at most `max_clock_skew` seconds from now, in either direction.

    `replace_tokens` swaps the whole set at once (a token file read again on SIGHUP): `verify` runs on the
    event loop without awaiting, so each check sees either the old set or the new one, never a mix.
    """

    tokens: Sequence[Secret]
    max_clock_skew: float
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def replace_tokens(self, tokens: Sequence[Secret]) -> None:
        """From now on, accept callbacks signed with one of `tokens` (not empty) instead."""
        if not tokens:
            raise ValueError("a signature check needs at least one token")
        self.tokens = tuple(tokens)

    def verify(self, sign: str | None, request_time: str | None, sdk_app_id: str) -> None:
        """Return if the signature is valid for `sdk_app_id`; else raise the `Unauthorized` naming the
        failed check."""
        if sign is None or request_time is None:
            absent = " and ".join(
                repr(name) for name, value in ((SIGN, sign), (REQUEST_TIME, request_time)) if value is None
            )
            raise MissingSignature(
                f"signature missing: the query has no {absent}; this bridge accepts only callbacks signed "
                "with a webhook authentication token (set it in the Tencent Cloud Chat console)"
            )
        if not _UNIX_SECONDS.fullmatch(request_time):
            raise MalformedSignature("signature malformed: 'RequestTime' must be Unix seconds")
        if not _HEX_SHA256.fullmatch(sign):
            raise MalformedSignature("signature malformed: 'Sign' must be 64 hexadecimal digits (SHA-256)")
        skew = abs(self.clock() - int(request_time))
        if skew > self.max_clock_skew:
            raise StaleSignature(
                f"signature stale: 'RequestTime' is {skew:.0f} s from the bridge's clock, more than "
                f"the {self.max_clock_skew:g} s allowed (--max-clock-skew)"
            )
        received = sign.lower().encode("ascii")
        matched = False
        # Every token, whichever app it signs for and match or not: the time taken says nothing of which
        # token matched, nor of which apps have tokens of their own.
        for token in self.tokens:
            same = hmac.compare_digest(expected_sign(token.reveal(), request_time).encode(), received)
            matched |= same & _signs_for(token, sdk_app_id)
        if not matched:
            raise SignatureMismatch(
                f"signature mismatch: 'Sign' does not match any token configured for SdkAppid {sdk_app_id}"
            )
