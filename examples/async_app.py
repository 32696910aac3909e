"""An asyncio web endpoint that fires a job and awaits its result (Starlette).

    pip install skunkqueue starlette uvicorn
    skunq work -q async-demo -r math --import async_app --async-concurrency 20 &   # in this folder
    uvicorn async_app:app                                                          # then:
    curl 'http://127.0.0.1:8000/add?a=4&b=5'     ->  {"result": 9, "job": "..."}

``await job.afire(...)`` stores the job without blocking the event loop, and
``await handle`` (or ``handle.aresult(timeout=...)``) waits for its result
the same way; the endpoint serves other requests meanwhile. The job itself is
``async def`` too, so one worker runs many at once (``--async-concurrency``).
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skunkqueue import JobFailed, JobTimeout, SkunkQueue

queue = SkunkQueue("async-demo")


@queue.event(routes=["math"], timeout=10)
async def slow_add(a: int, b: int) -> int:
    await asyncio.sleep(0.1)  # an I/O-bound job: awaits instead of blocking its worker
    return a + b


async def add(request: Request) -> JSONResponse:
    try:
        a, b = int(request.query_params["a"]), int(request.query_params["b"])
    except (KeyError, ValueError):
        return JSONResponse({"error": "give integers a and b, e.g. /add?a=4&b=5"}, status_code=400)
    handle = await slow_add.afire(a, b)
    try:
        return JSONResponse({"result": await handle.aresult(timeout=15), "job": handle.id})
    except JobTimeout:
        return JSONResponse({"error": "still running", "job": handle.id}, status_code=504)
    except JobFailed as exc:
        return JSONResponse({"error": str(exc), "job": handle.id}, status_code=500)


app = Starlette(routes=[Route("/add", add)])
