"""The tiny GGUF fixtures load in llama.cpp, tokenize losslessly and give usable logits."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from tests.conftest import OTHER_VOCAB_EXTRA_TOKENS, TEACHER_KW
from tests.tiny_gguf import (
    DEFAULT_WORDS,
    QWEN_CHAT_TEMPLATE,
    TINY_VOCAB_SIZE,
    tiny_vocab_size,
    write_tiny_gguf,
)

TEXT = "Hello world 12+3=15"


def load(path: Path, **kw) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, **kw)


def last_logits(path: Path, text: str = TEXT) -> np.ndarray:
    """Logits after prefilling ``text``, through the low-level API only."""
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp could not load {path}"
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 256
    cparams.n_batch = 256
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    assert ctx
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        raw = text.encode()
        buf = (llama_cpp.llama_token * 256)()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, 256, False, False)
        assert 0 < n < 256
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(buf, n)) == 0
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def test_vocab_sizes(tiny_gguf, tiny_teacher_gguf, tiny_other_vocab_gguf):
    assert 256 + 3 < TINY_VOCAB_SIZE < 1000
    assert load(tiny_gguf, vocab_only=True).n_vocab() == TINY_VOCAB_SIZE
    assert load(tiny_teacher_gguf, vocab_only=True).n_vocab() == TINY_VOCAB_SIZE
    other = load(tiny_other_vocab_gguf, vocab_only=True).n_vocab()
    assert other == tiny_vocab_size(extra_tokens=OTHER_VOCAB_EXTRA_TOKENS) != TINY_VOCAB_SIZE


@pytest.mark.parametrize("text", [TEXT, " the answer is 42.\n\n", "héllo wörld 😀\tend"])
def test_tokenizer_round_trip(tiny_gguf, text):
    llm = load(tiny_gguf, vocab_only=True)
    tokens = llm.tokenize(text.encode(), add_bos=False)
    assert tokens and max(tokens) < TINY_VOCAB_SIZE
    assert llm.detokenize(tokens).decode() == text


def test_merges_and_special_tokens(tiny_gguf):
    llm = load(tiny_gguf, vocab_only=True)
    # Every default word is one merged token; digits are split one by one (qwen2 pre-tokenizer).
    for word in DEFAULT_WORDS:
        assert len(llm.tokenize(word.encode(), add_bos=False)) == 1, word
    assert len(llm.tokenize(b"12345", add_bos=False)) == 5
    im_start, im_end = llm.tokenize(b"<|im_start|><|im_end|>", add_bos=False, special=True)
    assert llm.token_eos() == im_end
    assert llm._model.token_get_attr(im_start) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    assert llm.metadata["tokenizer.chat_template"] == QWEN_CHAT_TEMPLATE


def test_logits_finite_varied_and_seeded(tiny_gguf, tmp_path):
    logits = last_logits(tiny_gguf)
    assert logits.shape == (TINY_VOCAB_SIZE,)
    assert np.isfinite(logits).all()
    assert logits.std() > 0.1
    assert not np.allclose(logits, last_logits(tiny_gguf, "something else"))
    other_seed = last_logits(write_tiny_gguf(tmp_path / "seed1.gguf", seed=1))
    assert not np.allclose(logits, other_seed)


def test_teacher_logits(tiny_teacher_gguf):
    logits = last_logits(tiny_teacher_gguf)
    assert logits.shape == (TINY_VOCAB_SIZE,)
    assert np.isfinite(logits).all() and logits.std() > 0.1
    assert load(tiny_teacher_gguf).n_embd() == TEACHER_KW["n_embd"]


def test_completion_runs(tiny_gguf):
    out = load(tiny_gguf).create_completion("Hello", max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] <= 8
    assert isinstance(out["choices"][0]["text"], str)


def test_embeddings_pooling_none(tiny_gguf):
    llm = load(tiny_gguf, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
    rows = llm.embed(TEXT)
    n_tokens = len(llm.tokenize(TEXT.encode(), add_bos=False))
    assert np.asarray(rows).shape == (n_tokens, llm.n_embd()) == (n_tokens, 64)
    assert np.isfinite(rows).all()
