"""Multi-turn chat over the decode loop: history through the chat template, KV prefix reused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from s2t_edge.decode import DecodeStats, Token, decode
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.policy import Policy
from s2t_edge.prompt import ChatTemplate, Message


@dataclass
class ChatSession:
    engine: Engine
    policy: Policy
    system: str | None = None
    max_tokens: int = 1024
    messages: list[Message] = field(default_factory=list)
    last: DecodeStats = field(default_factory=DecodeStats)
    total: DecodeStats = field(default_factory=DecodeStats)

    def __post_init__(self) -> None:
        self.template = ChatTemplate(self.engine)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.total = DecodeStats()

    def send(self, text: str) -> Iterator[Token]:
        """Stream the assistant's answer to `text`; a partial answer (Ctrl-C) is kept as said."""
        prompt = self.engine.tokenize(self.template.render([*self.messages, {"role": "user", "content": text}]))
        self.messages.append({"role": "user", "content": text})  # only a turn that tokenizes is kept
        self.last = DecodeStats()
        ids: list[int] = []
        if len(prompt) >= self.engine.n_ctx_seq:
            self.messages.pop()  # a turn that cannot fit is not kept, so the session stays usable
            raise S2TError(
                f"context overflow: the conversation is {len(prompt)} tokens, n_ctx is "
                f"{self.engine.n_ctx_seq}; /reset the chat or raise --ctx"
            )
        try:
            for tok in decode(
                self.engine, prompt, max_tokens=self.max_tokens, stats=self.last, **self.policy.decode_args()
            ):
                ids.append(tok.id)
                yield tok
        finally:
            self.messages.append({"role": "assistant", "content": self.engine.detokenize(ids)})
            for name in ("steps", "triggers", "flips", "model_s", "ours_s", "prefill_s"):
                setattr(self.total, name, getattr(self.total, name) + getattr(self.last, name))
