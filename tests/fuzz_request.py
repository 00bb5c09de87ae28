"""Fuzz the request path for a given number of inputs: `python -m tests.fuzz_request --runs 1000000`.

The target is `tests/fuzz_target.py`: everything between the raw query and body and the record handed to
the publisher, with no network. It runs under atheris' libFuzzer in a child process (libFuzzer ends its
process when done), with the bridge's modules and the target instrumented for coverage; this command reads
libFuzzer's output and ends with one line: inputs run, coverage (libFuzzer's `cov:` edges and `ft:`
features), the corpus size and the crashes, each written as a file that `--replay FILE` runs again.

The committed corpus (`tests/fuzz_corpus`, minimised with `--merge-into`) seeds every run and is never
written to; new interesting inputs go to `--corpus DIR` if given. The test suite runs a few thousand
inputs over it (tests/test_fuzz_request.py).
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
WORKER = "--worker"
INSTRUMENTED = ("bridge", "tests.fuzz_target")
_STATUS_LINE = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)(?: corp: (\d+)/)?")
_EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_CRASH = re.compile(r"^==\d+== ERROR: libFuzzer: (.*)")
_REPLAYED = re.compile(r"^Executed \S+ in \d+ ms")
_MERGED = re.compile(r"MERGE-OUTER: (\d+) new files with (\d+) new features added; (\d+) new coverage edges")


@dataclass
class Summary:
    """What one libFuzzer run did, read from its output."""

    exit_code: int
    seconds: float
    runs: int = 0
    cov: int = 0
    features: int = 0
    corpus: int = 0
    crashes: list[str] = field(default_factory=list)
    """What libFuzzer said of each crash: an input that raised, hung (-timeout) or ran out of memory."""
    artifacts: list[str] = field(default_factory=list)
    """The files the crashing inputs were written to."""
    merged: str | None = None
    output: list[str] = field(default_factory=list)

    def read(self, line: str) -> None:
        self.output.append(line)
        if status := _STATUS_LINE.match(line):
            self.runs = max(self.runs, int(status[1]))
            self.cov, self.features = int(status[3]), int(status[4])
            self.corpus = int(status[5]) if status[5] else self.corpus
        elif executed := _EXECUTED.match(line):
            self.runs = int(executed[1])
        elif crash := _CRASH.match(line):
            self.crashes.append(crash[1])
        elif artifact := _ARTIFACT.search(line):
            self.artifacts.append(artifact[1])
        elif _REPLAYED.match(line):
            self.runs += 1
        elif merged := _MERGED.search(line):
            self.merged = f"{merged[1]} inputs kept, reaching {merged[2]} features"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.crashes

    def line(self) -> str:
        if self.merged:
            return f"fuzz_request: merged in {self.seconds:.0f} s: {self.merged}"
        rate = self.runs / self.seconds if self.seconds else 0.0
        text = (
            f"fuzz_request: {self.runs} inputs in {self.seconds:.0f} s ({rate:.0f} a second); "
            f"coverage: cov {self.cov}, ft {self.features}; corpus {self.corpus} inputs; "
            f"crashes: {len(self.crashes)}"
        )
        if self.crashes:
            text += " (" + "; ".join(self.crashes) + ")"
        if self.artifacts:
            text += "; inputs: " + ", ".join(self.artifacts) + " (run one again with --replay FILE)"
        elif self.exit_code != 0:
            text += f"; libFuzzer exited with status {self.exit_code}"
        return text


def fuzz(libfuzzer_args: Sequence[str], *, echo: bool = True, timeout: float | None = None) -> Summary:
    """Run the target under libFuzzer with `libfuzzer_args`; its output goes to stderr when `echo`."""
    started = time.monotonic()
    command = [sys.executable, "-m", "tests.fuzz_request", WORKER, *libfuzzer_args]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as child:
        summary = Summary(exit_code=0, seconds=0.0)
        assert child.stdout is not None
        try:
            for line in child.stdout:
                summary.read(line.rstrip("\n"))
                if echo:
                    print(line, end="", file=sys.stderr, flush=True)
            summary.exit_code = child.wait(timeout)
        except BaseException:
            child.kill()
            raise
    summary.seconds = time.monotonic() - started
    return summary


def run(
    runs: int,
    *,
    corpus: Path | None = None,
    seed_corpora: Sequence[Path] = (CORPUS,),
    artifacts: Path = Path(),
    seed: int = 0,
    max_len: int = 4096,
    input_timeout: int = 10,
    echo: bool = True,
    extra: Sequence[str] = (),
) -> Summary:
    """Fuzz for `runs` inputs, seeded with `seed_corpora` (read only), new inputs saved in `corpus`."""
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-request-") as scratch:
        grows = corpus or Path(scratch)  # libFuzzer writes new inputs to the first directory it is given
        grows.mkdir(parents=True, exist_ok=True)
        args = [
            f"-runs={runs}",
            f"-seed={seed}",
            f"-max_len={max_len}",
            f"-timeout={input_timeout}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            *extra,
            str(grows),
            *(str(path) for path in seed_corpora if path.is_dir()),
        ]
        return fuzz(args, echo=echo)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz_request",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Anything after -- goes to libFuzzer as it is (e.g. -- -use_value_profile=1 -dict=FILE).",
    )
    parser.add_argument(
        "--runs", type=int, metavar="N", default=1_000_000, help="inputs to run (default: 1000000)"
    )
    parser.add_argument(
        "--corpus", type=Path, metavar="DIR", help="a directory to keep the new interesting inputs in"
    )
    parser.add_argument(
        "--seed-corpus",
        type=Path,
        metavar="DIR",
        action="append",
        help=f"inputs to start from, read only (repeatable; default: {CORPUS.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        metavar="DIR",
        default=Path(),
        help="where crashing inputs are written (default: .)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", default=0, help="libFuzzer's random seed (default 0: random)"
    )
    parser.add_argument(
        "--max-len", type=int, metavar="BYTES", default=4096, help="longest input in bytes (default: 4096)"
    )
    parser.add_argument(
        "--timeout",
        type=int,
        metavar="S",
        default=10,
        help="seconds one input may take before it counts as a crash (default: 10)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary line, not libFuzzer's")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--replay",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="run these inputs once each (a crash, a corpus)",
    )
    mode.add_argument(
        "--minimize-crash",
        type=Path,
        metavar="FILE",
        help="shrink a crashing input to FILE.min (--runs tries)",
    )
    mode.add_argument(
        "--merge-into",
        type=Path,
        metavar="DIR",
        help="minimise: copy into DIR the fewest inputs of --corpus and --seed-corpus reaching its edges",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args_list:
        at = args_list.index("--")
        args_list, extra = args_list[:at], args_list[at + 1 :]
    args = _parser().parse_args(args_list)
    seeds: list[Path] = args.seed_corpus or [CORPUS]
    echo = not args.quiet
    if args.replay:
        summary = fuzz([*extra, *(str(path) for path in args.replay)], echo=echo)
    elif args.minimize_crash:
        target = f"{args.minimize_crash}.min"
        flags = ["-minimize_crash=1", f"-runs={args.runs}", f"-exact_artifact_path={target}"]
        fuzz([*flags, *extra, str(args.minimize_crash)], echo=echo)
        if not Path(target).exists():
            print(f"fuzz_request: {args.minimize_crash} was not minimised (does it still crash?)")
            return 1
        print(f"fuzz_request: minimised input in {target} ({Path(target).stat().st_size} bytes)")
        return 0
    elif args.merge_into:
        args.merge_into.mkdir(parents=True, exist_ok=True)
        inputs = [str(path) for path in [*([args.corpus] if args.corpus else []), *seeds]]
        # The fewest inputs that reach every edge (not every hit-count bucket): tens, not hundreds.
        flags = ["-set_cover_merge=1", "-use_counters=0", f"-max_len={args.max_len}"]
        summary = fuzz([*flags, *extra, str(args.merge_into), *inputs], echo=echo)
    else:
        summary = run(
            args.runs,
            corpus=args.corpus,
            seed_corpora=seeds,
            artifacts=args.artifacts,
            seed=args.seed,
            max_len=args.max_len,
            input_timeout=args.timeout,
            echo=echo,
            extra=extra,
        )
    print(summary.line())
    return 0 if summary.ok else 1


def _worker(libfuzzer_args: Sequence[str]) -> NoReturn:
    """The child: the target, instrumented, under libFuzzer, which ends the process when it is done."""
    import atheris  # noqa: PLC0415 - only the child needs it, and before the bridge is imported

    # The bridge's dependencies first: the RegEx hook then sees the bridge's own patterns, not theirs.
    importlib.import_module("aiohttp.web")
    importlib.import_module("aiokafka")
    importlib.import_module("prometheus_client")
    atheris.enabled_hooks.add("RegEx")  # guide inputs through the bridge's regular expressions
    atheris.enabled_hooks.add("str")  # and its startswith/endswith
    with atheris.instrument_imports(include=INSTRUMENTED):
        from tests import fuzz_target  # noqa: PLC0415 - imported under the instrumentation

    # libFuzzer runs argv[0] through the shell to minimise a crash, fork or run jobs: it must start a worker.
    itself = f"{shlex.quote(sys.executable)} -m tests.fuzz_request {WORKER}"
    atheris.Setup([itself, *libfuzzer_args], fuzz_target.one_input)
    atheris.Fuzz()
    raise SystemExit(0)  # libFuzzer exits by itself; this is for the type checker


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER]:
        _worker(sys.argv[2:])
    sys.exit(main())
