"""What the HTTP layer asks of the loaded model: a request turned into a job, the model list, health.

The chat template is rendered and the prompt tokenized here, in the handler's thread: that reads
only the model's vocabulary (as llama.cpp's own server does from its HTTP threads); everything
that touches the llama.cpp context happens in the worker thread.
"""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.policy import SAMPLED_ADAPTED, Policy, greedy, sampling
from s2t_edge.prompt import ChatTemplate
from s2t_edge.serve.protocol import GREEDY_SUFFIX, APIError, GenRequest
from s2t_edge.serve.worker import Event, Job, Worker

SAMPLE_TOP_K = 40  # candidates a sampled request draws from (then top_p)


@dataclass
class Service:
    engine: Engine
    worker: Worker
    policy: Policy  # the default: s2t-local when a bundle is loaded, else greedy
    model_name: str
    ctx: int  # positions one request may fill (prompt + answer)
    max_tokens: int  # the answer's length when a request gives no max_tokens
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.greedy = greedy(self.policy.k)
        try:
            self.template: ChatTemplate | None = ChatTemplate(self.engine)
        except S2TError:
            self.template = None

    def check_key(self, authorization: str | None) -> None:
        """401 unless the request carries `Authorization: Bearer <key>` (when a key is set)."""
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            msg = "missing API key" if not authorization else "incorrect API key"
            raise APIError(401, f"{msg}: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    @property
    def adapted(self) -> bool:
        """The bundle's LoRA adapter is on: it adapts the whole context, every slot's request."""
        return bool(getattr(self.engine, "lora_on", False))

    def policy_for(self, req: GenRequest, choice: int = 0) -> Policy:
        """temperature > 0 samples (top_p, seed + choice; from the adapted SLM when the bundle has
        an adapter); else the default policy, or the base SLM's greedy by alias."""
        if req.greedy and self.adapted:
            raise APIError(
                400,
                "this server's bundle adapts the model for s2t-local (a LoRA adapter), so the base "
                "model's greedy is not served next to it; run another server with --bundle none for it",
                param="model",
            )
        if req.temperature > 0:
            name = SAMPLED_ADAPTED if self.adapted else "sample"
            seed = None if req.seed is None else req.seed + choice
            return sampling(req.temperature, top_p=req.top_p, top_k=SAMPLE_TOP_K, seed=seed, name=name)
        return self.greedy if req.greedy else self.policy

    def prompt_ids(self, req: GenRequest) -> list[int]:
        try:
            return self._prompt_ids(req)
        except S2TError as e:  # e.g. text that is not valid UTF-8 (a lone surrogate escape in the JSON)
            raise APIError(400, str(e), param="messages" if req.kind == "chat" else "prompt") from None

    def _prompt_ids(self, req: GenRequest) -> list[int]:
        if req.kind == "completion":
            return self.engine.tokenize(req.prompt or "")
        if self.template is None:
            raise APIError(400, "this model's GGUF has no chat template; use /v1/completions", param="messages")
        try:
            text = self.template.render(req.messages or [])
        except Exception as e:  # a Jinja template may refuse a conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
        return self.engine.tokenize(text, special=True)

    def jobs(self, req: GenRequest, emit: Callable[[int, Event], None]) -> list[Job]:
        """The request's `n` choices as jobs for the worker (`emit` gets the choice's index with
        each event); 400 when its prompt leaves no room to answer or `n` exceeds the slots."""
        if req.n > self.worker.parallel:
            raise APIError(400, f"'n' is at most {self.worker.parallel} here (the server's --parallel)", param="n")
        ids = self.prompt_ids(req)
        if len(ids) >= self.ctx:
            raise APIError(
                400,
                f"this model's context is {self.ctx} tokens per request, the prompt has {len(ids)}: "
                "shorten it (or start the server with a larger --ctx)",
                code="context_length_exceeded",
                param="messages" if req.kind == "chat" else "prompt",
            )
        room = self.ctx - len(ids)  # the answer stops with finish_reason "length" when it fills the context
        max_tokens = min(req.max_tokens or self.max_tokens, room)
        return [
            Job(ids, max_tokens, self.policy_for(req, i), functools.partial(emit, i), stops=req.stop)
            for i in range(req.n)
        ]

    def models(self) -> dict:
        alias = self.policy.name != "greedy" and not self.adapted
        names = [self.model_name] + ([self.model_name + GREEDY_SUFFIX] if alias else [])
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": self.created, "owned_by": "s2t-edge"} for n in names],
        }

    def health(self) -> dict:
        return {
            "status": "error" if self.worker.failed else "ok",
            "model": self.model_name,
            "policy": self.policy.name,
            "adapted": self.adapted,  # the web chat then offers no plain greedy
            "parallel": self.worker.parallel,
            "ctx": self.ctx,
            **self.worker.load,
        }
