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

Other secrets read from files join through `Reloader.add`: a name (the metric's `source` label) and a
function that reads its file again and puts the new value in use, raising `ValueError` to keep the old one.
`--forward-url-file` is one (`reread_forward_url`: forward mode's URL and the credentials in it);
`--sasl-password-file` is not (the producer's SASL login would have to be rebuilt).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.secret import TokenFile
from bridge.settings import ServeSettings
from bridge.settings.values import forward_url_file, token_file
from bridge.tencent.signature import SignatureCheck

log = logging.getLogger("bridge.reload")  # see `bridge.logs.LOGGERS`

CALLBACK_TOKEN_FILE = "callback_token_file"  # noqa: S105 - a metric label, the name of a source
FORWARD_URL_FILE = "forward_url_file"
RELOADED, FAILED = "reloaded", "failed"

Reread = Callable[[], str]
"""Reads a secret's file again and puts it in use; returns a short description for the log (never the
secret), or raises `ValueError` saying why the file was refused, and the old value stays."""


class Reloader:
    """What SIGHUP reads again: the callback token file, and any secret `add`ed; counted by source and
    result for `/metrics`."""

    def __init__(self, settings: ServeSettings, signature: SignatureCheck | None) -> None:
        self._settings = settings
        self._signature = signature
        self._sources: dict[str, Reread] = {}
        self.counts: dict[tuple[str, str], int] = {}
        """Reloads by (source, result): `reloaded` or `failed`."""
        if settings.callback_token_file is not None and signature is not None:
            self.add(CALLBACK_TOKEN_FILE, self._reread_tokens)

    @property
    def tokens_in_use(self) -> int:
        return 0 if self._signature is None else len(self._signature.tokens)

    def add(self, source: str, reread: Reread) -> None:
        """Read `reread`'s secret again on each SIGHUP too; `source` names it in the log and the metric."""
        self._sources[source] = reread
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
                else "no secret is read from a file (--callback-token-file)",
            )
            return
        for source, reread in self._sources.items():
            try:
                done = reread()
            except Exception as exc:  # noqa: BLE001 - a signal handler must not raise; said and counted
                self._count(source, FAILED)
                reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                log.error("SIGHUP: %s not reloaded, the old value stays in use: %s", source, reason)  # noqa: TRY400 - the reason is the message; a traceback would add nothing
            else:
                self._count(source, RELOADED)
                log.info("SIGHUP: %s reloaded: %s", source, done)

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
            "Secrets read again on SIGHUP, by source and result (reloaded, or failed: the old one kept).",
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
