"""Pausing a process for a fault test: `freeze` returns only once every thread of it is stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.kafka.nodes import freeze, running_threads

SPINNING = """
import threading
def spin():
    while True:
        pass
for _ in range(7):
    threading.Thread(target=spin, daemon=True).start()
print("spinning", flush=True)
spin()
"""


@pytest.fixture
def spinning() -> Iterator[subprocess.Popen[bytes]]:
    """A process of eight threads that never sleep, more than the machine has cores."""
    process = subprocess.Popen([sys.executable, "-c", SPINNING], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"spinning\n"
        yield process
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_freeze_returns_once_every_thread_is_stopped(spinning: subprocess.Popen[bytes]) -> None:
    # A plain kill(SIGSTOP) left some of these threads running when it returned in every one of 50 tries.
    assert len(running_threads(spinning.pid)) == 8
    for _ in range(10):
        freeze(spinning.pid)
        assert running_threads(spinning.pid) == []
        spinning.send_signal(signal.SIGCONT)
        assert running_threads(spinning.pid)


def test_a_process_gone_has_no_running_threads(spinning: subprocess.Popen[bytes]) -> None:
    spinning.kill()
    spinning.wait(timeout=10)
    assert running_threads(spinning.pid) == []
    with pytest.raises(ProcessLookupError):
        freeze(spinning.pid)
