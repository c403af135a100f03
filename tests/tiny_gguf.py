"""Tiny random-weight GGUF models that llama.cpp loads and runs, for fast unit tests.

The models use the ``qwen2`` architecture (the one Qwen2.5 uses: q/k/v projections with
biases, RoPE, RMSNorm, SwiGLU FFN, separate ``output.weight``) in F32, with a byte-level
GPT-2 style BPE tokenizer whose vocabulary is:

    ids 0..255          one token per byte (token id == byte value), in GPT-2's
                        byte-to-unicode spelling, so any text tokenizes;
    next                one token per merge result (built from ``vocab`` words);
    next                ``extra_tokens`` unused filler tokens (to change the vocab size);
    last                <|endoftext|>, <|im_start|>, <|im_end|> as CONTROL tokens.

Use :func:`tiny_vocab_size` (or ``TINY_VOCAB_SIZE`` for the defaults) to know the size.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import gguf
import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML as in Qwen2.5 (without the tool-calling branches): a default system prompt is
# inserted when the conversation does not start with one.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Plain-text words that become merged BPE tokens (a leading space is spelled "Ġ").
# fmt: off
DEFAULT_WORDS: tuple[str, ...] = (
    " the", " and", " to", " of", " a", " in", " is", " it", " that", " for",
    " you", " with", " on", " as", " are", " this", " be", " at", " or", " not",
    "the", "he", "in", "er", "an", "on", "re", "at", "en", "es", "or", "ing", "ed",
    "Hello", " Hello", " world", " hello", " answer", " question", " think",
    " step", " Let", " The", " So", " We", " number", " equals", " plus", " minus",
    " times", " yes", " no", " True", " False",
    "system", "user", "assistant", "\n\n", ".\n", " =", " +", "  ", "    ",
)
# fmt: on


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level(text: str) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split ``word`` with GPT-2 BPE: repeatedly apply the lowest-ranked merge."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(pairwise(parts))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_vocab(
    vocab: list[str] | None = None, extra_tokens: int = 0, eos: str = "<|im_end|>"
) -> tuple[list[str], list[int], list[str]]:
    """Return ``(tokens, token_types, merges)`` for the tiny byte-level BPE tokenizer.

    ``vocab`` lists plain-text words. Each word is first split by the merges so far, then
    its pieces are merged left to right, so every word (taken alone) becomes one token.
    """
    table = _byte_to_unicode()
    tokens = [table[b] for b in range(256)]
    types = [int(gguf.TokenType.NORMAL)] * 256
    seen = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in DEFAULT_WORDS if vocab is None else vocab:
        pieces = _bpe(_byte_level(word), ranks)
        for right in pieces[1:]:
            ranks.setdefault((pieces[0], right), len(ranks))
            pieces[0] += right
            if pieces[0] not in seen:
                tokens.append(pieces[0])
                types.append(int(gguf.TokenType.NORMAL))
                seen.add(pieces[0])
    merges = [f"{a} {b}" for a, b in ranks]  # dicts keep insertion (= rank) order
    for i in range(extra_tokens):
        tokens.append(f"<|extra_{i}|>")
        types.append(int(gguf.TokenType.UNUSED))
    specials = list(SPECIAL_TOKENS) + ([eos] if eos not in SPECIAL_TOKENS else [])
    for tok in specials:
        tokens.append(tok)
        types.append(int(gguf.TokenType.CONTROL))
    return tokens, types, merges


def tiny_vocab_size(vocab: list[str] | None = None, extra_tokens: int = 0) -> int:
    """Vocabulary size of a model written with the same ``vocab``/``extra_tokens``."""
    return len(build_vocab(vocab, extra_tokens)[0])


TINY_VOCAB_SIZE = tiny_vocab_size()


def write_tiny_gguf(
    path: Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx: int = 256,
    vocab: list[str] | None = None,
    extra_tokens: int = 0,
    eos: str = "<|im_end|>",
    chat_template: str | None = QWEN_CHAT_TEMPLATE,
) -> Path:
    """Write a random-weight qwen2 GGUF model to ``path`` and return ``path``."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    path = Path(path)
    tokens, types, merges = build_vocab(vocab, extra_tokens, eos)
    n_vocab = len(tokens)
    n_embd_kv = n_embd // n_head * n_head_kv
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # numpy shapes are (rows, cols) = reversed ggml shapes: a ggml {n_in, n_out} weight
    # is a numpy (n_out, n_in) matrix.
    tensors: dict[str, np.ndarray] = {"token_embd.weight": normal(n_vocab, n_embd)}
    for i in range(n_layer):
        tensors.update(
            {
                f"blk.{i}.attn_norm.weight": ones(n_embd),
                f"blk.{i}.attn_q.weight": normal(n_embd, n_embd),
                f"blk.{i}.attn_q.bias": normal(n_embd),
                f"blk.{i}.attn_k.weight": normal(n_embd_kv, n_embd),
                f"blk.{i}.attn_k.bias": normal(n_embd_kv),
                f"blk.{i}.attn_v.weight": normal(n_embd_kv, n_embd),
                f"blk.{i}.attn_v.bias": normal(n_embd_kv),
                f"blk.{i}.attn_output.weight": normal(n_embd, n_embd),
                f"blk.{i}.ffn_norm.weight": ones(n_embd),
                f"blk.{i}.ffn_gate.weight": normal(n_ff, n_embd),
                f"blk.{i}.ffn_up.weight": normal(n_ff, n_embd),
                f"blk.{i}.ffn_down.weight": normal(n_embd, n_ff),
            }
        )
    tensors["output_norm.weight"] = ones(n_embd)
    # The final hidden state is RMS-normalised (unit scale), so std 1/sqrt(n_embd) gives
    # logits of roughly unit spread: a peaked-but-not-degenerate softmax.
    tensors["output.weight"] = normal(n_vocab, n_embd, std=n_embd**-0.5)

    arch = "qwen2"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-qwen2-seed{seed}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)

    writer.add_tokenizer_model("gpt2")
    # "qwen2" selects LLAMA_VOCAB_PRE_TYPE_QWEN2 in llama-vocab.cpp (the regex Qwen2.5
    # GGUFs use: single digits, contractions, letters, punctuation, whitespace).
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    endoftext = tokens.index("<|endoftext|>")
    # Same conventions as Qwen2.5: bos = pad = <|endoftext|> but no BOS is prepended.
    writer.add_bos_token_id(endoftext)
    writer.add_eos_token_id(tokens.index(eos))
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(endoftext)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
