"""SIGHUP: read the secrets that live in files again, without a restart and without dropping a request.

A token rotation is one signal: write the new token file (both tokens while Tencent's console switches,
then only the new one) and send SIGHUP. `Reloader.reload` reads `--callback-token-file` again and swaps the
signature check's whole token set at once (`SignatureCheck.replace_tokens`): a callback whose signature was
checked already goes on with its write, every check from then on uses the new set. Nothing else is
touched: no listener, connection or producer is restarted.

A file that cannot be read, holds no token or holds a line that is not one keeps the tokens in use: one
error line (naming the file and the problem, never its content) and `bridge_secret_reloads_total{result=
"failed"}`. Tokens given by `--callback-token` or `BRIDGE_CALLBACK_TOKEN` cannot change while the process
runs: they stay, beside the file's, and a SIGHUP with no file to read says it has nothing to reload.

Other secrets read from files join through `Reloader.add`: a name (the metric's `source` label), a
function that reads its file again and puts the new value in use, raising `ValueError` to keep the old one,
and the file's path. `--forward-url-file` is one (`reread_forward_url`: forward mode's URL and the
credentials in it), `--sasl-password-file` another (`reread_sasl_password`: the Kafka connections opened
from then on log in with the new password, those logged in already stay; see
`bridge.kafka.security.use_sasl_password`).

Nobody sends SIGHUP on Kubernetes, which swaps a mounted secret's files in place. With `--reload-interval`,
`Reloader.polling` looks at every source's file each interval and reloads those that changed, on the same
path as SIGHUP, with the same log lines and metrics. A change is one of the content of the file the path
leads to (symlinks followed: Kubernetes points the file's link into a `..data` link it swaps), compared by
digest (`file_state`); secret files are a few bytes. The digest is taken before each read, so a file
rewritten while it is read is read again at the next look, and a file refused is tried again only once it
changes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.secret import Secret, TokenFile
from bridge.settings import ServeSettings
from bridge.settings.values import forward_url_file, password_file, token_file
from bridge.tencent.signature import SignatureCheck

log = logging.getLogger("bridge.reload")  # see `bridge.logs.LOGGERS`

CALLBACK_TOKEN_FILE = "callback_token_file"  # noqa: S105 - a metric label, the name of a source
FORWARD_URL_FILE = "forward_url_file"
SASL_PASSWORD_FILE = "sasl_password_file"  # noqa: S105 - a metric label, the name of a source
RELOADED, FAILED = "reloaded", "failed"
SIGHUP = "SIGHUP"
FILE_CHANGED = "the file changed (--reload-interval)"

Reread = Callable[[], str]
"""Reads a secret's file again and puts it in use; returns a short description for the log (never the
secret), or raises `ValueError` saying why the file was refused, and the old value stays."""

FileState = bytes | None
"""A digest of the content of the file a path leads to; None: none there, or it cannot be read."""


def file_state(path: str) -> FileState:
    """What `--reload-interval` compares: the content of the file `path` leads to, symlinks followed, so
    that Kubernetes' swap of the `..data` link behind the path is seen, and so is a file rewritten in place
    within the file system's clock tick (same size, same modification time). Only a digest is kept."""
    try:
        with open(path, "rb") as file:
            return hashlib.blake2b(file.read(), digest_size=16).digest()
    except (OSError, ValueError):  # gone, unreadable, a NUL in the path: the read says why
        return None


