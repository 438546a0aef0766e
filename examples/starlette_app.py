"""An asyncio web service that enqueues one task per request: Starlette + AsyncStem.

The producer is opened in the app's lifespan (one per process and event loop) and
closed when the server stops; every request awaits it without a thread.  Run a
worker beside it (examples/worker_redis.py), then, from examples/:

    pip install starlette uvicorn
    STEM_BROKER_URL=redis://127.0.0.1:6379/0 uvicorn starlette_app:app
    curl -X POST 'localhost:8000/emails?to=a@b.c'          # {"id": "..."}
    curl 'localhost:8000/tasks/ID/result?timeout=5'         # {"state": "SUCCEEDED", "result": ...}

FastAPI takes the same lifespan (``FastAPI(lifespan=lifespan)``) and the same handlers.
"""

from __future__ import annotations

import contextlib
import os
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stem import AsyncStem
from stem.errors import InvalidTaskOptionsError, TaskTimeoutError

from tasks import registry, send_email


def create_app(url: str | None = None) -> Starlette:
    url = url or os.environ.get("STEM_BROKER_URL", "redis://127.0.0.1:6379/0")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncStem(broker=url, backend=url, registry=registry) as stem:
            app.state.stem = stem
            yield

    async def send(request: Request) -> JSONResponse:
        stem: AsyncStem = request.app.state.stem
        try:
            ref = await stem.call(send_email, request.query_params.get("to", ""),
                                  subject=request.query_params.get("subject", ""))
        except InvalidTaskOptionsError as exc:          # bad input: nothing was queued
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"id": ref.id}, status_code=202)

    async def status(request: Request) -> JSONResponse:
        st = await request.app.state.stem.get_status(request.path_params["task_id"])
        return JSONResponse({"state": st.state.value, "result": st.result})

    async def result(request: Request) -> JSONResponse:
        try:
            timeout = float(request.query_params.get("timeout", "10"))
            st = await request.app.state.stem.wait_for_task(request.path_params["task_id"], timeout=timeout)
        except (ValueError, InvalidTaskOptionsError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except TaskTimeoutError as exc:
            return JSONResponse({"error": str(exc)}, status_code=504)
        return JSONResponse({"state": st.state.value, "result": st.result})

    return Starlette(lifespan=lifespan, routes=[
        Route("/emails", send, methods=["POST"]),
        Route("/tasks/{task_id}", status),
        Route("/tasks/{task_id}/result", result),
    ])


app = create_app()
