"""A teacher run by Hugging Face transformers (GPU when present), for `s2t-edge collect --teacher DIR`.

`HFTeacher` offers the part of the `Engine` interface that collection uses (`score`, `load`,
`tokens`, `n_vocab`, `reset`, `close`), so a teacher too big for llama.cpp on a laptop labels the
same shards. Its scores only mean something on the SLM's ids, so `check_tokenizer_matches`
refuses a teacher whose tokenizer spells any id differently from the SLM's GGUF.

torch and transformers are imported only when a teacher is built: this module itself is cheap.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from s2t_edge.engine import reusable_prefix
from s2t_edge.errors import S2TError
from s2t_edge.store import sha256_file

if TYPE_CHECKING:
    from s2t_edge.engine import Engine

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory holding a Hugging Face `config.json`."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def weights_sha256(path: str | Path) -> str:
    """One sha256 for a model directory: over (name, sha256) of its weight files, sorted by name."""
    if not is_hf_model_dir(path):
        raise S2TError(f"{path}: not a Hugging Face model directory (no config.json)")
    files = sorted({f for pat in WEIGHT_PATTERNS for f in Path(path).glob(pat) if f.is_file()})
    if not files:
        raise S2TError(f"{path}: no weight files ({', '.join(WEIGHT_PATTERNS)}) in this model directory")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise S2TError(
            "a Hugging Face teacher needs the training extra: pip install torch==2.13.0 && "
            "pip install 's2t-edge[train]'"
        ) from e
    return torch, transformers


def pick_device(torch: Any) -> tuple[str, Any]:
    """cuda, else mps, else cpu; half precision on a GPU, float32 on the CPU."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps", torch.float16
    return "cpu", torch.float32


