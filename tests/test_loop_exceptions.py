"""The commands' event loop (`bridge.process.run_loop`): an exception aiokafka's internals leave unretrieved
is logged at debug level on aiokafka's logger, so a refused command still says exactly its one line; one
raised through the bridge's own code, or through neither, stays asyncio's ERROR with its traceback.

The real case (a client without a certificate refused by a mutual-TLS listener after its TLS 1.3 handshake)
is `test_a_command_refused_by_the_broker_exits_3_with_one_line_naming_the_cause` in
`tests/test_kafka_security_real.py`; whether the garbage collector finalizes the unretrieved future there
depends on the order it finds the objects in, so these tests make the same kind of future on purpose."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiokafka.util import parse_kafka_version

from bridge.logs import configure_logging
from bridge.process import aiokafka_leftover, run_loop
from bridge.settings import values


@pytest.fixture
def logged() -> Iterator[Callable[[str], io.StringIO]]:
    """Configure logging as `--log-level LEVEL --log-format json` does, into a buffer; restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)

    def configure(level: str) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(level, "json", stream)
        return stream

    yield configure
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name in ("aiokafka", "aiokafka.conn"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def raised_by(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - any exception: its traceback is what is tested
        return exc
    raise AssertionError("the call raised nothing")


def through_aiokafka() -> BaseException:
    """An exception raised inside aiokafka's code (a version it cannot parse)."""
    return raised_by(lambda: parse_kafka_version("not a version"))


def through_the_bridge() -> BaseException:
    """An exception raised inside the bridge's own code (a --path it refuses)."""
    return raised_by(lambda: values.path("no slash"))


def through_neither() -> BaseException:
    return raised_by(lambda: int("x"))


async def leave_unretrieved(exception: BaseException) -> None:
    """A future failed with `exception`, dropped without anyone retrieving it, and collected."""
    future = asyncio.get_running_loop().create_future()
    future.set_exception(exception)
    del future, exception
    gc.collect()  # the exception's traceback holds this frame, which held the future: a cycle


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("level", ["info", "warning", "error"])
def test_an_exception_left_by_aiokafka_is_not_logged_above_debug(
    level: str, logged: Callable[[str], io.StringIO]
) -> None:
    stream = logged(level)
    run_loop(leave_unretrieved(through_aiokafka()))
    assert stream.getvalue() == ""


def test_an_exception_left_by_aiokafka_is_one_debug_line_with_its_traceback_at_debug(
    logged: Callable[[str], io.StringIO],
) -> None:
    stream = logged("debug")
    run_loop(leave_unretrieved(through_aiokafka()))
    told = [line for line in lines(stream) if "never retrieved" in line["message"]]
    assert [(line["level"], line["logger"]) for line in told] == [("debug", "aiokafka")], told
    assert "InvalidVersion" in told[0]["message"]
    assert "parse_kafka_version" in told[0]["exception"]


@pytest.mark.parametrize("exception", [through_the_bridge, through_neither], ids=["bridge", "neither"])
@pytest.mark.parametrize("level", ["info", "debug"])
def test_an_exception_not_left_by_aiokafka_stays_asyncios_error_with_its_traceback(
    exception: Callable[[], BaseException], level: str, logged: Callable[[str], io.StringIO]
) -> None:
    stream = logged(level)
    run_loop(leave_unretrieved(exception()))
    told = [line for line in lines(stream) if "never retrieved" in line["message"]]
    assert [(line["level"], line["logger"]) for line in told] == [("error", "asyncio")], told
    assert "Traceback" in told[0]["exception"]


def test_an_exception_raised_through_the_bridge_and_aiokafka_is_the_bridges() -> None:
    """A task of the bridge's that nobody awaited failed with an error from aiokafka: a bug of the bridge,
    which stays visible. The frame of the bridge's is code run with the globals of a `bridge.` module."""

    def from_aiokafka() -> None:
        raise through_aiokafka()

    bridge_code = "def awaited_by_nobody(call):\n    call()\n\nawaited_by_nobody(from_aiokafka)\n"
    scope = {"__name__": "bridge.ingest.example", "from_aiokafka": from_aiokafka}
    exception = raised_by(lambda: exec(bridge_code, scope))  # noqa: S102 - a frame of a bridge module
    assert not aiokafka_leftover(exception)
    assert aiokafka_leftover(through_aiokafka())
    assert not aiokafka_leftover(through_the_bridge())
    assert not aiokafka_leftover(through_neither())


def test_run_loop_returns_what_the_coroutine_returns_and_raises_what_it_raises() -> None:
    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise LookupError("nothing")

    assert run_loop(answer()) == 42
    with pytest.raises(LookupError, match="nothing"):
        run_loop(fail())
