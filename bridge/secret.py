"""`Secret`: a setting that must never be printed: a callback token, a SASL password.

Its `repr` and `str` hide the value, so a secret inside `Settings`, a log argument, an exception message or
an f-string shows `********`. The value leaves only through `reveal()`, called where it is used: the
signature check and the Kafka client's arguments.
"""

from __future__ import annotations

from typing import Final

HIDDEN: Final = "********"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise ValueError("a secret must not be empty")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({HIDDEN!r})"

    def __str__(self) -> str:
        return HIDDEN

    def __format__(self, _spec: str) -> str:
        return HIDDEN

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would copy the value somewhere it is not hidden.
        raise TypeError("a Secret cannot be pickled")


class SecretFile(Secret):
    """A secret read from a file (`--sasl-password-file`), and the file's path, to read it again (on SIGHUP
    or when the file changes, `bridge.ingest.reload`). The path is not secret; its repr shows only it."""

    __slots__ = ("path",)

    def __init__(self, value: str, path: str) -> None:
        super().__init__(value)
        self.path = path

    def __repr__(self) -> str:
        return f"SecretFile({HIDDEN!r}, path={self.path!r})"


class CallbackToken(Secret):
    """A webhook authentication token: for one app (`--callback-token APPID=TOKEN`) or, bare, for any app.

    Tencent's `Sign` covers neither the body nor the `SdkAppid`, so with several apps only a token bound to
    its app stops one app's token from signing callbacks that claim to be another's.
    """

    __slots__ = ("sdk_app_id",)

    def __init__(self, value: str, sdk_app_id: str | None = None) -> None:
        super().__init__(value)
        self.sdk_app_id = sdk_app_id

    def signs_for(self, sdk_app_id: str) -> bool:
        return self.sdk_app_id is None or self.sdk_app_id == sdk_app_id

    def __repr__(self) -> str:
        app = "" if self.sdk_app_id is None else f", sdk_app_id={self.sdk_app_id!r}"
        return f"CallbackToken({HIDDEN!r}{app})"

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and getattr(other, "sdk_app_id", None) == self.sdk_app_id

    def __hash__(self) -> int:
        return hash((self.reveal(), self.sdk_app_id))


class UrlFile:
    """A URL read from a file (`--forward-url-file`), and the file's path, to read it again on SIGHUP. The
    URL may carry credentials (`https://user:password@host/...`): its repr shows the path only."""

    __slots__ = ("path", "url")

    def __init__(self, path: str, url: str) -> None:
        self.path = path
        self.url = url

    def __repr__(self) -> str:
        return f"UrlFile({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlFile) and (other.path, other.url) == (self.path, self.url)

    def __hash__(self) -> int:
        return hash((self.path, self.url))


class TokenFile:
    """The tokens read from a token file (`--callback-token-file`), and the file's path, to read it again
    (on SIGHUP, `bridge.ingest.reload`). The path is not secret; the tokens are `CallbackToken`s."""

    __slots__ = ("path", "tokens")

    def __init__(self, path: str, tokens: tuple[CallbackToken, ...]) -> None:
        self.path = path
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"TokenFile({self.path!r}, {len(self.tokens)} tokens)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenFile) and (other.path, other.tokens) == (self.path, self.tokens)

    def __hash__(self) -> int:
        return hash((self.path, self.tokens))
