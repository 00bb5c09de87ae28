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
import gc
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from bridge.boundary import STOP_SIGNALS, stop_signals
from bridge.parser_errors import BridgeRunner
from bridge.server import ADMISSION, create_app
from bridge.settings import Settings

log = logging.getLogger(__name__)

OnStarted = Callable[[web.Application, int], Coroutine[Any, Any, None]]
# SIGHUP too: a service manager or a closed terminal stops the bridge gracefully, like Ctrl-C.
_STOP_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


# Allocations of container objects between two collections of the youngest generation (Python: 700).
# Nearly every object of a callback dies by reference counting when it is answered; each collection
# still has to traverse the objects of the callbacks in flight.
_GC_YOUNG_THRESHOLD = 20_000


def _settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector's pauses short and rare on the request path.

    Measured with `bridge bench` (README, "Performance"): with Python's defaults, full collections
    traversed every object of the imported libraries about three times a second, took 8 % of the bridge's
    CPU and paused the loop up to 40 ms, which was the p99 at 64 connections; objects alive once the
    application is set up live as long as the process, so they are frozen out of every collection. Young
    collections every 20,000 allocations instead of 700 cut the CPU per callback by a further 9 %.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, middle, old)


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
    runner = BridgeRunner(
        app,
        handle_signals=False,
        shutdown_timeout=1.0,
        **request_handler_options(settings),
    )
    await runner.setup()
    _settle_garbage_collector()
    stop = asyncio.Event()
    started: asyncio.Task[None] | None = None
    try:
        with stop_signals(stop.set, _STOP_SIGNALS):
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
            log.info(
                "stopping: %d callbacks in flight get their answer; new ones get 503", admission.in_flight
            )
            # Still listening: a callback arriving now gets its 503 rather than a refused or dropped
            # connection. One admitted just before may still be reading its body, then waiting for the broker.
            await admission.drained(timeout=settings.body_timeout + settings.delivery_timeout + 1)
    finally:
        if started is not None:
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await started
        await runner.cleanup()
        log.info("stopped")
