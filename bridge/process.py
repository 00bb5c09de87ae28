"""What the commands that run until done or stopped share at their boundary with the process.

While `serve`, `dev`, `consume` and `replay` run, a stop signal asks them to finish gracefully instead of
ending the process with a traceback; `consume` and `replay` tell a Kafka error that reaches them in one line
and exit with status 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

from aiokafka.errors import KafkaError

from bridge.errors import describe
from bridge.settings import Settings

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
KAFKA_FAILED = 3
"""Exit status of a command the Kafka cluster could not serve: unreachable, or it refused."""


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


def cluster_failure(exc: KafkaError, settings: Settings) -> str:
    """One line for a Kafka error at the command's boundary: the cluster is unreachable or refused."""
    brokers = ",".join(settings.bootstrap_servers)
    return f"cannot reach the Kafka cluster, or it refused: {describe(exc)} (brokers: {brokers})"


def kafka_failed(command: str, exc: KafkaError, settings: Settings) -> int:
    """Say on stderr that `bridge COMMAND` failed for the Kafka error `exc`; the exit status to end with."""
    print(f"bridge {command}: {cluster_failure(exc, settings)}", file=sys.stderr)
    return KAFKA_FAILED
