"""A LoRA on the top layers only (`train --layers N`): the top layers over the cached output of the
frozen ones give the very logits of a full forward, only those layers carry the adapter, and a run
trains, resumes and exports like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from s2t_edge.export.bundle_writer import export_bundle
from s2t_edge.train import adapter as ad
from s2t_edge.train import objective
from s2t_edge.train.trunk import TrunkCache, split_layer

from s2t_edge.errors import S2TError
from tests.hostile import interrupt_on_call


def cfg(**kw) -> ad.AdapterConfig:
    base = {"rank": 4, "alpha": 8, "lr": 5e-3, "accumulate": 2, "epochs": 2, "only_correct": False}
    return ad.AdapterConfig(
        **{**base, "val_fraction": 0.34, "checkpoint_every": 2, "kl_positions": 4, "layers": 1, **kw}
    )


def test_cached_trunk_gives_the_full_forward(tiny_labels: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    model = ad.add_lora(ad.load_slm(tiny_gguf), cfg())
    adapted = {k for k, _ in model.named_parameters() if "lora_" in k}
    assert adapted and all(".layers.1." in k for k in adapted)  # the tiny SLM has 2 layers: the top one only
    torch.manual_seed(0)
    for k, p in model.named_parameters():
        if "lora_B" in k:
            p.data.normal_(0, 0.5)  # a non-zero adapter, so the comparison covers the adapted layer
    model.eval()
    trunk = TrunkCache(tmp_path / "trunk", split_layer(model, 1))
    for t in ad.load_trajectories(tiny_labels):
        with torch.no_grad():
            full = model(input_ids=torch.from_numpy(t.tokens)[None]).logits[0, t.first :]
            _, cached = objective.candidate_logits(model, t, trunk)  # computes and stores the trunk
            _, again = objective.candidate_logits(model, t, trunk)  # reads it back from disk
        torch.testing.assert_close(cached, full.gather(1, torch.from_numpy(t.ids)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again, cached)
    assert len(list((tmp_path / "trunk").glob("*.npy"))) == len(ad.load_trajectories(tiny_labels))


def test_bf16_keeps_the_trunk_float32(tiny_labels: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """Under `bf16` only the adapted layers run in bfloat16: a trunk first computed in a bf16 step is
    the float32 trunk, so one cache serves runs with and without it."""
    model = ad.add_lora(ad.load_slm(tiny_gguf), cfg())
    t = ad.load_trajectories(tiny_labels)[0]
    with torch.no_grad():
        objective.candidate_logits(model, t, TrunkCache(tmp_path / "bf16", split_layer(model, 1)), bf16=True)
        objective.candidate_logits(model, t, TrunkCache(tmp_path / "f32", split_layer(model, 1)))
    (a,), (b,) = (list((tmp_path / d).glob("*.npy")) for d in ("bf16", "f32"))
    assert np.load(a).dtype == np.float32
    np.testing.assert_array_equal(np.load(a), np.load(b))


def test_layers_out_of_range_refused(tiny_gguf: Path) -> None:
    with pytest.raises(S2TError, match="between 1 and the SLM's 2 decoder layers"):
        ad.add_lora(ad.load_slm(tiny_gguf), cfg(layers=3))


def test_top_layer_run_trains_resumes_and_exports(
    tiny_labels: Path, tiny_gguf: Path, tmp_path: Path, monkeypatch
) -> None:
    whole = tmp_path / "whole"
    r = ad.train_adapter(tiny_labels, tiny_gguf, whole, cfg(epochs=4), threads=1, progress=False)
    assert r["config"]["layers"] == 1
    lora = torch.load(whole / "checkpoint.pt", weights_only=False)["lora"]
    assert lora and all(".layers.1." in k for k in lora)
    train_set = [t for t in ad.load_trajectories(tiny_labels) if t.key not in r["problems"]["val_ids"]]
    before = ad.evaluate(ad.add_lora(ad.load_slm(tiny_gguf), cfg()), train_set)
    after = ad.evaluate(ad.load_adapter(whole, tiny_gguf, "last")[0], train_set)
    assert after["agreement"] > before["agreement"]  # the top layer alone learns its training problems
    real = ad.losses
    broken = tmp_path / "broken"
    interrupt_on_call(monkeypatch, ad, "losses", 4)
    with pytest.raises(KeyboardInterrupt):
        ad.train_adapter(tiny_labels, tiny_gguf, broken, cfg(epochs=4), threads=1, progress=False)
    monkeypatch.setattr(ad, "losses", real)
    cached = sorted((broken / "trunk").rglob("*.npy"))
    assert cached and all(p.parent.parent == broken / "trunk" for p in cached)  # one folder per SLM
    stamps = [p.stat().st_mtime_ns for p in cached]
    ad.train_adapter(tiny_labels, tiny_gguf, broken, cfg(epochs=4), threads=1, progress=False)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # the resumed run reused the cache, computed nothing
    b = torch.load(broken / "checkpoint.pt", weights_only=False)["lora"]
    for k in lora:
        np.testing.assert_allclose(lora[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6)
    export = ad.adapter_export(whole, tiny_gguf, threads=1)
    assert export.training["config"]["layers"] == 1
    # llama.cpp loads the GGUF LoRA of one layer and matches torch + peft (export_bundle refuses otherwise)
    bundle = export_bundle(tiny_gguf, None, tmp_path / "bundle", adapter=export)
    gguf = GGUFReader(str(bundle / "adapter.gguf"))
    assert {t.name.split(".")[1] for t in gguf.tensors if t.name.startswith("blk.")} == {"1"}