class HFTeacher:
    """A local transformers causal LM scored like an `Engine` teacher.

    Logits rows have `n_vocab` entries (default: the model's output size; pass the SLM's
    `n_vocab` to align). Ids the teacher's tokenizer does not have (padding rows of either
    model) get -inf, so the teacher never predicts a token it cannot spell.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_vocab: int | None = None,
        n_ctx: int | None = None,
        threads: int | None = None,
        device: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not is_hf_model_dir(self.path):
            raise S2TError(f"{self.path}: not a Hugging Face model directory (no config.json)")
        torch, transformers = _import_torch()
        self._torch = torch
        auto_device, dtype = pick_device(torch)
        self.device = device or auto_device
        if self.device == "cpu":
            dtype = torch.float32
            if threads:
                torch.set_num_threads(threads)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            # transformers >= 4.56 calls it `dtype`, older versions `torch_dtype`
            new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
            key = "dtype" if new else "torch_dtype"
            model = transformers.AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True, **{key: dtype})
        except (OSError, ValueError) as e:
            raise S2TError(f"{self.path}: transformers could not load this model directory: {e}") from e
        self.model = model.to(self.device).eval()
        head = self.model.get_output_embeddings()
        self.out_vocab = int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)
        self.n_tokens = len(self.tokenizer)  # ids the tokenizer can spell
        self.n_vocab = n_vocab or self.out_vocab
        self._n_real = min(self.n_tokens, self.out_vocab, self.n_vocab)
        self.n_ctx = n_ctx or int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.tokens: list[int] = []  # what the KV cache (`_past`) holds
        self._past: Any = None
        # keyword names moved across transformers versions: `past_key_values` became `cache` in
        # 5.x, `num_logits_to_keep` became `logits_to_keep` in 4.50
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    # ---- Engine-like interface -------------------------------------------------------------

    def reset(self) -> None:
        self.tokens, self._past = [], None

    def close(self) -> None:
        """Drop the model (and free GPU memory)."""
        self.reset()
        if getattr(self, "model", None) is not None:
            self.model = None
            if self.device == "cuda":
                self._torch.cuda.empty_cache()

    def _row(self, logits: Any) -> np.ndarray:
        """One float32 row of `n_vocab` logits; ids past the tokenizer's (padding) are -inf."""
        x = logits[: self._n_real].float().cpu().numpy()
        if self._n_real == self.n_vocab:
            return x
        row = np.full(self.n_vocab, -np.inf, np.float32)
        row[: self._n_real] = x
        return row

    def _check_room(self, n: int) -> None:
        if n > self.n_ctx:
            raise S2TError(f"context overflow: {n} tokens > n_ctx {self.n_ctx}; raise --ctx")

    def _forward(self, tokens: Sequence[int], keep: int, past: Any = None, use_cache: bool = False) -> tuple[Any, Any]:
        """Logits of the last `keep` positions (only those go through the LM head) and the cache."""
        torch = self._torch
        kw: dict[str, Any] = {"use_cache": use_cache}
        if use_cache:
            kw[self._cache_kw] = past
        if self._keep_kw:
            kw[self._keep_kw] = keep
        with torch.no_grad():
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, **kw)
        return out.logits[0, -keep:], getattr(out, self._cache_kw) if use_cache else None

    def score(self, tokens: Sequence[int], first_output: int) -> Iterator[tuple[int, np.ndarray]]:
        """One forward pass over `tokens`; yield (position, logits) for positions >= `first_output`."""
        self.reset()
        self._check_room(len(tokens))
        n_out = len(tokens) - first_output
        if n_out <= 0:
            return
        logits, _ = self._forward(tokens, n_out)
        for i in range(n_out):
            yield first_output + i, self._row(logits[i])

    def load(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits after `tokens`, reusing the cached common prefix (like `Engine.load`)."""
        common = reusable_prefix(self.tokens, tokens)
        self._check_room(len(tokens))
        if self._past is not None and 0 < common < len(self.tokens):
            try:  # a negative count means "drop that many" in every transformers version
                self._past.crop(common - len(self.tokens))
            except (AttributeError, RuntimeError, ValueError):  # a cache that cannot roll back
                self._past = None
        if self._past is None or common == 0:
            self._past, common = None, 0
        self.tokens = []  # until the forward pass succeeds
        logits, self._past = self._forward(tokens[common:], 1, self._past, use_cache=True)
        self.tokens = list(tokens)
        return self._row(logits[-1])


def _gguf_vocab(path: Path) -> tuple[list[str], list[int]]:
    """Token strings and token types stored in a GGUF (`tokenizer.ggml.tokens` / `token_type`)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    toks, types = reader.get_field("tokenizer.ggml.tokens"), reader.get_field("tokenizer.ggml.token_type")
    if toks is None:
        raise S2TError(f"{path}: the GGUF holds no tokenizer.ggml.tokens")
    strings = [bytes(toks.parts[i]).decode("utf-8", "replace") for i in toks.data]
    kinds = [int(types.parts[i][0]) for i in types.data] if types is not None else [1] * len(strings)
    return strings, kinds


def check_tokenizer_matches(slm: Engine, teacher: HFTeacher) -> None:
    """Refuse (S2TError) a teacher whose ids do not mean the SLM's tokens.

    Rule: every id of the teacher's tokenizer spells the same token as the SLM's GGUF; SLM ids
    beyond the teacher's tokenizer must be padding (GGUF type UNUSED, as Qwen2.5's 151,665..151,935);
    the model has an output row for every tokenizer id; and the rows are aligned to the SLM's
    `n_vocab` (build the teacher with `n_vocab=slm.n_vocab`: extra rows are cut, missing ones -inf).

    Token *strings* are compared, not decoded bytes: GGUF stores the tokenizer's own spelling
    (byte-level BPE "Ġthe", SentencePiece "▁the", specials "<|im_end|>"), which is exactly what
    `convert_ids_to_tokens` returns, so no decoding step (that control tokens would defeat,
    `Engine.token_bytes` renders them empty) can hide a difference.
    """
    from gguf import TokenType

    n_tok, name = teacher.n_tokens, teacher.path.name
    if n_tok > slm.n_vocab:
        raise S2TError(
            f"teacher tokenizer ({name}) has {n_tok} tokens, the SLM only {slm.n_vocab} ids; "
            "S2T needs one shared tokenizer"
        )
    if teacher.out_vocab < n_tok:
        raise S2TError(f"teacher model ({name}) has {teacher.out_vocab} output rows for {n_tok} tokenizer ids")
    if teacher.n_vocab != slm.n_vocab:
        raise S2TError(f"teacher logits have {teacher.n_vocab} rows ({name}), the SLM has {slm.n_vocab} ids")
    slm_tokens, slm_types = _gguf_vocab(slm.path)
    if len(slm_tokens) != slm.n_vocab:
        raise S2TError(f"{slm.path.name}: {len(slm_tokens)} GGUF tokens but {slm.n_vocab} ids")
    mine = teacher.tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    for i, (a, b) in enumerate(zip(mine, slm_tokens)):
        if a != b:
            raise S2TError(f"teacher tokenizer differs from the SLM's at id {i}: {a!r} vs {b!r} ({name})")
    for i in range(n_tok, slm.n_vocab):
        if slm_types[i] != int(TokenType.UNUSED):
            raise S2TError(
                f"SLM token {i} ({slm_tokens[i]!r}) is not in the teacher's tokenizer ({name}, {n_tok} tokens)"
            )
