"""While a command runs, a stop signal calls its stop function; afterwards it ends the process again."""

from __future__ import annotations

import asyncio
import os
import signal

from bridge.process import stop_signals


async def test_a_stop_signal_calls_the_stop_function_while_the_block_runs_and_has_its_default_after() -> None:
    stopped = asyncio.Event()
    with stop_signals(stopped.set):
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(5):
            await stopped.wait()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C: KeyboardInterrupt
