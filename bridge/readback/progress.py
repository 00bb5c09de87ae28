"""Progress of a replay on stderr: a bar on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO

_BAR_WIDTH = 28
_TERMINAL_EVERY_S = 0.1
_LINE_EVERY_S = 5.0


@dataclass(slots=True)
class Tally:
    """What a replay did with the records it read."""

    copied: int = 0
    duplicates: int = 0
    filtered_out: int = 0
    errors: int = 0
    refused: int = 0
    """Of the errors, the records the destination refused for good, set aside in the skipped file."""
    decisions: int = 0
    """Of the records copied, forward mode's decision records (`--decisions include`)."""
    decisions_passed_over: int = 0
    """Forward mode's decision records read and not copied (`--decisions skip`, or `--to-url`)."""

    @property
    def handled(self) -> int:
        return self.copied + self.duplicates + self.filtered_out + self.errors

    def summary(self, seconds: float) -> str:
        rate = self.copied / seconds if seconds > 0 else 0.0
        noun = "app decision" if self.decisions == 1 else "app decisions"
        decisions = f" ({self.decisions} {noun})" if self.decisions else ""
        passed_over = (
            f", app decisions passed over {self.decisions_passed_over}" if self.decisions_passed_over else ""
        )
        return (
            f"copied {self.copied}{decisions}, skipped as duplicates {self.duplicates}, filtered out "
            f"{self.filtered_out}, errors {self.errors}{passed_over} in {seconds:.1f} s "
            f"({rate:.0f} records/s)"
        )


class Progress:
    """Shows `Tally` and the share of offsets read; `update()` is cheap to call for every record."""

    def __init__(self, stream: TextIO, label: str, *, terminal: bool | None = None) -> None:
        self._stream, self._label = stream, label
        self._terminal = stream.isatty() if terminal is None else terminal
        self._started = self._shown = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def update(self, tally: Tally, fraction: float, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._shown < (_TERMINAL_EVERY_S if self._terminal else _LINE_EVERY_S):
            return
        self._shown = now
        if self._terminal:
            self._stream.write("\r\x1b[K" + self._bar(tally, fraction) + ("\n" if final else ""))
        elif not final:
            self._stream.write(f"{self._label}: {self._status(tally, fraction)}\n")
        self._stream.flush()

    def _status(self, tally: Tally, fraction: float) -> str:
        elapsed = max(self.elapsed, 1e-6)
        rate = tally.copied / elapsed
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        shown_eta = "?" if eta is None else _clock(eta)
        return (
            f"{fraction:4.0%} read, {tally.copied} copied, {tally.duplicates} duplicates, "
            f"{tally.filtered_out} filtered out, {tally.errors} errors, {rate:.0f}/s, ETA {shown_eta}"
        )

    def _bar(self, tally: Tally, fraction: float) -> str:
        filled = round(_BAR_WIDTH * min(max(fraction, 0.0), 1.0))
        return f"{self._label} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {self._status(tally, fraction)}"


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
