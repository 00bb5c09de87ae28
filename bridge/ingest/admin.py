"""The admin listener (`--admin-port`): `/healthz`, `/readyz`, `/metrics` and `/stats`, off the public port.

With it, the callback port answers only the callback path and `/healthz` (anything else is a Tencent-style
404), so what faces Tencent exposes no metrics and no state; probes and scrapes go to the admin port, which
a NetworkPolicy or a firewall can keep to the cluster. It binds to `--admin-host`, by default the address of
`--host`: never wider than the callbacks' listener.

It is an application of its own, served by a plain `web.AppRunner`, answering from the bridge's
application (its publisher, admission, outcomes and metrics); nothing of it runs on the callback path. Its
requests are not counted in the callback metrics, as the probes on the callback port are not.
"""

from __future__ import annotations

from aiohttp import web

from bridge.errors import BridgeError, MethodNotAllowed, NotFound
from bridge.ingest.metrics import METRICS, METRICS_PATH, metrics_response
from bridge.ingest.server import Handler, fail_response, healthz, readiness, statistics

ADMIN_PATHS = ("/healthz", "/readyz", METRICS_PATH, "/stats")
BRIDGE = web.AppKey("bridge", web.Application)
"""The bridge's application, whose state the admin listener reports."""


def create_admin_app(bridge: web.Application) -> web.Application:
    """The admin listener's application, reporting on `bridge` (set up already: its publisher exists)."""
    admin = web.Application(middlewares=[_tencent_errors])
    admin[BRIDGE] = bridge
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", _readyz)
    admin.router.add_get(METRICS_PATH, _metrics)
    admin.router.add_get("/stats", _stats)
    return admin


async def _readyz(request: web.Request) -> web.Response:
    return readiness(request.app[BRIDGE])


async def _metrics(request: web.Request) -> web.Response:
    return metrics_response(request.app[BRIDGE][METRICS])


async def _stats(request: web.Request) -> web.Response:
    return statistics(request.app[BRIDGE])


@web.middleware
async def _tencent_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An unknown path or method gets the bridge's JSON FAIL body, as on the callback port."""
    error: BridgeError
    try:
        return await handler(request)
    except web.HTTPNotFound:
        error = NotFound(f"no such path {request.path!r}; the admin listener serves {', '.join(ADMIN_PATHS)}")
        return fail_response(error)
    except web.HTTPMethodNotAllowed as exc:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
        response = fail_response(error)
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
        return response
