"""The parsers of settings' values: each turns a flag's or variable's text into a value, or raises ValueError
with a message that completes "BRIDGE_X='text': ..."."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import quote, unquote_to_bytes, urlsplit

from bridge.secret import CallbackToken, Secret, SecretFile, TokenFile, UrlFile

# Paths the bridge serves itself; the callback path must be another one.
RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/stats"})
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_SERVER = re.compile(r"[^\s,:/]+:[0-9]{1,5}")
_SDK_APP_ID = re.compile(r"[1-9][0-9]{0,18}")
_APP_TOKEN = re.compile(r"([0-9]+)\s*=(.*)", re.DOTALL)
PLACEHOLDER_TOKENS = frozenset({"change-me"})
"""Values shipped in the deployment files to be replaced (deploy/kubernetes/secret.yaml): never a token."""


def servers(text: str) -> tuple[str, ...]:
    servers = tuple(part.strip() for part in text.split(",") if part.strip())
    for server in servers:
        if not _SERVER.fullmatch(server):
            raise ValueError(f"{server!r} is not HOST:PORT")
    if not servers:
        raise ValueError("no HOST:PORT given")
    return servers


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1  # not a whole number: the same message as one out of range
        if not low <= value <= high:
            raise ValueError(f"must be a whole number between {low} and {high}")
        return value

    return parse


def number(low: float, high: float, *, zero: bool, what: str) -> Callable[[str], float]:
    """A parser of numbers from `low` (excluded unless `zero`) to `high`; `what` completes the message."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be {what}") from None
        # NaN fails every comparison, so it is refused here too.
        if not (low <= value if zero else low < value) or not value <= high:
            raise ValueError(f"must be {what}")
        return value

    return parse


seconds = number(0, 3600, zero=False, what="a number of seconds above 0 and at most 3600")
seconds_or_zero = number(0, 86400, zero=True, what="a number of seconds from 0 to 86400")
rate = number(0, 1_000_000, zero=False, what="a number of records per second above 0")
lateness = number(0, 30 * 86400, zero=True, what="a number of seconds from 0 to 2592000 (30 days)")


def auto_or(parse: Callable[[str], int]) -> Callable[[str], int | None]:
    def parse_or_auto(text: str) -> int | None:
        return None if text.strip().lower() == "auto" else parse(text)

    return parse_or_auto


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


# What a URL's path may hold as it is (RFC 3986's pchar and "/"), and "%" of the escapes; the rest is quoted.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def path(text: str) -> str:
    """The callback path as written in the console's URL: percent-escapes (`/tencent%2Fim`, `/a%20b`) and
    non-ASCII characters (`/回调`, kept as its UTF-8 escapes) allowed. A request matches it when their paths
    are the same once decoded, where `%2F` and `%25` stay escaped (aiohttp's `path_safe`, which the router
    compares): `/tencent%2Fim` is not `/tencent/im`. Refused: what a request path cannot hold or an HTTP
    client changes before sending (a space, `?`, `#`, a control character, a `.` or `..` segment), a `%`
    that starts no escape, escapes that are not UTF-8, and the bridge's own paths."""
    usage = f"must be a URL path such as /callback, other than {', '.join(sorted(RESERVED_PATHS))}"
    if not text.startswith("/") or text.startswith("//"):
        raise ValueError(usage)
    if any(c in "?#" or c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"{usage}: no space, '?', '#' or control character (write %20, %3F, %23)")
    if _ESCAPE.search(text):
        raise ValueError(f"{usage}: every '%' starts an escape of two hex digits (write %25 for '%')")
    try:
        decoded = unquote_to_bytes(text).decode()
    except UnicodeDecodeError:
        raise ValueError(f"{usage}: its escapes are not UTF-8") from None
    if not decoded.isprintable():
        raise ValueError(f"{usage}: it decodes to a control character")
    if any(unquote_to_bytes(segment) in (b".", b"..") for segment in text.split("/")):
        raise ValueError(f"{usage}: no '.' or '..' segment (HTTP clients remove them)")
    if decoded in RESERVED_PATHS:
        raise ValueError(usage)
    return quote(text, safe=_PATH_SAFE)


def topic(text: str) -> str:
    if not _TOPIC_NAME.fullmatch(text) or text in {".", ".."}:
        raise ValueError("must be a Kafka topic name: up to 249 letters, digits, '.', '_' or '-'")
    return text


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.lower()

    return parse


