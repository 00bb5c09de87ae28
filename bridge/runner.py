"""Running the application: listen, wait for SIGINT or SIGTERM, then shut down in aiohttp's order.

aiohttp stops accepting, lets in-flight handlers finish (`on_shutdown`, then the drain), and only then runs
the cleanup that flushes and closes the producer.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from bridge.server import create_app
from bridge.settings import Settings

OnStarted = Callable[[web.Application, int], Coroutine[Any, Any, None]]


class ListenError(OSError):
    """The bridge cannot listen on its address and port."""


async def run_server(settings: Settings, on_started: OnStarted | None = None) -> None:
    """Serve until SIGINT or SIGTERM; `on_started` gets the application and the bound port."""
    app = create_app(settings)
    # The drain of in-flight requests is bounded by what a request can take: the delivery deadline.
    # No access log: it would repeat every query string, Sign included.
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=settings.delivery_timeout + 1
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        port: int = runner.addresses[0][1]
        started = asyncio.create_task(on_started(app, port)) if on_started is not None else None
        await stop.wait()
        if started is not None:
            started.cancel()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
