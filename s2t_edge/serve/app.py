"""The HTTP layer (Starlette): OpenAI's routes, server-sent events, errors as error objects.

Handlers check and tokenize a request, hand it to the worker and relay its events; a client
that goes away marks its job cancelled, so its slot is freed at the next step. Every failure
reaches the client as OpenAI's `{"error": {...}}` with a fitting status, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from s2t_edge.serve.protocol import APIError, GenRequest, chunk, parse_json, parse_request, response, sse, usage
from s2t_edge.serve.service import Service
from s2t_edge.serve.textstream import Piece
from s2t_edge.serve.worker import Done, Event, Failed, Job

log = logging.getLogger("s2t_edge.serve")
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


def index_html() -> str:
    return resources.files("s2t_edge.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(svc: Service) -> Starlette:
    page = index_html()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def health(request: Request) -> Response:
        h = svc.health()
        return JSONResponse(h, status_code=503 if h["status"] != "ok" else 200)

    async def models(request: Request) -> Response:
        svc.check_key(request.headers.get("authorization"))
        return JSONResponse(svc.models())

    async def chat(request: Request) -> Response:
        return await _generate(svc, request, "chat")

    async def completions(request: Request) -> Response:
        return await _generate(svc, request, "completion")

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)


async def _generate(svc: Service, request: Request, kind: str) -> Response:
    svc.check_key(request.headers.get("authorization"))
    req = parse_request(parse_json(await request.body()), kind, svc.model_name)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(ev: Event) -> None:  # called from the worker thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    job = await run_in_threadpool(svc.job, req, emit)  # renders and tokenizes; 400s come from here
    svc.worker.submit(job)  # 503 when the queue is full
    if req.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_stream(req, job, events), media_type="text/event-stream", headers=headers)
    return await _collect(request, req, job, events)


async def _stream(req: GenRequest, job: Job, events: asyncio.Queue[Event]) -> AsyncIterator[bytes]:
    try:
        if req.kind == "chat":
            yield sse(chunk(req, role=True, text=""))
        while True:
            ev = await events.get()
            if isinstance(ev, Piece):
                yield sse(chunk(req, text=ev.text, flipped=ev.flipped))
            elif isinstance(ev, Done):
                yield sse(chunk(req, finish_reason=ev.finish_reason, s2t=ev.stats))
                if req.include_usage:
                    yield sse(chunk(req, use=usage(len(job.prompt), ev.completion_tokens)))
                break
            else:  # the error object as an event: OpenAI's clients raise it
                yield sse(ev.error.body())
                break
        yield sse("[DONE]")
    finally:  # also when the client went away mid-answer: its slot is freed at the next step
        job.cancelled = True


async def _collect(request: Request, req: GenRequest, job: Job, events: asyncio.Queue[Event]) -> Response:
    parts: list[str] = []
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it
                continue
            if isinstance(ev, Piece):
                parts.append(ev.text)
            elif isinstance(ev, Done):
                use = usage(len(job.prompt), ev.completion_tokens)
                return JSONResponse(response(req, "".join(parts), ev.finish_reason, use, ev.stats))
            elif isinstance(ev, Failed):
                raise ev.error
    finally:
        job.cancelled = True
