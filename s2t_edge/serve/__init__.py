"""`s2t-edge serve`: an OpenAI-compatible HTTP server over the continuous batch, with a web chat.

protocol (the wire format) → service (requests as jobs) → worker (the engine thread, one
`BatchScheduler`) ← app (Starlette routes, server-sent events) ← server (uvicorn, signals).
Needs the `serve` extra (Starlette, uvicorn); nothing here is imported by chat or generate.
"""