def instant(text: str) -> int:
    return parse_instant(text)


def names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError("no name given")
    return names


def url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return text


def forward_url(text: str) -> str:
    """An http(s) URL with a host and without a query or fragment: the callback's own query is appended."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("must have no query or fragment: each callback's own query is appended to it")
    return text


def forward_url_file(path: str) -> UrlFile:
    """The forward URL in the file at `path` (its first line; credentials in it stay out of the settings'
    repr and the logs), checked as `forward_url` checks one given directly."""
    text = _read_secret_file(path).strip()
    if not text:
        raise ValueError("the file holds no URL")
    if "\n" in text:
        raise ValueError("the file holds more than one line: one URL is expected")
    return UrlFile(path, forward_url(text))


def callback_token(text: str) -> CallbackToken:
    """`TOKEN` (for any app) or `APPID=TOKEN` (for that app only). The message never repeats the token."""
    text = text.strip()
    sdk_app_id = None
    if (scoped := _APP_TOKEN.fullmatch(text)) is not None:
        sdk_app_id, text = scoped.group(1), scoped.group(2).strip()
        if not _SDK_APP_ID.fullmatch(sdk_app_id) or int(sdk_app_id) > 2**63 - 1:
            raise ValueError(
                "a token for one app is APPID=TOKEN, APPID an SDKAppID (a positive decimal integer)"
            )
        if not text:
            raise ValueError(f"no token after {sdk_app_id}=")
    if text.lower() in PLACEHOLDER_TOKENS:
        raise ValueError(
            f"{text!r} is the placeholder of deploy/kubernetes/secret.yaml, not a token: put the webhook "
            "authentication token of the Tencent Cloud Chat console there"
        )
    return CallbackToken(text, sdk_app_id)


def tokens(text: str) -> tuple[CallbackToken, ...]:
    tokens = tuple(callback_token(part) for part in text.split(",") if part.strip())
    if not tokens:
        raise ValueError("no token given")
    return tokens


def _read_secret_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as file:  # a file saved with a BOM holds the same token
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        # The message names the file and why, never its content.
        raise ValueError(
            f"cannot read the file: {getattr(exc, 'strerror', None) or type(exc).__name__}"
        ) from None
    except ValueError:  # a NUL in the path
        raise ValueError("cannot read the file: not a file name") from None


def token_file(path: str) -> TokenFile:
    """The tokens of the file at `path`, one a line; a file that cannot be read or holds none is refused."""
    tokens = []
    for number, line in enumerate(_read_secret_file(path).splitlines(), start=1):
        if line.strip():
            try:
                tokens.append(callback_token(line))
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
    if not tokens:
        raise ValueError("the file holds no token (one a line)")
    return TokenFile(path, tuple(tokens))


def password(text: str) -> Secret:
    if not text:
        raise ValueError("must not be empty")
    return Secret(text)


def password_file(path: str) -> SecretFile:
    """The password in the file at `path`, with the path (read again on SIGHUP, `bridge.ingest.reload`)."""
    # Only the final line break goes: a password may begin or end with spaces.
    text = _read_secret_file(path).removesuffix("\n").removesuffix("\r")
    if not text:
        raise ValueError("the file is empty")
    return SecretFile(text, path)


def sdk_app_ids(text: str) -> tuple[str, ...]:
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    for app_id in ids:
        if not _SDK_APP_ID.fullmatch(app_id):
            raise ValueError(f"{app_id!r} is not an SDKAppID (a positive decimal integer)")
    if not ids:
        raise ValueError("no SDKAppID given")
    return ids


def existing_file(path: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read the file {path}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the path
        raise ValueError("cannot read the file: not a file name") from None
    return path


def upper_one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip().upper() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.strip().upper()

    return parse


def text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


_EPOCH_MS = re.compile(r"[0-9]{1,16}")


def parse_instant(text: str) -> int:
    """Milliseconds since the epoch from epoch milliseconds or ISO 8601 (UTC when no offset is given)."""
    text = text.strip()
    if _EPOCH_MS.fullmatch(text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("must be ISO 8601 (2024-05-01, 2024-05-01T08:00:00+08:00) or epoch ms") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
