"""A Hugging Face transformers teacher for `collect`, on a tiny random-weight Qwen2 built here.

The HF model directory gets a fast tokenizer built from the same vocabulary and merges as the
tiny GGUF SLM (tests/tiny_gguf.py), so its ids mean the SLM's tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from s2t_edge.train.hf_teacher import HFTeacher, check_tokenizer_matches, is_hf_model_dir, weights_sha256
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from s2t_edge.cli import main
from s2t_edge.collect import collect, problem_prompt
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.prompt import ChatTemplate
from s2t_edge.shards import POSITION_FIELDS, iter_shards, read_manifest, shard_paths
from tests.tiny_gguf import TINY_VOCAB_SIZE, build_vocab

torch.set_num_threads(1)

K = 4
MAX_TOKENS = 8
N_CTX = 512
ATOL = 1e-4
SWAP = (300, 301)  # two merged tokens of the tiny vocabulary
PROBLEMS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "#### 12"},
]


def write_hf_model(
    d: Path,
    *,
    vocab_size: int = TINY_VOCAB_SIZE,
    swap: tuple[int, int] | None = None,
    drop_specials: bool = False,
    seed: int = 0,
) -> Path:
    """A random-weight Qwen2ForCausalLM + fast byte-level BPE tokenizer (the tiny GGUF's vocab)."""
    tokens, types, merges = build_vocab()
    if swap:
        i, j = swap
        tokens[i], tokens[j] = tokens[j], tokens[i]
    control = int(gguf.TokenType.CONTROL)
    specials = [t for t, ty in zip(tokens, types) if ty == control]  # the last ids
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != control}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if not drop_specials:
        tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


