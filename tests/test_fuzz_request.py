"""The request path under coverage-guided fuzzing: a short libFuzzer run and the committed corpus.

`python -m tests.fuzz_request` runs the fuzz target (`tests/fuzz_target.py`) for as many inputs as asked;
here it runs a few thousand, seeded with the committed corpus, and fails on any crash: an input for which
the path from query and body to record raised anything but a 4xx `BridgeError`. The corpus itself is
replayed in this process too, so a failure names the input. The other tests are the regression tests of
what the fuzzer found.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiohttp import http_parser, web_protocol
from aiohttp.test_utils import TestServer

from bridge.errors import BridgeError, InvalidQuery
from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from bridge.tencent.envelope import Record
from bridge.tencent.protocol import parse_query
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture

atheris = pytest.importorskip("atheris", reason="atheris has wheels for Linux only")
from tests import fuzz_request, fuzz_target  # noqa: E402 - both need atheris

SHORT_RUN = 4000
CORPUS_FILES = sorted(fuzz_request.CORPUS.iterdir())


def test_a_short_fuzz_run_from_the_committed_corpus_finds_no_crash(tmp_path: Path) -> None:
    """A few thousand inputs under libFuzzer, from the committed corpus, with a fixed seed: no crash."""
    summary = fuzz_request.run(SHORT_RUN, artifacts=tmp_path, seed=1, input_timeout=10, echo=False)
    assert summary.ok, summary.line() + "\n" + "\n".join(summary.output[-60:])
    assert summary.runs >= SHORT_RUN
    assert summary.cov > 0, "libFuzzer saw no coverage: the target is not instrumented"
    loaded = f"seed corpus: files: {len(CORPUS_FILES)} "
    assert any(loaded in line for line in summary.output), "the committed corpus was not loaded"


def test_the_committed_corpus_is_small() -> None:
    """Tens of minimised inputs, so that the short run starts deep and the repository stays small."""
    assert 10 <= len(CORPUS_FILES) <= 150
    assert sum(path.stat().st_size for path in CORPUS_FILES) < 64 * 1024


def test_every_input_of_the_committed_corpus_ends_in_a_record_or_a_refusal() -> None:
    """Replayed here one by one, so a failure names its input; together they reach every topic and every
    status of a refusal on this path (the corpus goes deep, not only into the JSON parser's errors)."""
    topics: Counter[str] = Counter()
    refusals: Counter[int] = Counter()
    for path in CORPUS_FILES:
        try:
            result = fuzz_target.outcome(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path.name}: {exc!r}") from exc
        if isinstance(result, Record):
            topics[result.topic] += 1
        elif isinstance(result, BridgeError):
            refusals[result.status] += 1
    assert set(topics) == set(ServeSettings().callback_topics), topics
    assert set(refusals) == fuzz_target.REFUSALS, refusals


@pytest.mark.parametrize(
    "pairs", [[("OptPlatform", "RESTAPI\udcc4")], [("Opt\udcc4", "RESTAPI")], [("X", "\ud800")]]
)
def test_a_query_parameter_that_is_not_utf8_text_is_an_invalid_query(pairs: list[tuple[str, str]]) -> None:
    """Found by the fuzzer: a lone surrogate in a query parameter's name or value (which aiohttp's
    pure-Python parser makes of a byte that is not UTF-8) reached the envelope, whose JSON encoding failed."""
    with pytest.raises(InvalidQuery, match="is not UTF-8 text"):
        parse_query([("SdkAppid", "1400000000"), *pairs])


async def test_a_query_byte_that_is_not_utf8_gets_400_from_the_pure_python_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same over HTTP, with the parser aiohttp uses without its C extension (AIOHTTP_NO_EXTENSIONS):
    the byte 0xC4 alone in the query is a 400 InvalidQuery, and nothing is written (it was a 503 "internal
    error", the record lost). aiohttp's C parser refuses such a byte itself."""
    monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    seed = fixture("oa-after-send-text")
    publisher = FakePublisher()
    publisher.confirm.set()
    query = "&".join(f"{name}={value}" for name, value in seed.query.items()).encode() + b"\xc4"
    async with TestServer(create_app(ServeSettings(), publisher)) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        head = b"POST /callback?%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        writer.write(head % (query, len(seed.raw_body)) + seed.raw_body)
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
    status_line, _, body = answer.partition(b"\r\n\r\n")
    assert status_line.split(b" ")[1] == b"400", answer
    assert orjson.loads(body)["ErrorCode"] == InvalidQuery.error_code
    assert publisher.records == []
