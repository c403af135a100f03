"""The tokenizer half of `Engine`: text <-> token ids, token bytes, end-of-turn ids, GGUF metadata."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp

from s2t_edge.errors import S2TError


class Vocab:
    """Tokenizer calls on a loaded llama.cpp model; the class that mixes it in sets `_model` and
    `_vocab`."""

    _model: llama_cpp.llama_model_p
    _vocab: llama_cpp.llama_vocab_p

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text` (no BOS added; `special` parses control tokens like <|im_end|>)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes from argv or stdin (surrogate escapes)
            raise S2TError("the input is not valid UTF-8 text") from None
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, -n, False, special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character); `special` spells control
        tokens such as <|im_end|> (otherwise they are empty)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT or any other end-of-turn token of the vocabulary."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None