def forward(d: Path, tokens: list[int]) -> np.ndarray:
    """Per-position logits of a plain forward pass of the saved model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_model(tmp_path_factory.mktemp("hf") / "tiny-hf-teacher")


@pytest.fixture(scope="module")
def teacher(hf_dir: Path) -> HFTeacher:
    return HFTeacher(hf_dir, threads=1, device="cpu")


@pytest.fixture(scope="module")
def slm(tiny_gguf: Path) -> Engine:
    return Engine(tiny_gguf, n_ctx=256, n_threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "gsm.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    return p


def some_tokens(n: int = 12, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, TINY_VOCAB_SIZE, n)]


def test_score_rows_equal_plain_forward(teacher: HFTeacher, hf_dir: Path) -> None:
    toks = some_tokens()
    ref = forward(hf_dir, toks)
    rows = list(teacher.score(toks, 5))
    assert [p for p, _ in rows] == list(range(5, len(toks)))
    for p, row in rows:
        assert row.dtype == np.float32 and row.shape == (TINY_VOCAB_SIZE,) == (teacher.n_vocab,)
        np.testing.assert_allclose(row, ref[p], atol=ATOL)
    assert list(teacher.score(toks, len(toks))) == []


def test_load_equals_last_row_and_reuses_prefix(teacher: HFTeacher, hf_dir: Path) -> None:
    toks = some_tokens()
    teacher.reset()
    np.testing.assert_allclose(teacher.load(toks), forward(hf_dir, toks)[-1], atol=ATOL)
    assert teacher.tokens == toks
    for seq in (toks + [7, 8], toks[:4] + [9], toks[:4] + [9], [3]):  # extend, crop, same, restart
        np.testing.assert_allclose(teacher.load(seq), forward(hf_dir, seq)[-1], atol=ATOL)
        assert teacher.tokens == seq
    with pytest.raises(S2TError, match="empty prompt"):
        teacher.load([])
    with pytest.raises(S2TError, match="context overflow"):
        list(teacher.score([1] * (N_CTX + 1), 0))


def test_tokenizer_matches(slm: Engine, hf_dir: Path) -> None:
    assert is_hf_model_dir(hf_dir) and not is_hf_model_dir(hf_dir / "config.json")
    t = HFTeacher(hf_dir, n_vocab=slm.n_vocab, threads=1, device="cpu")
    assert t.n_tokens == t.out_vocab == slm.n_vocab
    check_tokenizer_matches(slm, t)
    t.close()


def test_swapped_tokens_refused(slm: Engine, tmp_path: Path) -> None:
    t = HFTeacher(write_hf_model(tmp_path / "swapped", swap=SWAP), n_vocab=slm.n_vocab, device="cpu")
    with pytest.raises(S2TError, match=f"differs from the SLM's at id {SWAP[0]}: "):
        check_tokenizer_matches(slm, t)


def test_missing_slm_tokens_refused(slm: Engine, tmp_path: Path) -> None:
    # the SLM's trailing ids are real (control) tokens, not padding: the teacher must know them
    t = HFTeacher(write_hf_model(tmp_path / "nospecial", drop_specials=True), n_vocab=slm.n_vocab, device="cpu")
    # (transformers 5 loads it as a Qwen2Tokenizer, which adds <|endoftext|> by itself)
    first_missing = f"({TINY_VOCAB_SIZE - 3}|{TINY_VOCAB_SIZE - 2})"
    with pytest.raises(S2TError, match=f"SLM token {first_missing} .* not in the teacher"):
        check_tokenizer_matches(slm, t)


def test_vocab_sizes(slm: Engine, tmp_path: Path) -> None:
    small = write_hf_model(tmp_path / "small", vocab_size=TINY_VOCAB_SIZE - 8)
    with pytest.raises(S2TError, match=f"{TINY_VOCAB_SIZE - 8} output rows for {TINY_VOCAB_SIZE} tokenizer ids"):
        check_tokenizer_matches(slm, HFTeacher(small, n_vocab=slm.n_vocab, device="cpu"))
    # a bigger output layer (Qwen2.5-7B: 152,064 rows vs the 0.5B GGUF's 151,936): padding rows,
    # refused unless aligned to the SLM's ids, then cut off
    big = write_hf_model(tmp_path / "big", vocab_size=TINY_VOCAB_SIZE + 24)
    with pytest.raises(S2TError, match=f"teacher logits have {TINY_VOCAB_SIZE + 24} rows"):
        check_tokenizer_matches(slm, HFTeacher(big, device="cpu"))
    t = HFTeacher(big, n_vocab=slm.n_vocab, device="cpu")
    check_tokenizer_matches(slm, t)
    toks = some_tokens(6)
    ((_, row),) = t.score(toks, len(toks) - 1)
    np.testing.assert_allclose(row, forward(big, toks)[-1, :TINY_VOCAB_SIZE], atol=ATOL)
    # the other way round: rows the model lacks are -inf (never predicted)
    t = HFTeacher(big, n_vocab=TINY_VOCAB_SIZE + 40, device="cpu")
    row = t.load(toks)
    assert row.shape == (TINY_VOCAB_SIZE + 40,) and np.isneginf(row[TINY_VOCAB_SIZE:]).all()
    assert np.isfinite(row[:TINY_VOCAB_SIZE]).all()


def test_not_a_model_dir_and_missing_extra(tmp_path: Path, hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(S2TError, match="not a Hugging Face model directory"):
        HFTeacher(tmp_path)
    with pytest.raises(S2TError, match="not a Hugging Face model directory"):
        weights_sha256(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(S2TError, match=r"training extra.*s2t-edge\[train\]"):
        HFTeacher(hf_dir)


def run(slm: Path, teacher: Path, data: Path, out: Path, **kw) -> dict:
    kw = {"k": K, "max_tokens": MAX_TOKENS, "n_ctx": N_CTX, "threads": 1, "progress": False, **kw}
    return collect(slm, teacher, data, out, **kw)


def test_collect_same_shards_as_gguf_teacher(
    tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, hf_dir: Path, data: Path, slm: Engine
) -> None:
    run(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "gguf")
    m = run(tiny_gguf, hf_dir, data, tmp_path / "hf")
    a_shards, b_shards = list(iter_shards(tmp_path / "gguf")), list(iter_shards(tmp_path / "hf"))
    assert len(a_shards) == len(b_shards) == len(PROBLEMS)
    for (ma, a), (mb, b) in zip(a_shards, b_shards):
        assert ma["problem_id"] == mb["problem_id"] and set(a) == set(b) >= set(POSITION_FIELDS)
        for f in POSITION_FIELDS:
            assert a[f].shape == b[f].shape and a[f].dtype == b[f].dtype, f
        for f in ("slm_ids", "slm_logits", "hidden", "chosen"):  # greedy: the SLM side is the same
            np.testing.assert_array_equal(a[f], b[f])
        # the teacher side is what a plain transformers forward pass of the HF teacher gives
        q = next(p["question"] for p in PROBLEMS if p["answer"] == f"#### {mb['gold']}")
        prompt = problem_prompt(slm, ChatTemplate(slm), q)
        logits = forward(hf_dir, prompt + b["chosen"][:-1].tolist())[len(prompt) - 1 :, :TINY_VOCAB_SIZE]
        probs = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
        rows = np.arange(len(probs))
        np.testing.assert_allclose(b["teacher_probs"], probs[rows[:, None], b["slm_ids"]], atol=1e-4)
        np.testing.assert_array_equal(b["teacher_top1"], probs.argmax(1))
        np.testing.assert_allclose(b["teacher_top1_prob"], probs.max(1), atol=1e-4)
        assert (b["kl"] >= -1e-5).all()
    man = read_manifest(tmp_path / "hf")
    assert man["teacher"] == hf_dir.name and man["teacher_sha256"] == weights_sha256(hf_dir)
    assert len(man["teacher_sha256"]) == 64 and man["problems"] == m["problems"] == len(PROBLEMS)
    # resuming with the same directory is accepted (same settings), nothing is redone
    before = {p.name: p.stat().st_mtime_ns for p in shard_paths(tmp_path / "hf")}
    run(tiny_gguf, hf_dir, data, tmp_path / "hf")
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(tmp_path / "hf")} == before


def test_collect_s2t_mode_with_hf_teacher(tmp_path: Path, tiny_gguf: Path, hf_dir: Path, data: Path) -> None:
    run(tiny_gguf, hf_dir, data, tmp_path / "g", limit=1, mode="s2t")
    ((_, a),) = iter_shards(tmp_path / "g")
    rows = np.arange(len(a["chosen"]))
    np.testing.assert_array_equal(a["slm_ids"][rows, a["teacher_probs"].argmax(1)], a["chosen"])
    assert read_manifest(tmp_path / "g")["mode"] == "s2t"


def test_collect_refuses_mismatched_hf_teacher(tmp_path: Path, tiny_gguf: Path, data: Path) -> None:
    bad = write_hf_model(tmp_path / "swapped", swap=SWAP)
    with pytest.raises(S2TError, match=f"at id {SWAP[0]}"):
        run(tiny_gguf, bad, data, tmp_path / "g")
    assert not shard_paths(tmp_path / "g")


def test_cli_collect_takes_a_model_directory(tmp_path: Path, tiny_gguf: Path, hf_dir: Path, data: Path) -> None:
    out = tmp_path / "g"
    r = CliRunner().invoke(
        main,
        [
            "collect",
            "--slm",
            str(tiny_gguf),
            "--teacher",
            str(hf_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--k",
            str(K),
            "--max-tokens",
            str(MAX_TOKENS),
            "--limit",
            "1",
            "--threads",
            "1",
            "--ctx",
            str(N_CTX),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "1 problems" in r.stdout and read_manifest(out)["teacher"] == hf_dir.name
