"""The LoRA trainer on the tiny models: scores line up with the model's own logits, training moves the
adapter toward the teacher, and a run killed half-way resumes to the very weights of an unbroken run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from s2t_edge.train import adapter as ad
from s2t_edge.train import objective

from s2t_edge.errors import S2TError
from s2t_edge.label import label
from tests.hostile import cli, interrupt_on_call, refused


@pytest.fixture(scope="module")
def labels(tiny_labels: Path) -> Path:
    return tiny_labels


def cfg(**kw) -> ad.AdapterConfig:
    base = {
        "rank": 4,
        "alpha": 8,
        "lr": 5e-3,
        "accumulate": 2,
        "epochs": 2,
        "only_correct": False,
        "val_fraction": 0.34,
        "checkpoint_every": 2,
        "kl_positions": 4,
    }
    return ad.AdapterConfig(**{**base, **kw})


def test_candidate_logits_are_the_models_logits(labels: Path, tiny_gguf: Path) -> None:
    model = ad.add_lora(ad.load_slm(tiny_gguf), cfg())
    model.eval()
    for t in ad.load_trajectories(labels):
        _, cand = objective.candidate_logits(model, t)
        with torch.no_grad():
            full = model(input_ids=torch.from_numpy(t.tokens)[None]).logits[0, t.first :]
        assert cand.shape == t.ids.shape
        torch.testing.assert_close(cand, full.gather(1, torch.from_numpy(t.ids)), rtol=1e-4, atol=1e-4)
        # llama.cpp's top-K of the base model is the torch base model's top-K (tiny F32 model)
        assert (full.argmax(-1).numpy() == t.ids[:, 0]).mean() > 0.95


def test_training_moves_toward_the_teacher(labels: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    r = ad.train_adapter(labels, tiny_gguf, tmp_path / "run", cfg(epochs=4), threads=1, progress=False)
    base = r["history"][0]
    assert base["tag"] == "base" and r["best"]["agreement"] >= base["agreement"]
    trained = ad.train_adapter(labels, tiny_gguf, tmp_path / "run", cfg(epochs=4), threads=1, progress=False)
    assert trained["history"] == r["history"]  # a finished run resumes to its end: nothing redone
    train_set = [t for t in ad.load_trajectories(labels) if t.key not in r["problems"]["val_ids"]]
    before = ad.evaluate(ad.add_lora(ad.load_slm(tiny_gguf), cfg()), train_set)
    model, report = ad.load_adapter(tmp_path / "run", tiny_gguf, "last")  # adapter.pt holds the best on validation
    assert report["best"] == r["history"][-1]
    after = ad.evaluate(model, train_set)
    assert after["agreement"] > before["agreement"]  # it learns its training problems


def test_killed_run_resumes_to_the_same_weights(labels: Path, tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    whole = tmp_path / "whole"
    ad.train_adapter(labels, tiny_gguf, whole, cfg(), threads=1, progress=False)
    real = ad.losses
    broken = tmp_path / "broken"
    interrupt_on_call(monkeypatch, ad, "losses", 4)
    with pytest.raises(KeyboardInterrupt):
        ad.train_adapter(labels, tiny_gguf, broken, cfg(), threads=1, progress=False)
    monkeypatch.setattr(ad, "losses", real)
    assert torch.load(broken / "checkpoint.pt", weights_only=False)["state"]["done"] == 2
    ad.train_adapter(labels, tiny_gguf, broken, cfg(), threads=1, progress=False)
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert a["state"]["done"] == b["state"]["done"]
    for k in a["lora"]:
        np.testing.assert_allclose(a["lora"][k].numpy(), b["lora"][k].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(S2TError, match="other settings"):
        ad.train_adapter(labels, tiny_gguf, broken, cfg(lr=1e-3), threads=1, progress=False)


def test_several_label_folders(
    labels: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path, tmp_path: Path
) -> None:
    """The teacher's trajectories and the SLM's own train one adapter: a problem sits on one side of
    the split in both folders, and only the teacher's trajectories are filtered by their answer."""
    own = tmp_path / "slm-labels"
    label(
        tiny_gguf,
        tiny_teacher_gguf,
        data,
        own,
        k=4,
        max_tokens=16,
        batch=3,
        trajectories="slm",
        threads=1,
        progress=False,
    )
    trajs = ad.load_trajectories([labels, own])
    assert len({t.key for t in trajs}) == len(trajs) == 6 and {t.source for t in trajs} == {
        "teacher-greedy",
        "slm-greedy",
    }
    c = cfg(only_correct=True)
    train, val = ad.split(trajs, c)
    assert not {t.problem_id for t in train} & {t.problem_id for t in val}
    assert {t.key for t in val} == {f"{d.name}/{t.problem_id}" for t in val for d in (labels, own)}
    assert [t for t in train if t.source == "slm-greedy"] == [
        t for t in trajs if t.source == "slm-greedy" and t not in val
    ]
    assert all(t.correct for t in train if t.source == "teacher-greedy")
    r = ad.train_adapter([labels, own], tiny_gguf, tmp_path / "run", cfg(epochs=1), threads=1, progress=False)
    assert r["labels"] == [str(labels), str(own)] and set(r["problems"]["val_ids"]) == {t.key for t in val}
    export = ad.adapter_export(tmp_path / "run", tiny_gguf, threads=1)
    assert [d["dir"] for d in export.training["labels"]] == [labels.name, own.name]
    with pytest.raises(S2TError, match="distinct names"):
        ad.load_trajectories([labels, labels])


