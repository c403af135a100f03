"""Reranker training on synthetic labelled groups, ONNX export, bundles and their refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from s2t_edge.export.bundle_writer import export_bundle, quantize_gguf
from s2t_edge.train.data import load_groups, output_embedding, split_problems
from s2t_edge.train.train import TrainConfig, load_checkpoint, policy_metrics, predict, train

from s2t_edge.bundle import FEATURE_VERSION, FORMAT_VERSION, MANIFEST, ONNX_NAME, load_bundle
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.shards import write_manifest, write_shard
from s2t_edge.store import sha256_file
from tests.tiny_gguf import TINY_VOCAB_SIZE

K = 8
N_EMBD = 64
N_PROBLEMS = 30
SEED = 0
CFG = TrainConfig(k=K, rank=16, width=32, epochs=8, batch=32, lr=1e-2, seed=SEED)


def make_groups(out: Path, slm: Path, *, n_problems: int = N_PROBLEMS, k: int = K, seed: int = 0) -> Path:
    """Labelled groups where the teacher's choice is learnable from the hidden state:
    it prefers the SLM's second candidate exactly where hidden[0] > 0, else agrees with the SLM.
    Problems have 15..24 positions so split sizes are distinguishable."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_problems):
        T = 15 + i % 10
        hidden = rng.standard_normal((T, N_EMBD)).astype(np.float16)
        ids = np.stack([rng.choice(TINY_VOCAB_SIZE - 3, k, replace=False) for _ in range(T)]).astype(np.int32)
        logits = np.sort(rng.normal(0, 2, (T, k)), axis=1)[:, ::-1].astype(np.float32)
        flip = hidden[:, 0] > 0
        probs = np.full((T, k), 0.02, np.float32)
        probs[np.arange(T), flip.astype(int)] = 0.8
        top1 = ids[np.arange(T), probs.argmax(1)]
        lp = logits - logits.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        arrays = {
            "slm_ids": ids,
            "slm_logits": logits,
            "hidden": hidden,
            "entropy": -(np.exp(lp) * lp).sum(1).astype(np.float32),
            "margin": (logits[:, 0] - logits[:, 1]).astype(np.float32),
            "teacher_probs": probs,
            "teacher_top1": top1.astype(np.int32),
            "teacher_top1_prob": probs.max(1),
            "kl": np.zeros(T, np.float32),
            "chosen": ids[:, 0].copy(),
        }
        write_shard(out, f"synthetic:{i:03d}", arrays, {"tokens": T, "correct": False})
    write_manifest(
        out,
        {
            "slm": slm.name,
            "slm_sha256": sha256_file(slm),
            "teacher": "synthetic",
            "teacher_sha256": "0" * 64,
            "k": k,
            "mode": "greedy",
            "data": "synthetic",
        },
    )
    return out


def train_synthetic(tmp: Path, slm: Path) -> tuple[dict, Path, Path]:
    """(report, checkpoint path, groups dir) of a seeded small training run."""
    torch.set_num_threads(1)
    groups = make_groups(tmp / "groups", slm)
    report = train(groups, tmp / "ckpt", slm, CFG, progress=False)
    return report, tmp / "ckpt" / "reranker.pt", groups


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> tuple[dict, Path, Path]:
    return train_synthetic(tmp_path_factory.mktemp("train"), tiny_gguf)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, trained) -> tuple[Path, Path]:
    """(bundle folder, bundle .tar)."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    tar = export_bundle(tiny_gguf, trained[1], out, archive=True)
    return out, tar


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep bundle archives' extraction cache out of the user's home."""
    monkeypatch.setenv("S2T_EDGE_MODELS", str(tmp_path / "store" / "models"))
    return tmp_path / "store"


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(root: Path, **changes) -> None:
    m = json.loads((root / MANIFEST).read_text())
    m.update(changes)
    (root / MANIFEST).write_text(json.dumps(m))


# ---- training ---------------------------------------------------------------------------------


