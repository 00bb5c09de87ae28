"""What the commands that run until done or stopped share at their boundary with the process.

While `serve`, `dev`, `consume` and `replay` run, a stop signal asks them to finish gracefully instead of
ending the process with a traceback; `consume` and `replay` tell a Kafka error that reaches them in one line
and exit with status 3 (`ExitStatus.KAFKA_FAILED`). For `serve`, SIGHUP (`RELOAD_SIGNAL`) is no stop signal:
it reads the token file again (`bridge.ingest.reload`). `dev` stops gracefully on SIGHUP as on Ctrl-C, so a
closed terminal ends it and its in-memory broker; `consume` and `replay` leave SIGHUP its default.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from bridge.errors import CommandError, ExitStatus, describe

if TYPE_CHECKING:
    from aiokafka.errors import KafkaError

    from bridge.settings import KafkaConnection

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL = signal.SIGHUP


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
