"""What the commands that run until done or stopped share at their boundary with the process.

While `serve`, `dev`, `consume` and `replay` run, a stop signal asks them to finish gracefully instead of
ending the process with a traceback; `consume` and `replay` tell a Kafka error that reaches them in one line
and exit with status 3 (`ExitStatus.KAFKA_FAILED`). For `serve`, SIGHUP (`RELOAD_SIGNAL`) is no stop signal:
it reads the token file again (`bridge.ingest.reload`). `dev` stops gracefully on SIGHUP as on Ctrl-C, so a
closed terminal ends it and its in-memory broker; `consume` and `replay` leave SIGHUP its default.

Each command runs its loop with `run_loop`, which hands an exception aiokafka's internals left unretrieved to
aiokafka's logger at debug level instead of asyncio's ERROR and traceback (`aiokafka_leftover`): a refused
command still says its one line, whatever else the garbage collector finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from bridge.errors import CommandError, ExitStatus, describe

if TYPE_CHECKING:
    from aiokafka.errors import KafkaError

    from bridge.settings import KafkaConnection

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL = signal.SIGHUP

T = TypeVar("T")

# aiokafka's own logger: at CRITICAL but under --log-level debug (`bridge.logs.configure_logging`).
_aiokafka_log = logging.getLogger("aiokafka")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on a loop whose exception handler is `handle_loop_exception`."""
    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(handle_loop_exception)
        return runner.run(main)


def handle_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: what aiokafka's internals left unretrieved at debug level on aiokafka's
    logger, with its traceback; anything else as asyncio says it (an ERROR with the traceback).

    On a TLS 1.3 listener that requires a client certificate, the broker refuses a client without one only
    after the client thinks the handshake is done: the SSLError reaches aiokafka's reader task and also the
    `_closed` future of the connection's asyncio stream protocol, which aiokafka never awaits. The
    protocol's `__del__` marks that future retrieved, but the two are in a reference cycle (the exception's
    traceback holds the SSL protocol, which holds the stream protocol), and when the garbage collector
    finalizes the future first, asyncio logs "Future exception was never retrieved" with a traceback (on a
    loaded machine, nearly every time). The command has told the refusal already, in its own words.
    """
    exception = context.get("exception")
    if isinstance(exception, BaseException) and aiokafka_leftover(exception):
        _aiokafka_log.debug(
            "%s (aiokafka's internals): %s",
            context.get("message", "unhandled exception"),
            f"{type(exception).__name__}: {exception}",
            exc_info=exception,
        )
        return
    loop.default_exception_handler(context)


def aiokafka_leftover(exception: BaseException) -> bool:
    """Whether `exception` was raised through aiokafka's code and none of the bridge's: a future of
    aiokafka's own, or one of asyncio's beneath it, that nobody retrieved. One raised through a frame of
    the bridge (a task of the bridge's that nobody awaited) is the bridge's, and stays an ERROR."""
    modules = [_module(traceback) for traceback in _tracebacks(exception.__traceback__)]
    if any(module == "bridge" or module.startswith("bridge.") for module in modules):
        return False
    return any(module == "aiokafka" or module.startswith("aiokafka.") for module in modules)


def _tracebacks(traceback: TracebackType | None) -> Iterator[TracebackType]:
    while traceback is not None:
        yield traceback
        traceback = traceback.tb_next


def _module(traceback: TracebackType) -> str:
    name = traceback.tb_frame.f_globals.get("__name__")
    return name if isinstance(name, str) else ""


@contextlib.contextmanager
def stop_signals(
    on_stop: Callable[[], None], signals: Sequence[signal.Signals] = STOP_SIGNALS
) -> Iterator[None]:
    """While the block runs, each of `signals` calls `on_stop` on the running loop; afterwards they do not."""
    loop = asyncio.get_running_loop()
    try:
        for signum in signals:
            loop.add_signal_handler(signum, on_stop)
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def cluster_failure(exc: KafkaError, settings: KafkaConnection) -> str:
    """One line for a Kafka error at the command's boundary: the cluster is unreachable or refused."""
    brokers = ",".join(settings.bootstrap_servers)
    return f"cannot reach the Kafka cluster, or it refused: {describe(exc)} (brokers: {brokers})"


def kafka_failed(exc: KafkaError, settings: KafkaConnection) -> CommandError:
    """The error a command ends with for the Kafka error `exc`: the cluster is unreachable or refused."""
    return CommandError(cluster_failure(exc, settings), ExitStatus.KAFKA_FAILED)