def test_report_fields(trained) -> None:
    report, ckpt, _ = trained
    assert {
        "config",
        "feature_version",
        "epoch",
        "threshold",
        "val",
        "test",
        "problems",
        "positions",
        "groups",
        "seconds",
    } <= set(report)
    assert report["feature_version"] == FEATURE_VERSION and 1 <= report["epoch"] <= CFG.epochs
    assert report["config"]["k"] == K and report["config"]["seed"] == SEED
    assert sum(report["problems"].values()) == N_PROBLEMS
    assert min(report["problems"].values()) >= 1
    for split in ("val", "test"):
        m = report[split]
        assert m["positions"] == report["positions"][split]
        assert 0 <= m["agreement"] <= 1 and 0 <= m["greedy_agreement"] <= 1
        assert m["good_flips"] + m["bad_flips"] == round(m["flip_rate"] * m["positions"])
    assert report["groups"]["teacher"] == "synthetic" and report["groups"]["mode"] == "greedy"
    assert json.loads((ckpt.parent / "report.json").read_text()) == report


def test_beats_greedy_on_held_out(trained) -> None:
    t = trained[0]["test"]
    # greedy agrees with the teacher only where hidden[0] <= 0 (about half of the positions)
    assert 0.25 < t["greedy_agreement"] < 0.75
    assert t["agreement"] >= t["greedy_agreement"] + 0.2
    assert t["hit1_at_divergence"] > 0.8 and t["trigger_recall"] > 0.6


def test_splits_disjoint_by_problem(trained) -> None:
    report, _, groups_dir = trained
    groups, _ = load_groups(groups_dir, K)
    tr, va, te = split_problems(len(groups.problem_ids), SEED)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == set(range(N_PROBLEMS))
    assert {"train": len(tr), "val": len(va), "test": len(te)} == report["problems"]
    # positions per split match the problems it holds, so no problem straddles two splits
    for name, split in (("train", tr), ("val", va), ("test", te)):
        sub = groups.subset(split)
        assert len(sub) == report["positions"][name]
        assert set(np.unique(sub.problem).tolist()) == split


def test_train_empty_dir_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    (tmp_path / "groups").mkdir()
    with pytest.raises(S2TError, match="no shards"):
        train(tmp_path / "groups", tmp_path / "out", tiny_gguf, CFG, progress=False)


def test_train_k_above_stored_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    groups = make_groups(tmp_path / "g", tiny_gguf, n_problems=3, k=4)
    with pytest.raises(S2TError, match="top-4.*K=8"):
        train(groups, tmp_path / "out", tiny_gguf, CFG, progress=False)


def test_corrupt_checkpoint_refused(tmp_path: Path, trained, tiny_gguf: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained[1].read_bytes()[:1000])
    not_ours = tmp_path / "other.pt"
    torch.save({"something": 1}, not_ours)
    for bad in (garbage, cut, not_ours, tmp_path / "missing.pt"):
        with pytest.raises(S2TError, match="not a reranker checkpoint"):
            load_checkpoint(bad)
    with pytest.raises(S2TError, match="not a reranker checkpoint"):
        export_bundle(tiny_gguf, garbage, tmp_path / "b")


def test_checkpoint_round_trip(trained, tiny_gguf: Path) -> None:
    """The reloaded checkpoint is the model the report describes: it scores its test problems the same."""
    report, path, groups_dir = trained
    model, ckpt = load_checkpoint(path)
    assert model.k == K and not model.training and ckpt["n_embd"] == N_EMBD
    p = ckpt["parity_inputs"]
    assert p["hidden"].shape[1] == N_EMBD and p["ids"].shape[1] == K == p["logits"].shape[1]
    groups, _ = load_groups(groups_dir, K)
    test = groups.subset(split_problems(len(groups.problem_ids), CFG.seed)[2])
    scores, trig = predict(model, test, output_embedding(tiny_gguf) if CFG.use_tokens else None)
    assert policy_metrics(test, scores, trig, report["threshold"], report["rule"]) == report["test"]


# ---- export and bundles -----------------------------------------------------------------------


def test_bundle_contents(exported, trained, tiny_gguf: Path) -> None:
    import onnx

    folder, tar = exported
    assert tar == folder.with_suffix(".tar") and tar.is_file()
    onnx_path = folder / ONNX_NAME
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    m = json.loads((folder / MANIFEST).read_text())
    assert m["format_version"] == FORMAT_VERSION and m["feature_version"] == FEATURE_VERSION
    assert m["k"] == K and m["threshold"] == trained[0]["threshold"]
    assert 0 <= m["onnx_parity_max_abs_diff"] <= 1e-4
    assert m["onnx_sha256"] == sha256_file(onnx_path)
    slm = m["slm"]
    assert slm["sha256"] == sha256_file(tiny_gguf) and slm["vocab_size"] == TINY_VOCAB_SIZE
    assert slm["n_embd"] == N_EMBD and slm["size"] == tiny_gguf.stat().st_size
    assert (folder / slm["bundled_file"]).read_bytes() == tiny_gguf.read_bytes()
    assert m["training"]["test"] == trained[0]["test"]