def test_rebuild_from_a_reports_problems(labels: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """`keys` (train --problems-of) trains on exactly the trajectories named, in that order: a run
    given another run's keys reaches its very weights; a folder that lacks one is refused."""
    first = ad.train_adapter(labels, tiny_gguf, tmp_path / "first", cfg(epochs=1), threads=1, progress=False)
    keys = first["problems"]["keys"]
    assert keys == [t.key for t in ad.load_trajectories(labels)]
    fewer = ad.train_adapter(labels, tiny_gguf, tmp_path / "fewer", cfg(), threads=1, progress=False, keys=keys[1:])
    assert fewer["problems"]["keys"] == keys[1:]
    same = ad.train_adapter(labels, tiny_gguf, tmp_path / "same", cfg(epochs=1), threads=1, progress=False, keys=keys)
    assert same["problems"] == first["problems"]
    a = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=False)["lora"]
    b = torch.load(tmp_path / "same" / "checkpoint.pt", weights_only=False)["lora"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(S2TError, match="lacks 1 labelled problems"):
        ad.train_adapter(labels, tiny_gguf, tmp_path / "bad", cfg(), threads=1, progress=False, keys=[*keys, "x/y:9"])
    old = tmp_path / "old-report.json"  # a report from before the keys were recorded
    old.write_text('{"problems": {"train": 2, "val": 1}}')
    args = ["train", "--labels", labels, "--slm", tiny_gguf, "--rank", "4", "--all-trajectories", "--threads", "1"]
    args.append("--json")
    refused(cli(*args, "--problems-of", old, "--out", tmp_path / "x"), "an old report", "lists its problems")
    vocab = ["--objective", "vocab", "--teacher-kl-weight", "0.1", "--out", tmp_path / "x"]
    refused(cli(*args, *vocab), "a listwise weight on the vocab objective", "vocab has none")
    early = ["--early-weight", "2", "--early-fraction", "0.5", "--teacher-kl-weight", "0.1", "--divergent-margin", "1"]
    r = cli(*args, *early, "--problems-of", tmp_path / "fewer" / "report.json", "--out", tmp_path / "cli")
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["problems"]["keys"] == keys[1:]
    assert (report["config"]["early_weight"], report["config"]["early_fraction"]) == (2.0, 0.5)
    assert report["config"]["teacher_kl_weight"] == 0.1
    assert report["config"]["divergent_margin"] == 1.0


def test_vocabulary_objective(labels: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """`objective="vocab"` is the cross-entropy of the teacher's choice under the model's full
    next-token distribution (weighted like the listwise loss, early positions too); trained with
    it, the adapter learns."""
    c = cfg(objective="vocab", divergent_weight=1.0)
    model = ad.add_lora(ad.load_slm(tiny_gguf), c)
    model.eval()
    t = ad.load_trajectories(labels)[0]
    with torch.no_grad():
        out = ad.losses(model, t, c, np.random.default_rng(0))
        full = model(input_ids=torch.from_numpy(t.tokens)[None]).logits[0, t.first :]
    target = torch.from_numpy(t.ids).gather(1, torch.from_numpy(t.teacher.argmax(1))[:, None])[:, 0]
    torch.testing.assert_close(out["select"], torch.nn.functional.cross_entropy(full, target), rtol=1e-4, atol=1e-4)
    assert out["loss"] == out["select"] + c.kl_weight * out["kl"]
    early = cfg(objective="vocab", divergent_weight=1.0, early_weight=3.0, early_fraction=0.5)
    with torch.no_grad():
        weighted = ad.losses(model, t, early, np.random.default_rng(0))["select"]
    ce = torch.nn.functional.cross_entropy(full, target, reduction="none")
    w = 1 + 2 * (torch.arange(len(ce)) < 0.5 * len(ce)).float()  # the first half of the answer x3
    torch.testing.assert_close(weighted, (w * ce).sum() / w.sum(), rtol=1e-4, atol=1e-4)
    with pytest.raises(S2TError, match="unknown adapter objective"):
        ad.losses(model, t, cfg(objective="nope"), np.random.default_rng(0))
    r = ad.train_adapter(
        labels, tiny_gguf, tmp_path / "run", cfg(objective="vocab", epochs=4), threads=1, progress=False
    )
    assert r["config"]["objective"] == "vocab"
    train_set = [t for t in ad.load_trajectories(labels) if t.key not in r["problems"]["val_ids"]]
    before = ad.evaluate(ad.add_lora(ad.load_slm(tiny_gguf), c), train_set)
    after = ad.evaluate(ad.load_adapter(tmp_path / "run", tiny_gguf, "last")[0], train_set)
    assert after["agreement"] > before["agreement"]


def test_teacher_kl_weight(labels: Path, tiny_gguf: Path) -> None:
    """The listwise loss is w x KL(teacher || adapted) over the K candidates + the cross-entropy
    toward the teacher's choice: w = 1 ours, 0.1 the published S2T-LOCAL's, 0 the choice alone."""
    model = ad.add_lora(ad.load_slm(tiny_gguf), cfg())
    model.eval()
    t = ad.load_trajectories(labels)[0]
    with torch.no_grad():
        _, cand = objective.candidate_logits(model, t)
        teacher = torch.log_softmax(torch.from_numpy(t.teacher), -1)
        logp = torch.log_softmax(cand, -1)
        kl = (teacher.exp() * (teacher - logp)).sum(-1)
        ce = torch.nn.functional.cross_entropy(cand, teacher.argmax(-1), reduction="none")
        for w in (1.0, 0.1, 0.0):
            c = cfg(divergent_weight=1.0, teacher_kl_weight=w)
            got = ad.losses(model, t, c, np.random.default_rng(0))["select"]
            torch.testing.assert_close(got, (w * kl + ce).mean(), rtol=1e-4, atol=1e-5)
    assert kl.mean() > 1e-4  # the weight is seen: the soft term is not zero on these labels


def test_divergent_margin(labels: Path, tiny_gguf: Path) -> None:
    """With a margin, only the divergences where the teacher's log-prob of its choice beats the
    SLM's top-1's by that much weigh --divergent-weight; near-ties weigh like agreement."""
    model = ad.add_lora(ad.load_slm(tiny_gguf), cfg())
    model.eval()
    t = next(t for t in ad.load_trajectories(labels) if (t.teacher.argmax(-1) != 0).sum() >= 2)
    raw = torch.from_numpy(t.teacher)
    div = raw.argmax(-1) != 0
    margin = raw.max(-1).values - raw[:, 0]
    m = float(margin[div].min() + margin[div].max()) / 2  # some divergences fall below it, some above
    with torch.no_grad():
        _, cand = objective.candidate_logits(model, t)
        teacher = torch.log_softmax(raw, -1)
        logp = torch.log_softmax(cand, -1)
        sel = (teacher.exp() * (teacher - logp)).sum(-1) + torch.nn.functional.cross_entropy(
            cand, teacher.argmax(-1), reduction="none"
        )
        got = ad.losses(model, t, cfg(divergent_weight=3.0, divergent_margin=m), np.random.default_rng(0))
        every = ad.losses(model, t, cfg(divergent_weight=3.0), np.random.default_rng(0))
    kept = div & (margin >= m)
    assert 0 < int(kept.sum()) < int(div.sum())
    w = 1 + 2 * kept.float()
    torch.testing.assert_close(got["select"], (w * sel).sum() / w.sum(), rtol=1e-4, atol=1e-5)
    w_all = 1 + 2 * div.float()
    torch.testing.assert_close(every["select"], (w_all * sel).sum() / w_all.sum(), rtol=1e-4, atol=1e-5)


def test_bf16_autocast(labels: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """Under bf16 the decoder runs in bfloat16 but the losses are float32 and close to float32's;
    the LoRA's gradient points the same way; a run records it and trains."""
    model = ad.add_lora(ad.load_slm(tiny_gguf), cfg(dropout=0.0))
    for p in model.parameters():  # B != 0: every LoRA factor gets a gradient
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    t = ad.load_trajectories(labels)[0]
    grads = []
    for bf16 in (False, True):
        model.zero_grad()
        _, cand = objective.candidate_logits(model, t, bf16=bf16)
        assert cand.dtype == torch.float32
        out = ad.losses(model, t, cfg(bf16=bf16), np.random.default_rng(0))
        assert all(torch.isfinite(v) for v in out.values())
        out["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        grads.append((out["loss"].item(), grad))
    (l32, g32), (l16, g16) = grads
    assert l16 == pytest.approx(l32, rel=0.05) and l16 != l32  # bfloat16 did run, and stays close
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.98
    r = ad.train_adapter(labels, tiny_gguf, tmp_path / "run", cfg(bf16=True, epochs=1), threads=1, progress=False)
    assert r["config"]["bf16"] is True and r["history"][-1]["trajectories_seen"] > 0


def test_bf16_warns_on_a_cpu_without_it(labels: Path, tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    """Emulated bf16 is far slower than float32 (an AVX2-only EPYC): `train --bf16` says so, and still runs."""
    from s2t_edge.train import trunk

    args = ["train", "--labels", labels, "--slm", tiny_gguf, "--rank", "4", "--all-trajectories", "--threads", "1"]
    for native in (True, False):
        monkeypatch.setattr(trunk, "native_bf16", lambda native=native: native)
        r = cli(*args, "--bf16", "--json", "--out", tmp_path / f"run-{native}")
        assert r.code == 0, r.stderr
        assert ("no native bfloat16" in r.stderr) is not native and json.loads(r.stdout)["config"]["bf16"] is True


def test_resumes_a_checkpoint_from_before_a_config_field(labels: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """A checkpoint written before a config field existed ran at that field's default: it resumes."""
    c = cfg(epochs=1)
    r = ad.train_adapter(labels, tiny_gguf, tmp_path / "run", c, threads=1, progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    ck = torch.load(path, weights_only=False)
    del ck["config"]["bf16"]
    torch.save(ck, path)
    again = ad.train_adapter(labels, tiny_gguf, tmp_path / "run", c, threads=1, progress=False)
    assert again["history"] == r["history"]
    with pytest.raises(S2TError, match="other settings"):
        ad.train_adapter(labels, tiny_gguf, tmp_path / "run", cfg(epochs=1, bf16=True), threads=1, progress=False)


def test_rejection_sampling(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    """Sampled answers: one trajectory per sample, split with its problem, kept only when right under
    `only_correct`; `toward="chosen"` trains each position toward the token the answer took."""
    out = tmp_path / "samples"
    tiny = {"k": 4, "max_tokens": 12, "batch": 2, "threads": 1, "progress": False}
    label(tiny_gguf, tiny_teacher_gguf, data, out, trajectories="slm", samples=2, temperature=1.5, **tiny)
    slm_labels = tmp_path / "greedy"
    label(tiny_gguf, tiny_teacher_gguf, data, slm_labels, trajectories="slm", **tiny)
    trajs = ad.load_trajectories(out)
    assert len({t.key for t in trajs}) == 6 and len({t.problem_id for t in trajs}) == 3
    train, val = ad.split(trajs, cfg())
    assert train and val and {t.problem_id for t in train}.isdisjoint({t.problem_id for t in val})
    for t in trajs:  # as if each problem's first sample were right and its second wrong
        t.correct = t.key.endswith(".s0")
    kept, _ = ad.split(trajs, cfg(only_correct=True))
    assert kept and all(t.key.endswith(".s0") for t in kept)
    own = ad.load_trajectories(slm_labels)  # the SLM's greedy answers: kept wrong, unless imitated
    for t in own:
        t.correct = False
    assert ad.split(own, cfg(only_correct=True))[0] and not ad.split(own, cfg(only_correct=True, toward="chosen"))[0]

    t = trajs[0]
    took = torch.from_numpy((t.ids == t.chosen[:, None]).argmax(1))  # sampled from the top-K: always there
    target = objective.chosen_target(t, torch.log_softmax(torch.from_numpy(t.teacher), -1))
    assert torch.equal(target.argmax(-1), took) and torch.allclose(target.exp().sum(-1), torch.ones(len(took)))
    model = ad.add_lora(ad.load_slm(tiny_gguf), cfg())
    model.eval()
    c = cfg(toward="chosen", divergent_weight=1.0)
    with torch.no_grad():
        sel = ad.losses(model, t, c, np.random.default_rng(0))["select"]
        _, cand = objective.candidate_logits(model, t)
    ce = torch.nn.functional.cross_entropy(cand, took)  # one-hot target: KL + cross-entropy = 2x the CE
    torch.testing.assert_close(sel, 2 * ce, rtol=1e-4, atol=1e-4)
    with pytest.raises(S2TError, match="unknown adapter target"):
        ad.losses(model, t, cfg(toward="nope"), np.random.default_rng(0))
    s = cfg(toward="samples", divergent_weight=1.0)  # a sample toward its own tokens, a greedy path toward the teacher
    with torch.no_grad():
        torch.testing.assert_close(ad.losses(model, t, s, np.random.default_rng(0))["select"], sel)
        g = own[0]
        by_teacher = ad.losses(model, g, cfg(divergent_weight=1.0), np.random.default_rng(0))["select"]
        torch.testing.assert_close(ad.losses(model, g, s, np.random.default_rng(0))["select"], by_teacher)

    first = own[0].key  # a report's keys from one folder; a folder they never name is taken whole
    r = ad.train_adapter(
        [slm_labels, out], tiny_gguf, tmp_path / "keys", cfg(), threads=1, progress=False, keys=[first]
    )
    assert r["problems"]["keys"] == [first] + [t.key for t in trajs]

    r = ad.train_adapter(out, tiny_gguf, tmp_path / "run", cfg(toward="chosen", epochs=4), threads=1, progress=False)
    assert r["config"]["toward"] == "chosen"
    train_set = [t for t in trajs if t.key not in r["problems"]["val_ids"]]

    @torch.no_grad()
    def took_rate(m) -> float:
        m.eval()
        hit = [
            (objective.candidate_logits(m, t)[1].argmax(-1).numpy() == (t.ids == t.chosen[:, None]).argmax(1))
            for t in train_set
        ]
        return float(np.concatenate(hit).mean())

    assert took_rate(ad.load_adapter(tmp_path / "run", tiny_gguf, "last")[0]) > took_rate(model)
