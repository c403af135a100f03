"""A thin engine over llama-cpp-python's low-level API: prefill, one-token steps, logits, hidden state.

The engine owns its own `llama_batch`/`llama_decode` loop so the decode loop above it can read the
last position's logits as a zero-copy numpy view and, when asked, the final hidden state of the
same step (context with embeddings on and pooling NONE).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from s2t_edge.backend import MAX_THREADS, default_threads, init_backend
from s2t_edge.errors import S2TError
from s2t_edge.lora import LoraAdapter
from s2t_edge.store import check_gguf_file
from s2t_edge.vocab import Vocab


class ContextOverflow(S2TError):
    """The input does not fit the context (a user error: shorten it or raise --ctx)."""


def reusable_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading `tokens` a cache holding `cached` can keep: the common prefix, less one
    when it covers all of `tokens` (the last token must be decoded again to get its logits)."""
    if not tokens:
        raise S2TError("empty prompt")
    common = 0
    for a, b in zip(cached, tokens):
        if a != b:
            break
        common += 1
    return min(common, len(tokens) - 1)


class Engine(Vocab):
    """One GGUF model and one llama.cpp context, decoded token by token.

    `hidden=True` makes `step()` also expose the final hidden state (`self.hidden`); the prompt is
    still prefilled with embeddings off, so it does not produce an output row for every token.
    `n_seq` > 1 lets several sequences share the context (`n_ctx` cells in total): with a unified
    KV cache (the default) forked samples share the prompt's cells; `unified=False` gives each
    sequence its own `n_ctx / n_seq` cells, but llama.cpp then splits a step over non-consecutive
    sequences into several ubatches (`benchmarks/kv_layout.py`).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        hidden: bool = False,
        n_seq: int = 1,
        n_batch: int = 512,
        unified: bool | None = None,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
    ) -> None:
        threads = n_threads or default_threads()
        if not 1 <= threads <= MAX_THREADS:
            raise S2TError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
        init_backend()
        self.path = check_gguf_file(model_path)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # Extra CPU buffer types (AMX / repacked weights) are off by default: the AMX kernels
        # crash on some virtualised Xeons. S2T_EDGE_EXTRA_BUFTS=1 turns them back on.
        mparams.use_extra_bufts = bool(os.environ.get("S2T_EDGE_EXTRA_BUFTS"))
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise S2TError(
                f"{self.path}: llama.cpp could not load this GGUF (corrupt or truncated?); "
                f"check it with `s2t-edge models verify {self.path}`"
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        # keeping a sequence's first n cells needs full attention (no sliding window, no recurrent state)
        self.partial_reuse = not (
            llama_cpp.llama_model_n_swa(self._model)
            or llama_cpp.llama_model_is_recurrent(self._model)
            or llama_cpp.llama_model_is_hybrid(self._model)
        )
        cparams = llama_cpp.llama_context_default_params()
        unified = n_seq > 1 if unified is None else unified
        # n_ctx is the total over all sequences; no sequence may outgrow the trained context
        n_ctx = n_ctx if n_ctx > 0 else self.n_ctx_train
        if unified:
            cparams.n_ctx = min(n_ctx, self.n_ctx_train * n_seq)
        else:  # a separate cache per sequence
            cparams.n_ctx = min(n_ctx // n_seq, self.n_ctx_train) * n_seq
        # llama.cpp caps its batch at the context: ask for no more, and read back what it took
        # (chunks larger than its batch reach a GGML assert, not an error code)
        cparams.n_batch = cparams.n_ubatch = max(1, min(n_batch, cparams.n_ctx))
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.embeddings = False
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        cparams.kv_unified = unified
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise S2TError(f"{self.path}: could not create a context of {cparams.n_ctx} tokens")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        # positions one sequence may reach (llama.cpp may pad its own figure)
        self.n_ctx_seq = min(llama_cpp.llama_n_ctx_seq(self._ctx), self.n_ctx_train)
        self.n_ctx_asked = cparams.n_ctx
        self.n_batch = min(llama_cpp.llama_n_batch(self._ctx), llama_cpp.llama_n_ubatch(self._ctx))
        if self.n_batch < n_seq:  # one step decodes a token of every sequence in one batch
            self.close()
            raise S2TError(f"a context of {cparams.n_ctx} tokens is too small for {n_seq} sequences; raise --ctx")
        self.n_seq = n_seq
        self.hidden_enabled = hidden
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, n_seq)
        self.tokens: list[int] = []  # what sequence 0 holds in the KV cache
        self.hidden: np.ndarray | None = None
        self.hidden_rows: list[np.ndarray] = []
        self._embeddings_on = False
        # LoRA adapter (optional): loaded once, applied to the context; see load_lora / use_lora
        self._lora: LoraAdapter | None = None
        self.lora_on = False
        if lora is not None:
            self.load_lora(lora, lora_scale)

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and the model (also done on garbage collection)."""
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_lora", None):  # after the context that uses it, before its model
            self._lora.free()
            self._lora = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- LoRA adapter ----------------------------------------------------------------------

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Load a GGUF LoRA adapter made for this model and switch it on (S2TError, one line,
        if llama.cpp refuses it: unreadable, truncated, another architecture or other shapes)."""
        if self._lora:
            raise S2TError(f"{self.path.name}: a LoRA adapter is already loaded ({self._lora.path})")
        self._lora = LoraAdapter(self._model, self.path.name, path, scale)
        self.use_lora(True)

    def set_lora_scale(self, scale: float) -> None:
        """Scale the loaded adapter's update (0 gives the base model's logits, 2 doubles the
        update); the KV cache was computed at the old scale, so it is dropped."""
        if not self._lora:
            raise S2TError(f"{self.path.name}: no LoRA adapter loaded")
        self._lora.scale = float(scale)
        if self.lora_on:
            self._lora.apply(self._ctx, True)
            self.reset()

    @property
    def lora_path(self) -> Path | None:
        """The loaded adapter's file, or None."""
        return self._lora.path if self._lora else None

    @property
    def lora_scale(self) -> float | None:
        """The scale the loaded adapter is applied at, or None."""
        return self._lora.scale if self._lora else None

    def use_lora(self, on: bool) -> None:
        """Switch the loaded adapter on or off. The KV cache was computed by the other model, so
        it is dropped whenever this changes anything."""
        if on and not self._lora:
            raise S2TError(f"{self.path.name}: no LoRA adapter loaded")
        if on == self.lora_on:
            return
        self._lora.apply(self._ctx, on)
        self.lora_on = on
        self.reset()

    # ---- decoding --------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        """Forget every sequence (clear the KV cache)."""
        llama_cpp.llama_memory_clear(self._mem, True)
        self.tokens = []
        self.hidden = None

    def load(self, tokens: Sequence[int]) -> np.ndarray:
        """Make sequence 0 hold exactly `tokens`, reusing the cached common prefix.

        Returns the last position's logits. Multi-turn chat and a teacher catching up with the
        accepted tokens both go through here, so only the new suffix is ever decoded.
        """
        common = reusable_prefix(self.tokens, tokens)
        if not self.partial_reuse and common < len(self.tokens):
            common = 0  # only a plain extension keeps the cache of a sliding window or recurrent state
        # Trim even when `self.tokens` is all common: a decode interrupted by Ctrl-C after
        # llama_decode but before `self.tokens` was updated leaves extra cells in the cache.
        llama_cpp.llama_memory_seq_rm(self._mem, 0, common, -1)
        del self.tokens[common:]
        return self.prefill(tokens[common:])

    def _set_embeddings(self, on: bool) -> None:
        if on != self._embeddings_on:
            llama_cpp.llama_set_embeddings(self._ctx, on)
            self._embeddings_on = on

    def _check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx_seq:
            raise ContextOverflow(
                f"context overflow: {self.n_past} tokens in context + {n_new} new > the context of "
                f"{self.n_ctx_seq} tokens{self._rounded()}; shorten the input or raise --ctx"
            )

    def _rounded(self) -> str:
        """Why the context differs from what was asked (llama.cpp pads it; the model caps it)."""
        asked = self.n_ctx_asked // self.n_seq
        return f" (--ctx {asked} became {self.n_ctx_seq})" if asked != self.n_ctx_seq else ""

    def _decode(
        self, tokens: Sequence[int], pos: int | Sequence[int], outputs: Sequence[bool], seq: int | Sequence[int] = 0
    ) -> None:
        """One llama_decode; `pos` is the first position (then consecutive) or one per token, `seq`
        one sequence for all tokens or one per token."""
        b = self._batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos + i if isinstance(pos, int) else pos[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq if isinstance(seq, int) else seq[i]
            b.logits[i] = outputs[i]
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc == 1:  # no room in the KV cache for this batch (its cells are shared by all sequences)
            raise ContextOverflow(
                f"context overflow: the cache of {self.n_ctx} tokens shared by {self.n_seq} sequence(s) is full; "
                "raise --ctx"
            )
        if rc != 0:
            raise S2TError(f"llama_decode failed (code {rc}); is the context full?")

    def _prefill(self, tokens: Sequence[int], seq: int, pos0: int, track: bool) -> np.ndarray:
        """Decode `tokens` into `seq` from `pos0` in chunks, outputs for the last token only (with
        `hidden=True` it runs alone with embeddings on); `track` keeps `self.tokens` in step."""
        head = tokens[:-1] if self.hidden_enabled else tokens
        self._set_embeddings(False)
        for start in range(0, len(head), self.n_batch):
            chunk = head[start : start + self.n_batch]
            last = start + len(chunk) == len(head) and not self.hidden_enabled
            self._decode(chunk, pos0 + start, [False] * (len(chunk) - 1) + [last], seq)
            if track:
                self.tokens.extend(chunk)
        if self.hidden_enabled:
            self._set_embeddings(True)
            self._decode(tokens[-1:], pos0 + len(tokens) - 1, (True,), seq)
            if track:
                self.tokens.append(tokens[-1])
            self.hidden = self._hidden(-1)
        return self.logits()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to sequence 0 and return the last position's logits (a view).

        With `hidden=True` the last token is decoded on its own with embeddings on, so
        `self.hidden` holds its final hidden state while the rest of the prompt produced no output.
        """
        if not tokens:
            raise S2TError("empty prompt")
        self._check_room(len(tokens))
        return self._prefill(tokens, 0, self.n_past, track=True)

    def step(self, token: int) -> np.ndarray:
        """Append one token to sequence 0 and return its logits (a view valid until the next call)."""
        self._check_room(1)
        self._set_embeddings(self.hidden_enabled)
        self._decode((token,), self.n_past, (True,))
        self.tokens.append(token)
        if self.hidden_enabled:
            self.hidden = self._hidden(-1)
        return self.logits()

    def logits(self, i: int = -1) -> np.ndarray:
        """Zero-copy view of the logits of batch token `i` of the last decode (-1: the last output).

        Valid until the next decode."""
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise S2TError("no logits for this position (was it marked as an output?)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def score(self, tokens: Sequence[int], first_output: int) -> Iterator[tuple[int, np.ndarray]]:
        """Prefill `tokens` after a reset and yield (position, logits) from `first_output` on.

        The logits at position p predict token p+1: teacher-scoring a whole trajectory in one
        prefill instead of token by token. Views are valid only until the next iteration.
        """
        self.reset()
        self._check_room(len(tokens))
        self._set_embeddings(False)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            outs = [start + i >= first_output for i in range(len(chunk))]
            self._decode(chunk, start, outs)
            self.tokens.extend(chunk)
            for i, out in enumerate(outs):
                if out:
                    yield start + i, self.logits(i)  # indexed by position in the batch

    # ---- several sequences (parallel sampling) ---------------------------------------------

    def fork(self, n: int, src: int = 0) -> None:
        """Share sequence `src`'s cache with sequences src+1 .. src+n-1 (call after prefill)."""
        if src + n > self.n_seq:
            raise S2TError(f"engine was built for {self.n_seq} sequences, asked for {src + n}")
        for s in range(src + 1, src + n):
            self.copy_seq(src, s)

    def copy_seq(self, src: int, dst: int) -> None:
        """Give the empty sequence `dst` sequence `src`'s cache (its prefill, not recomputed)."""
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def step_many(self, tokens: Sequence[int], seqs: Sequence[int], pos: int | Sequence[int]) -> list[np.ndarray]:
        """One token for each of several sequences, in one batch; `pos` is shared or per sequence.

        Returns one logits view per token, in the caller's order; with `hidden=True`,
        `self.hidden_rows` holds the final hidden state of each (views valid until the next decode)."""
        positions = [pos] * len(tokens) if isinstance(pos, int) else list(pos)
        if max(positions) >= self.n_ctx_seq:
            raise ContextOverflow(
                f"context overflow: position {max(positions)} >= {self.n_ctx_seq} per sequence{self._rounded()}; "
                "raise --ctx"
            )
        # decoded in ascending ids: with a cache per sequence llama.cpp cuts a batch into one ubatch
        # per run of consecutive ids in the batch's order (up to 1.8x slower steps otherwise)
        order = sorted(range(len(tokens)), key=lambda i: seqs[i])
        row = {i: j for j, i in enumerate(order)}  # caller's index -> batch row
        batch_tokens, batch_pos, batch_seqs = zip(*[(tokens[i], positions[i], seqs[i]) for i in order])
        self._set_embeddings(self.hidden_enabled)
        self._decode(batch_tokens, batch_pos, [True] * len(tokens), batch_seqs)
        if self.hidden_enabled:
            self.hidden_rows = [self._hidden(row[i]) for i in range(len(tokens))]
        return [self.logits(row[i]) for i in range(len(tokens))]

    def prefill_seq(self, tokens: Sequence[int], seq: int, *, reuse: tuple[int, int] | None = None) -> np.ndarray:
        """Decode `tokens` into the empty sequence `seq` from position 0; returns the last logits
        (a view). With `hidden=True` the last token runs alone with embeddings on (`self.hidden`).
        `reuse=(src, n)`: sequence `src` holds `tokens[:n]` at positions 0..n-1 (0 < n < len(tokens));
        those cells are copied instead of recomputed (`src == seq`: kept, `seq` need not be empty),
        and only the rest is decoded."""
        if not tokens:
            raise S2TError("empty prompt")
        if len(tokens) > self.n_ctx_seq:
            raise ContextOverflow(
                f"context overflow: a {len(tokens)}-token prompt > {self.n_ctx_seq} per sequence{self._rounded()}; "
                "shorten it or raise --ctx"
            )
        if reuse is None:
            return self._prefill(tokens, seq, 0, track=False)
        src, n = reuse
        if not 0 < n < len(tokens):
            raise ValueError(f"reuse of {n} tokens of a {len(tokens)}-token prompt")
        if not self.partial_reuse:
            raise ValueError("this model's cache cannot keep part of a sequence (sliding window or recurrent)")
        # a cache per sequence copies only whole sequences: copy all of src, then drop what follows the prefix
        if src != seq:
            self.copy_seq(src, seq)
        llama_cpp.llama_memory_seq_rm(self._mem, seq, n, -1)
        return self._prefill(tokens[n:], seq, n, track=False)

    def _hidden(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_embeddings_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,))

    def drop_seq(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