def test_onnx_matches_torch(exported, trained) -> None:
    """The shipped model scores like the checkpoint on fresh inputs, not only the parity probe."""
    from s2t_edge.export.onnx_export import Shipped
    from s2t_edge.train.data import output_embedding

    from s2t_edge.reranker import OnnxReranker

    model, _ = load_checkpoint(trained[1])
    shipped = Shipped(model, output_embedding(exported[0] / "tiny.gguf"))
    rr = OnnxReranker(exported[0] / ONNX_NAME)
    assert (rr.n_embd, rr.k) == (N_EMBD, K)
    rng = np.random.default_rng(5)
    h = rng.standard_normal((3, N_EMBD)).astype(np.float32)
    ids = rng.choice(TINY_VOCAB_SIZE, (3, K)).astype(np.int64)
    lg = np.sort(rng.standard_normal((3, K)), 1)[:, ::-1].astype(np.float32).copy()
    with torch.no_grad():
        ref_s, ref_t = shipped(torch.from_numpy(h), torch.from_numpy(ids), torch.from_numpy(lg))
    for i in range(3):
        s, t = rr.run(h[i], ids[i], lg[i])
        np.testing.assert_allclose(s, ref_s[i].numpy(), atol=1e-4)
        assert t == pytest.approx(float(ref_t[i]), abs=1e-4) and 0 <= t <= 1


def test_load_folder_and_archive(exported, tiny_gguf: Path, cache: Path) -> None:
    folder, tar = exported
    a, b = load_bundle(folder), load_bundle(tar)
    assert a.manifest == b.manifest and a.k == b.k == K
    assert b.root != folder and str(b.root).startswith(str(cache))  # extracted into the cache
    assert b.onnx_path.read_bytes() == a.onnx_path.read_bytes()
    assert b.gguf_path.name == tiny_gguf.name and b.gguf_path.is_file()
    for bundle in (a, b):
        bundle.check_slm(tiny_gguf, TINY_VOCAB_SIZE)  # the right SLM passes
    assert load_bundle(tar).root == b.root  # second open reuses the extraction


def test_check_slm_refuses_other_gguf(exported, tiny_teacher_gguf: Path, tiny_other_vocab_gguf: Path) -> None:
    b = load_bundle(exported[0])
    with pytest.raises(S2TError, match=f"was built for.*not {tiny_teacher_gguf.name}"):
        b.check_slm(tiny_teacher_gguf, TINY_VOCAB_SIZE)  # same vocabulary, other weights
    with pytest.raises(S2TError, match=f"{TINY_VOCAB_SIZE}-id vocabulary"):
        b.check_slm(tiny_other_vocab_gguf, TINY_VOCAB_SIZE + 16)


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_damaged_onnx_refused(exported, tmp_path: Path, damage: str) -> None:
    root = copy_bundle(exported[0], tmp_path / "b")
    data = bytearray((root / ONNX_NAME).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    (root / ONNX_NAME).write_bytes(bytes(data))
    with pytest.raises(S2TError, match="sha256 does not match"):
        load_bundle(root)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 99}, "format 99 is newer"),
        ({"format_version": "1"}, "no integer format_version"),
        ({"feature_version": FEATURE_VERSION + 1}, "feature version"),
    ],
)
def test_manifest_versions_refused(exported, tmp_path: Path, changes: dict, message: str) -> None:
    root = copy_bundle(exported[0], tmp_path / "b")
    edit_manifest(root, **changes)
    with pytest.raises(S2TError, match=message):
        load_bundle(root)


