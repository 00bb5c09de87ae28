"""Running the application, and stopping it gracefully on SIGTERM, SIGINT or SIGHUP.

The phases: `/readyz` turns 503 at once; the bridge keeps serving for `--shutdown-delay` so a load balancer
can notice; then new callbacks get 503 (still answered, on new and kept-alive connections alike) while
those in flight get their real answer, within the body timeout and the delivery timeout; then aiohttp stops
listening and closes idle connections, and the producer is flushed and closed within `--shutdown-timeout`.
The whole stop takes at most shutdown delay + body timeout + delivery timeout + shutdown timeout + 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from bridge.server import ADMISSION, create_app
from bridge.settings import Settings

log = logging.getLogger(__name__)

OnStarted = Callable[[web.Application, int], Coroutine[Any, Any, None]]
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ListenError(OSError):
    """The bridge cannot listen on its address and port."""


def request_handler_options(settings: Settings) -> dict[str, Any]:
    """aiohttp's request-handler arguments: no access log, and bounds on what a connection may send and when.

    No access log: it would repeat every query string, `Sign` included, which replays within the skew.

    aiohttp closes a connection `keepalive_timeout` after it opened or after its last answer unless a whole
    request head has arrived by then: the one timeout covers idle keep-alive connections and clients that
    trickle their headers. A trickled body is bounded by `--body-timeout`, in the handler.
    """
    return {
        "access_log": None,
        "max_line_size": settings.max_url_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        "keepalive_timeout": settings.idle_timeout,
    }


async def run_server(settings: Settings, on_started: OnStarted | None = None) -> None:
    """Serve until a stop signal; `on_started` gets the application and the bound port."""
    app = create_app(settings)
    # The bridge drains callbacks in flight itself before cleanup (below); aiohttp's own wait is the last
    # second for whatever outlived that.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=1.0,
        **request_handler_options(settings),
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    started: asyncio.Task[None] | None = None
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        port: int = runner.addresses[0][1]
        if on_started is not None:
            started = asyncio.create_task(on_started(app, port))
        await stop.wait()
        admission = app[ADMISSION]
        admission.draining = True
        log.info("stopping: not ready; serving for %g s more (--shutdown-delay)", settings.shutdown_delay)
        if settings.shutdown_delay:
            await asyncio.sleep(settings.shutdown_delay)
        admission.closing = True
        log.info("stopping: %d callbacks in flight get their answer; new ones get 503", admission.in_flight)
        # Still listening: a callback arriving now gets its 503 rather than a refused or dropped connection.
        # One admitted just before may still be reading its body, then waiting for the broker.
        await admission.drained(timeout=settings.body_timeout + settings.delivery_timeout + 1)
    finally:
        if started is not None:
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await started
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        log.info("stopped")
