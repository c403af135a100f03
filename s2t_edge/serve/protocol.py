"""The OpenAI wire format: request bodies checked into `GenRequest`, responses, chunks, errors.

Pure functions over dicts (no web framework, no engine), so every rule of the API is in one
place. Extension: every response carries `s2t` (policy, steps, triggers, flips, ...), and a
streamed chunk whose text comes from a token the selector changed carries `"s2t": {"flipped":
true}`. A model name ending in `:greedy` asks for plain greedy decoding instead of S2T-LOCAL
(refused by the service beside a LoRA adapter, see `Service.policy_for`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

GREEDY_SUFFIX = ":greedy"
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOPS = 4
MAX_CHOICES = 16  # n: choices of one request (each takes a slot; at most --parallel)


class APIError(Exception):
    """An error the client caused or must handle, sent as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    """One generation request, checked: a chat (`messages`) or a raw completion (`prompt`)."""

    kind: str  # "chat" | "completion"
    model: str  # as the client named it (echoed back)
    greedy: bool  # the client asked for plain greedy (model alias "<name>:greedy")
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices, sampled as one batch (seeds seed, seed + 1, ...)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be a number between {lo} and {hi}", param=name)
    return float(v)


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: only text is understood
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            return "".join(p["text"] for p in c)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]")


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' is required: a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a role, one of {', '.join(ROLES)}", param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def parse_request(body: dict[str, Any], kind: str, default_model: str) -> GenRequest:
    """Check a /v1/chat/completions (`kind` "chat") or /v1/completions body."""
    model = body.get("model") or default_model
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    req = GenRequest(kind=kind, model=model, greedy=model.endswith(GREEDY_SUFFIX))
    if kind == "chat":
        req.messages = _messages(body)
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        if not isinstance(p, str) or not p:
            raise APIError(400, "'prompt' is required: one non-empty string", param="prompt")
        req.prompt = p
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
        raise APIError(400, "'max_tokens' must be a positive integer", param="max_tokens")
    req.max_tokens = mt
    req.temperature = _number(body, "temperature", 0.0, 2.0, 0.0)
    req.top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if req.top_p == 0.0:
        raise APIError(400, "'top_p' must be greater than 0", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise APIError(400, "'seed' must be an integer >= 0", param="seed")
    req.seed = seed
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    req.stop = [s for s in stops if s]
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"'n' must be an integer from 1 to {MAX_CHOICES}", param="n")
    if n > 1 and req.temperature == 0:
        raise APIError(400, "n > 1 samples its choices: set temperature > 0 (greedy gives n equal answers)", param="n")
    req.n = n
    req.stream = bool(body.get("stream", False))
    opts = body.get("stream_options") or {}
    req.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    return req


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens copied from another slot's cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response(req: GenRequest, outs: list[tuple[str, str, dict]], use: dict) -> dict[str, Any]:
    """The whole answer (`stream` false): one choice per (text, finish_reason, s2t stats). With
    n > 1 each choice carries its own `s2t`; the top-level one is the first choice's."""
    choices = []
    for i, (text, finish_reason, s2t) in enumerate(outs):
        if req.kind == "chat":
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": i, "text": text}
        choice.update(finish_reason=finish_reason, logprobs=None)
        if len(outs) > 1:
            choice["s2t"] = s2t
        choices.append(choice)
    return {
        "id": req.response_id,
        "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": req.created,
        "model": req.model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": None,
        "s2t": outs[0][2],
    }


def chunk(
    req: GenRequest,
    *,
    text: str | None = None,
    role: bool = False,
    finish_reason: str | None = None,
    flipped: bool = False,
    s2t: dict | None = None,
    use: dict | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One server-sent event of a streamed answer (of choice `index`); `use` alone makes the final
    usage chunk."""
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta}
        obj = "chat.completion.chunk"
    else:
        choice, obj = {"index": index, "text": text or ""}, "text_completion"
    choice.update(finish_reason=finish_reason, logprobs=None)
    out: dict[str, Any] = {
        "id": req.response_id,
        "object": obj,
        "created": req.created,
        "model": req.model,
        "choices": [] if use is not None else [choice],
        "system_fingerprint": None,
    }
    if use is not None:
        out["usage"] = use
    if flipped:
        out["s2t"] = {"flipped": True}
    if s2t is not None:
        out["s2t"] = s2t
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (`data: ...` and a blank line)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
