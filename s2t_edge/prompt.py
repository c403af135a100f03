"""Chat prompts rendered with the chat template stored in the GGUF metadata."""

from __future__ import annotations

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


class ChatTemplate:
    """The model's own Jinja chat template (`tokenizer.chat_template`), rendered once per turn."""

    def __init__(self, engine: Engine) -> None:
        template = engine.metadata("tokenizer.chat_template")
        if not template:
            raise S2TError(f"{engine.path}: the GGUF has no chat template; use `generate` instead")
        eos = engine.metadata("tokenizer.ggml.eos_token_id")
        bos = engine.metadata("tokenizer.ggml.bos_token_id")
        self._formatter = Jinja2ChatFormatter(
            template,
            eos_token=engine.detokenize([int(eos)]) if eos else "",
            bos_token=engine.detokenize([int(bos)]) if bos else "",
        )

    def render(self, messages: list[Message]) -> str:
        """The prompt text for `messages`, ending with the assistant's generation prefix."""
        return self._formatter(messages=messages).prompt


def chat_tokens(engine: Engine, template: ChatTemplate, messages: list[Message]) -> list[int]:
    return engine.tokenize(template.render(messages), special=True)