class Reloader:
    """What SIGHUP reads again: the callback token file, and any secret `add`ed; counted by source and
    result for `/metrics`."""

    def __init__(self, settings: ServeSettings, signature: SignatureCheck | None) -> None:
        self._settings = settings
        self._signature = signature
        self._sources: dict[str, Reread] = {}
        self._paths: dict[str, str] = {}
        self._seen: dict[str, FileState] = {}
        """Each source's file as it was when last read (`file_state`)."""
        self.counts: dict[tuple[str, str], int] = {}
        """Reloads by (source, result): `reloaded` or `failed`."""
        if settings.callback_token_file is not None and signature is not None:
            self.add(CALLBACK_TOKEN_FILE, self._reread_tokens, settings.callback_token_file.path)

    @property
    def tokens_in_use(self) -> int:
        return 0 if self._signature is None else len(self._signature.tokens)

    def add(self, source: str, reread: Reread, path: str | None = None) -> None:
        """Read `reread`'s secret again on each SIGHUP too; `source` names it in the log and the metric.
        With the `path` of its file, `--reload-interval` reads it again when the file changes."""
        self._sources[source] = reread
        if path is not None:
            self._paths[source] = path
            self._seen[source] = file_state(path)
        for result in (RELOADED, FAILED):  # exported from the start, so that `increase()` sees the first
            self.counts.setdefault((source, result), 0)

    def reload(self) -> None:
        """Read every source again (on SIGHUP); a source that fails keeps its old value. Never raises."""
        if not self._sources:
            given = "--callback-token / BRIDGE_CALLBACK_TOKEN" if self._settings.callback_token else None
            log.info(
                "SIGHUP: nothing to reload: %s",
                f"the tokens come from {given}, which cannot change while the bridge runs; give them in "
                "--callback-token-file to rotate them with SIGHUP"
                if given
                else "no secret is read from a file (--callback-token-file, --forward-url-file, "
                "--sasl-password-file)",
            )
            return
        for source in self._sources:
            self._reload(source, SIGHUP)

    def reload_changed(self) -> list[str]:
        """Read again the sources whose file changed since it was last read; return their names. Never
        raises."""
        changed = [source for source, path in self._paths.items() if file_state(path) != self._seen[source]]
        for source in changed:
            self._reload(source, FILE_CHANGED)
        return changed

    async def polling(self, _app: Any) -> AsyncIterator[None]:
        """A cleanup context (aiohttp's `cleanup_ctx`): `reload_changed` every `--reload-interval` seconds
        while the application runs."""
        interval = self._settings.reload_interval
        if not interval:
            yield
            return
        if not self._paths:
            log.info("--reload-interval: no secret is read from a file, there is nothing to look at")
            yield
            return
        log.info(
            "looking at %s every %g s (--reload-interval); a change is read as SIGHUP would",
            ", ".join(self._paths.values()),
            interval,
        )
        task = asyncio.create_task(self._poll(interval), name="secret-files")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_changed()

    def _reload(self, source: str, cause: str) -> None:
        path = self._paths.get(source)
        if path is not None:  # before the read: a change while it reads is read again at the next look
            self._seen[source] = file_state(path)
        try:
            done = self._sources[source]()
        except Exception as exc:  # noqa: BLE001 - a signal handler must not raise; said and counted
            self._count(source, FAILED)
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            log.error("%s: %s not reloaded, the old value stays in use: %s", cause, source, reason)  # noqa: TRY400 - the reason is the message; a traceback would add nothing
        else:
            self._count(source, RELOADED)
            log.info("%s: %s reloaded: %s", cause, source, done)

    def _reread_tokens(self) -> str:
        signature, settings = self._signature, self._settings
        assert signature is not None  # noqa: S101 - only a source when there is a signature check
        assert settings.callback_token_file is not None  # noqa: S101 - idem
        path = settings.callback_token_file.path
        try:
            fresh: TokenFile = token_file(path)
        except ValueError as exc:
            raise ValueError(f"--callback-token-file {path}: {exc}") from None
        before = len(signature.tokens)
        signature.replace_tokens(settings.callback_token + fresh.tokens)
        kept = (
            f", plus {len(settings.callback_token)} from --callback-token" if settings.callback_token else ""
        )
        return f"{len(fresh.tokens)} tokens from {path}{kept} ({before} in use before)"

    def _count(self, source: str, result: str) -> None:
        self.counts[source, result] = self.counts.get((source, result), 0) + 1


class ReloadCollector(Collector):
    """The reloads' metrics, collected from the reloader when `/metrics` is scraped."""

    def __init__(self, reloader: Reloader) -> None:
        self._reloader = reloader

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "bridge_secret_reloads",
            "Secrets read again, on SIGHUP or when their file changed (--reload-interval), by source and "
            "result (reloaded, or failed: the old one kept).",
            labels=("source", "result"),
        )
        for (source, result), count in self._reloader.counts.items():
            reloads.add_metric((source, result), count)
        yield reloads
        tokens = GaugeMetricFamily(
            "bridge_callback_tokens", "Callback tokens a signature may match now (0: unsigned callbacks)."
        )
        tokens.add_metric((), self._reloader.tokens_in_use)
        yield tokens


class _UrlHolder(Protocol):
    url: str


def reread_forward_url(path: str, forwarder: _UrlHolder) -> Reread:
    """`--forward-url-file` read again: the next forwards go to its URL; one under way keeps the old."""

    def reread() -> str:
        try:
            forwarder.url = forward_url_file(path).url
        except ValueError as exc:
            raise ValueError(f"--forward-url-file {path}: {exc}") from None
        return f"the forward URL from {path}"

    return reread


class _PasswordUser(Protocol):
    def use_sasl_password(self, password: Secret) -> None: ...


def reread_sasl_password(path: str, user: _PasswordUser) -> Reread:
    """`--sasl-password-file` read again: the Kafka connections `user` (the publisher) opens from then on
    log in with the new password; those logged in already stay, until they close."""

    def reread() -> str:
        try:
            password = password_file(path)
        except ValueError as exc:
            raise ValueError(f"--sasl-password-file {path}: {exc}") from None
        user.use_sasl_password(password)
        return f"the SASL password from {path}; Kafka connections opened from now on log in with it"

    return reread
