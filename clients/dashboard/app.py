"""The dashboard's ASGI app (Starlette): the page, its assets, a snapshot and a Server-Sent Events stream.

Why SSE behind a small server rather than MQTT over WebSockets in the browser: the broker needs no WebSocket
listener (Mosquitto, NATS and RabbitMQ each configure it differently, the embedded one not at all), the
browser never holds broker credentials, and the server batches a thousand hosts' changes into one message per
interval so the page never lags behind the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from importlib import resources, util
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clients.dashboard.controls import ControlRefused, OperatorControls
from clients.dashboard.feed import FleetFeed

BATCH_S = 0.2
"""How often a stream sends what changed (at most one message per interval, whatever the fleet does)."""
KEEPALIVE_S = 15.0

_STATIC = Path(str(resources.files("clients.dashboard") / "static"))


def _plotly_js() -> Path:
    """plotly.js as the ``plotly`` PyPI package ships it (found without importing the package)."""
    spec = util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise RuntimeError("the plotly package is not installed: pip install plotly")
    return Path(spec.origin).parent / "package_data" / "plotly.min.js"


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


CONTROL_HEADER = "x-livepatchd-control"
"""Control requests must carry this header: a page of another origin cannot send it without a CORS preflight,
which this app never grants."""


def create_app(feed: FleetFeed, *, batch_s: float = BATCH_S, controls: OperatorControls | None = None) -> Starlette:
    """The app; ``feed`` is followed for the app's lifetime (started and stopped with it). ``controls``: the
    operator's connection; without it the page offers no controls and control requests are refused."""

    def snap() -> dict[str, object]:
        return {**feed.snapshot(), "operator": controls is not None}

    async def control(request: Request) -> Response:
        if controls is None:
            return JSONResponse({"ok": False, "error": {"code": "not_operator", "message":
                                 "this dashboard has no operator credentials (--operator-broker)"}}, status_code=403)
        if request.headers.get(CONTROL_HEADER) != "1":
            return JSONResponse({"ok": False, "error": {"code": "bad_request", "message":
                                 f"a control request carries the {CONTROL_HEADER} header"}}, status_code=400)
        try:
            body = await request.json()
        except ValueError:
            body = None
        try:
            if not isinstance(body, dict):
                raise ControlRefused("bad_request", "the body must be a JSON object")
            if request.path_params["verb"] == "check":
                data = await controls.check(str(body.get("host", "")), str(body.get("patch", "")))
            elif request.path_params["verb"] == "transition":
                data = await controls.transition(str(body.get("host", "")))
            else:
                data = await controls.rollout(request.path_params["verb"], body)
        except ControlRefused as e:
            return JSONResponse({"ok": False, "error": {"code": e.code, "message": e.message}}, status_code=e.status)
        return JSONResponse({"ok": True, "data": data})

    async def index(_: Request) -> Response:
        return FileResponse(_STATIC / "index.html")

    async def plotly_js(_: Request) -> Response:
        return FileResponse(_plotly_js(), media_type="application/javascript")

    async def snapshot(_: Request) -> Response:
        return JSONResponse(snap())

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            first = snap()
            cursor = int(str(first["cursor"]))
            yield _sse("snapshot", first)
            idle = 0.0
            while not await request.is_disconnected():
                await asyncio.sleep(batch_s)
                delta = feed.delta(cursor)
                if delta is None:
                    idle += batch_s
                    if idle >= KEEPALIVE_S:
                        idle = 0.0
                        yield b": keepalive\n\n"
                    continue
                idle = 0.0
                cursor = delta["cursor"]
                yield _sse("delta", delta)
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(feed.run(), name="dashboard-feed")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return Starlette(routes=[
        Route("/", index),
        Route("/assets/plotly.min.js", plotly_js),
        Route("/api/snapshot", snapshot),
        Route("/api/stream", stream),
        Route("/api/control/{verb}", control, methods=["POST"]),
        Mount("/static", StaticFiles(directory=_STATIC), name="static"),
    ], lifespan=lifespan)


async def serve(feed: FleetFeed, host: str = "127.0.0.1", port: int = 8088,
                controls: OperatorControls | None = None) -> None:
    """Serve the dashboard until cancelled (uvicorn on one asyncio loop with the feed)."""
    config = uvicorn.Config(create_app(feed, controls=controls), host=host, port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=1)
    await uvicorn.Server(config).serve()