def test_broken_bundles_refused(exported, tmp_path: Path, cache: Path) -> None:
    with pytest.raises(S2TError, match="no such bundle"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(S2TError, match="not a bundle"):
        load_bundle(tmp_path)
    root = copy_bundle(exported[0], tmp_path / "b")
    (root / MANIFEST).write_text("{")
    with pytest.raises(S2TError, match="not valid JSON"):
        load_bundle(root)
    (root / MANIFEST).write_text((exported[0] / MANIFEST).read_text())
    (root / ONNX_NAME).unlink()
    with pytest.raises(S2TError, match="no reranker.onnx"):
        load_bundle(root)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive" * 64)
    with pytest.raises(S2TError, match="not a readable bundle archive"):
        load_bundle(junk)


def test_export_refuses_mismatched_models(tmp_path: Path, trained, tiny_teacher_gguf: Path) -> None:
    # hidden size: the teacher has n_embd 96, the reranker was trained on 64
    with pytest.raises(S2TError, match="hidden size 64"):
        export_bundle(tiny_teacher_gguf, trained[1], tmp_path / "a")
    # same shapes but other weights: the groups' SLM sha256 does not match
    from tests.tiny_gguf import write_tiny_gguf

    other = write_tiny_gguf(tmp_path / "other.gguf", seed=7)
    with pytest.raises(S2TError, match="groups from another SLM"):
        export_bundle(other, trained[1], tmp_path / "b")
    assert not (tmp_path / "b" / MANIFEST).exists()


def test_quantize_q8_0(tmp_path: Path, tiny_gguf: Path) -> None:
    import gguf

    dst = quantize_gguf(tiny_gguf, tmp_path / "tiny-q8_0.gguf", "Q8_0", threads=1)
    assert dst.is_file() and dst.stat().st_size < tiny_gguf.stat().st_size
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(dst)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    with Engine(dst, n_ctx=64, n_threads=1) as q, Engine(tiny_gguf, n_ctx=64, n_threads=1) as f:
        ids = f.tokenize("Hello world, the answer is")
        assert q.n_vocab == f.n_vocab and q.tokenize("Hello world, the answer is") == ids
        lq, lf = q.load(ids).copy(), f.load(ids).copy()
        assert np.isfinite(lq).all() and np.corrcoef(lq, lf)[0, 1] > 0.9  # close to the F32 model
    with pytest.raises(S2TError, match="unknown --quantize"):
        quantize_gguf(tiny_gguf, tmp_path / "x.gguf", "Q3_XYZ")
    with pytest.raises(S2TError, match="could not quantize"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "y.gguf", "Q8_0")
    assert not (tmp_path / "y.gguf").exists() and not (tmp_path / "y.partial").exists()


def test_token_prior_variant_trains_and_exports(tmp_path: Path, tiny_gguf: Path, trained) -> None:
    """The context-free token-code path adds its input to the candidate MLP, survives the
    checkpoint and exports with parity (export checks onnxruntime == torch itself)."""
    from dataclasses import replace

    cfg = replace(CFG, token_prior=True, epochs=2)
    report = train(trained[2], tmp_path / "ckpt", tiny_gguf, cfg, progress=False)
    assert report["config"]["token_prior"] is True
    model, _ = load_checkpoint(tmp_path / "ckpt" / "reranker.pt")
    base, _ = load_checkpoint(trained[1])
    assert model.token_prior and not base.token_prior
    assert model.cand_mlp[0].in_features == base.cand_mlp[0].in_features + CFG.rank
    out = export_bundle(tiny_gguf, tmp_path / "ckpt" / "reranker.pt", tmp_path / "bundle")
    m = json.loads((out / MANIFEST).read_text())
    assert m["training"]["config"]["token_prior"] is True and m["onnx_parity_max_abs_diff"] <= 1e-4


def test_train_problems_subset_keeps_val_and_test(tmp_path: Path, tiny_gguf: Path, trained) -> None:
    """A learning-curve run trains on fewer problems; validation and test problems do not move."""
    from dataclasses import replace

    full = trained[0]
    report = train(trained[2], tmp_path / "ckpt", tiny_gguf, replace(CFG, train_problems=2, epochs=1), progress=False)
    assert report["problems"]["train"] == 2 < full["problems"]["train"]
    assert report["positions"]["train"] < full["positions"]["train"]
    for split in ("val", "test"):
        assert report["problems"][split] == full["problems"][split]
        assert report["positions"][split] == full["positions"][split]
    with pytest.raises(ValueError, match="at least 1"):
        train(trained[2], tmp_path / "bad", tiny_gguf, replace(CFG, train_problems=0), progress=False)
