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
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def emit(choice: int, ev: Event) -> None:  # called from the worker thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (choice, ev))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    jobs = await run_in_threadpool(svc.jobs, req, emit)  # renders and tokenizes; 400s come from here
    svc.worker.submit(*jobs)  # 503 when the queue is full
    if req.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_stream(req, jobs, events), media_type="text/event-stream", headers=headers)
    return await _collect(request, req, jobs, events)


async def _stream(req: GenRequest, jobs: list[Job], events: asyncio.Queue[tuple[int, Event]]) -> AsyncIterator[bytes]:
    done: dict[int, Done] = {}
    try:
        if req.kind == "chat":
            for i in range(len(jobs)):
                yield sse(chunk(req, role=True, text="", index=i))
        while len(done) < len(jobs):
            i, ev = await events.get()
            if isinstance(ev, Piece):
                yield sse(chunk(req, text=ev.text, flipped=ev.flipped, index=i))
            elif isinstance(ev, Done):
                done[i] = ev
                yield sse(chunk(req, finish_reason=ev.finish_reason, s2t=ev.stats, index=i))
            else:  # the error object as an event: OpenAI's clients raise it
                yield sse(ev.error.body())
                break
        else:
            if req.include_usage:
                tokens = sum(d.completion_tokens for d in done.values())
                cached = done[0].stats["cached_tokens"]
                yield sse(chunk(req, use=usage(len(jobs[0].prompt), tokens, cached)))
        yield sse("[DONE]")
    finally:  # also when the client went away mid-answer: its slots are freed at the next step
        for job in jobs:
            job.cancelled = True


async def _collect(
    request: Request, req: GenRequest, jobs: list[Job], events: asyncio.Queue[tuple[int, Event]]
) -> Response:
    parts: list[list[str]] = [[] for _ in jobs]
    done: dict[int, Done] = {}
    try:
        while len(done) < len(jobs):
            try:
                i, ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it
                continue
            if isinstance(ev, Piece):
                parts[i].append(ev.text)
            elif isinstance(ev, Done):
                done[i] = ev
            elif isinstance(ev, Failed):
                raise ev.error
        use = usage(
            len(jobs[0].prompt), sum(d.completion_tokens for d in done.values()), done[0].stats["cached_tokens"]
        )
        outs = [("".join(parts[i]), done[i].finish_reason, done[i].stats) for i in range(len(jobs))]
        return JSONResponse(response(req, outs, use))
    finally:
        for job in jobs:
            job.cancelled = True
