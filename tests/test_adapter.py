"""LoRA adapters: peft → GGUF export, llama.cpp load and parity with torch + peft, refusals, and an
adapter bundle decoded by the runtime (tiny qwen2 GGUFs, loaded by transformers' GGUF loader)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from s2t_edge.export.adapter_check import EXACT_THRESHOLDS, check_adapter, require_adapter_check
from s2t_edge.export.bundle_writer import AdapterExport, export_bundle
from s2t_edge.export.lora_gguf import HF_TO_GGUF, export_lora, lora_from_peft, write_lora_gguf

from s2t_edge.bundle import ADAPTER_NAME, load_bundle
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.runtime import build_policy, open_models

RANK, ALPHA = 4, 8
TARGETS = [m.split(".")[1] for m in HF_TO_GGUF]
PROMPTS = [
    "Hello world, the answer is 42.",
    "<|im_start|>user\nLet the number equals 7 plus 5.<|im_end|>\n<|im_start|>assistant\n",
    "So we think step by step: 3 times 4 is 12, and the answer is",
]


def tiny_hf(gguf_path: Path):
    """The tiny GGUF loaded by transformers (dequantized; F32 here)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)


def peft_lora(gguf_path: Path, *, b_std: float = 0.1, seed: int = 0, **cfg):
    """A PeftModel over the tiny GGUF with random (non-zero) B, so the adapter does something."""
    from peft import LoraConfig, get_peft_model

    base = tiny_hf(gguf_path)
    torch.manual_seed(seed)  # peft draws A from torch's global generator
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and b_std:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return model.eval()


def adapter_bundle(out: Path, gguf_path: Path, **kw) -> Path:
    """An adapter-only bundle over `gguf_path` (used by test_bundle too)."""
    ad = AdapterExport(peft_lora(gguf_path), PROMPTS, training={"metrics": {"agreement": 0.5}}, dtype="f32")
    return export_bundle(gguf_path, None, out, adapter=ad, **kw)


def logits_of(engine: Engine, text: str) -> np.ndarray:
    return engine.load(engine.tokenize(text)).copy()


@pytest.fixture(scope="module")
def model(tiny_gguf: Path):
    return peft_lora(tiny_gguf)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, model) -> Path:
    return export_lora(model, tiny_gguf, tmp_path_factory.mktemp("lora") / "adapter.gguf", dtype="f32")[0]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("S2T_EDGE_MODELS", str(tmp_path / "store" / "models"))
    return tmp_path / "store"


# ---- export ------------------------------------------------------------------------------------


def test_gguf_layout(exported: Path, model) -> None:
    """llama.cpp's conventions: adapter metadata, base arch, lora_a [r, in] and lora_b [out, r]."""
    import gguf

    r = gguf.GGUFReader(str(exported))

    def val(key: str):
        f = r.fields[key]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(v[0])

    assert val("general.type") == "adapter" and val("adapter.type") == "lora"
    assert val("general.architecture") == "qwen2" and val("adapter.lora.alpha") == ALPHA
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in r.tensors}
    assert len(shapes) == 2 * 2 * len(TARGETS)  # 2 layers x 7 modules x (a, b)
    assert shapes["blk.0.attn_q.weight.lora_a"] == (RANK, 64) and shapes["blk.0.attn_q.weight.lora_b"] == (64, RANK)
    assert shapes["blk.1.attn_k.weight.lora_b"] == (32, RANK)  # 2 kv heads of 16
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (RANK, 128) and shapes["blk.1.ffn_up.weight.lora_b"] == (128, RANK)
    sd = model.base_model.model.model.layers[1].mlp.down_proj
    a = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight.lora_a")
    np.testing.assert_array_equal(np.asarray(a.data), sd.lora_A["default"].weight.detach().numpy())


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_matches_peft(tmp_path: Path, tiny_gguf: Path, model, dtype: str) -> None:
    path, _ = export_lora(model, tiny_gguf, tmp_path / "a.gguf", dtype=dtype)
    check = check_adapter(tiny_gguf, path, model, PROMPTS, n_threads=1)
    assert check["positions"] > 30 and check["file_type"] == 0
    assert check["base_top1_agreement"] == 1.0 and check["base_correlation_mean"] > 0.99999
    assert check["adapter_top1_changes"] > 0.2  # the adapter really changes the model...
    assert check["delta_correlation"] > (0.9999 if dtype == "f32" else 0.999)  # ...the same way in both
    assert check["top1_agreement"] >= 0.98 and check["correlation_mean"] > 0.9999
    assert require_adapter_check(check) == EXACT_THRESHOLDS
    probe = check["probe"]  # the prompt the adapter changes most, recorded for the integration test
    n = len(probe["tokens"])
    assert n == len(probe["adapted_top1"]) == len(probe["base_top1"]) > 0
    assert probe["changed"] == sum(a != b for a, b in zip(probe["adapted_top1"], probe["base_top1"])) > 0


def test_adapter_changes_logits_and_switches(tiny_gguf: Path, exported: Path, model) -> None:
    text = PROMPTS[1]
    with (
        Engine(tiny_gguf, n_ctx=128, n_threads=1) as base,
        Engine(tiny_gguf, n_ctx=128, n_threads=1, lora=exported) as e,
    ):
        assert e.lora_on and e.lora_path == exported
        b, adapted = logits_of(base, text), logits_of(e, text)
        ids = torch.tensor([e.tokenize(text)])
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, -1].numpy()
        np.testing.assert_allclose(adapted, ref, atol=5e-3)  # the KV cache is F16
        assert np.abs(adapted - b).max() > 0.1
        e.use_lora(False)  # drops the KV cache: the same prompt decodes on the base model
        assert not e.lora_on and e.n_past == 0
        np.testing.assert_array_equal(logits_of(e, text), b)
        e.use_lora(True)
        np.testing.assert_array_equal(logits_of(e, text), adapted)


def test_adapter_scale(tmp_path: Path, tiny_gguf: Path, exported: Path) -> None:
    """Scale s computes what an adapter with s times the update does; 0 is the base model."""
    doubled_model = peft_lora(tiny_gguf)  # the model `exported` was written from, B doubled
    with torch.no_grad():
        for name, p in doubled_model.named_parameters():
            if "lora_B" in name:
                p.mul_(2)
    doubled, _ = export_lora(doubled_model, tiny_gguf, tmp_path / "x2.gguf", dtype="f32")
    text = PROMPTS[1]
    with (
        Engine(tiny_gguf, n_ctx=128, n_threads=1) as base,
        Engine(tiny_gguf, n_ctx=128, n_threads=1, lora=exported) as e,
        Engine(tiny_gguf, n_ctx=128, n_threads=1, lora=doubled) as e2,
    ):
        b, adapted = logits_of(base, text), logits_of(e, text)
        e.set_lora_scale(0.0)
        assert e.n_past == 0  # the cache was computed at the old scale
        np.testing.assert_allclose(logits_of(e, text), b, atol=1e-4)
        e.set_lora_scale(2.0)
        twice = logits_of(e, text)
        assert np.abs(twice - adapted).max() > 0.1
        np.testing.assert_allclose(twice, logits_of(e2, text), atol=5e-3)
        e.set_lora_scale(1.0)
        np.testing.assert_array_equal(logits_of(e, text), adapted)
        with pytest.raises(S2TError, match="no LoRA adapter loaded"):
            base.set_lora_scale(0.5)


def test_zero_adapter_equals_base(tmp_path: Path, tiny_gguf: Path) -> None:
    zero = peft_lora(tiny_gguf, b_std=0)  # peft's own init: B = 0
    path, lora = export_lora(zero, tiny_gguf, tmp_path / "zero.gguf", dtype="f32")
    assert all(not b.any() for _, b in lora.pairs.values())
    with Engine(tiny_gguf, n_ctx=128, n_threads=1) as base, Engine(tiny_gguf, n_ctx=128, n_threads=1, lora=path) as e:
        for text in PROMPTS:
            np.testing.assert_array_equal(logits_of(e, text), logits_of(base, text))


def test_rslora_and_patterns_folded(tmp_path: Path, tiny_gguf: Path) -> None:
    """peft scalings other than alpha/r (rsLoRA, per-module alpha) are folded into B."""
    m = peft_lora(tiny_gguf, use_rslora=True, alpha_pattern={"down_proj": 2.0}, seed=3)
    path, lora = export_lora(m, tiny_gguf, tmp_path / "rs.gguf", dtype="f32")
    check = check_adapter(tiny_gguf, path, m, PROMPTS[:1], n_threads=1)
    assert check["delta_correlation"] > 0.9999 and check["top1_agreement"] == 1.0


# ---- refusals ----------------------------------------------------------------------------------


def test_export_refuses_unsupported(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, model) -> None:
    lora = lora_from_peft(model)
    with pytest.raises(S2TError, match="attn_k.weight maps 64 → 32, tiny-teacher.gguf has 96 → 48"):  # other shapes
        write_lora_gguf(lora, tiny_teacher_gguf, tmp_path / "x.gguf")
    with pytest.raises(S2TError, match="dtype must be"):
        write_lora_gguf(lora, tiny_gguf, tmp_path / "x.gguf", dtype="q4")
    sd = {"base_model.model.lm_head.lora_A.weight": torch.zeros(RANK, 64)}
    with pytest.raises(S2TError, match="only .* are supported"):
        lora_from_peft(state_dict=sd, rank=RANK, alpha=ALPHA)
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 64)}
    with pytest.raises(S2TError, match="missing its lora_B"):
        lora_from_peft(state_dict=sd, rank=RANK, alpha=ALPHA)
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.full((64, RANK), float("nan"))
    with pytest.raises(S2TError, match="NaN"):
        lora_from_peft(state_dict=sd, rank=RANK, alpha=ALPHA)
    with pytest.raises(S2TError, match="alpha > 0"):
        lora_from_peft(state_dict=sd, rank=RANK, alpha=float("nan"))
    with pytest.raises(S2TError, match="DoRA"):
        lora_from_peft(state_dict=sd, config={"r": RANK, "lora_alpha": ALPHA, "use_dora": True})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_engine_refuses_bad_adapters(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, exported: Path) -> None:
    with Engine(tiny_teacher_gguf, n_ctx=64, n_threads=1) as other:  # another shape: n_embd 96
        with pytest.raises(S2TError, match="refused this LoRA adapter.*incorrect shape"):
            other.load_lora(exported)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(exported.read_bytes()[: exported.stat().st_size - 100])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    for bad in (truncated, junk, tiny_gguf):  # a model is not an adapter either
        with pytest.raises(S2TError, match="refused this LoRA adapter"):
            Engine(tiny_gguf, n_ctx=64, n_threads=1, lora=bad)
    with pytest.raises(S2TError, match="no such LoRA adapter"):
        Engine(tiny_gguf, n_ctx=64, n_threads=1, lora=tmp_path / "missing.gguf")
    with Engine(tiny_gguf, n_ctx=64, n_threads=1) as plain:
        with pytest.raises(S2TError, match="no LoRA adapter loaded"):
            plain.use_lora(True)


def test_engine_refuses_other_architecture(tmp_path: Path, tiny_gguf: Path, exported: Path) -> None:
    import gguf

    src = gguf.GGUFReader(str(exported))
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", ALPHA)
    for t in src.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(S2TError, match="arch mismatch"):
        Engine(tiny_gguf, n_ctx=64, n_threads=1, lora=tmp_path / "llama.gguf")


def test_check_threshold_refusal() -> None:
    low = {"positions": 10, "top1_agreement": 0.5, "correlation_mean": 0.999, "file_type": 0}
    with pytest.raises(S2TError, match="top1_agreement 0.5000 < 0.98 over 10 positions"):
        require_adapter_check(low)
    nan = {**low, "top1_agreement": 1.0, "correlation_mean": float("nan")}
    with pytest.raises(S2TError, match="correlation_mean nan"):
        require_adapter_check(nan)


# ---- bundle and runtime ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    return adapter_bundle(tmp_path_factory.mktemp("adapter-bundle") / "bundle", tiny_gguf)


def test_adapter_bundle_manifest(bundle: Path, tiny_gguf: Path) -> None:
    from s2t_edge.store import sha256_file

    b = load_bundle(bundle)
    a = b.adapter
    assert b.manifest["format_version"] == 2 and not b.has_reranker and b.onnx_path is None
    assert a["file"] == ADAPTER_NAME and a["sha256"] == sha256_file(bundle / ADAPTER_NAME)
    assert a["rank"] == RANK and a["alpha"] == ALPHA and a["target_modules"] == sorted(TARGETS)
    assert a["base_sha256"] == b.manifest["slm"]["sha256"] == sha256_file(tiny_gguf)
    assert a["check"]["top1_agreement"] >= 0.98 and a["check"]["thresholds"] == EXACT_THRESHOLDS
    assert a["training"] == {"metrics": {"agreement": 0.5}} and "peft" in b.manifest["packages"]
    assert any("LoRA r=4" in line for line in b.describe())


def test_export_refuses_failed_check_and_other_base(tmp_path: Path, tiny_gguf: Path, model) -> None:
    ad = AdapterExport(model, PROMPTS[:1], dtype="f32", thresholds={"top1_agreement": 1.01})
    with pytest.raises(S2TError, match="export check failed"):
        export_bundle(tiny_gguf, None, tmp_path / "a", adapter=ad)
    assert not (tmp_path / "a" / ADAPTER_NAME).exists() and not (tmp_path / "a" / "bundle.json").exists()
    ad = AdapterExport(model, PROMPTS[:1], base_sha256="0" * 64)
    with pytest.raises(S2TError, match="trained on another GGUF"):
        export_bundle(tiny_gguf, None, tmp_path / "b", adapter=ad)
    with pytest.raises(S2TError, match="quantize first"):
        export_bundle(tiny_gguf, None, tmp_path / "c", adapter=ad, quantize="Q8_0")
    with pytest.raises(S2TError, match="needs a reranker checkpoint, an adapter"):
        export_bundle(tiny_gguf, None, tmp_path / "d")


def test_runtime_decodes_s2t_local_with_adapter(bundle: Path, tiny_gguf: Path, model, cache: Path) -> None:
    from s2t_edge.decode import decode

    models = open_models(bundle=str(bundle), ctx=256, threads=1, progress=False)
    try:
        slm = models.slm
        assert slm.lora_path == bundle / ADAPTER_NAME and not slm.hidden_enabled and slm.path == bundle / tiny_gguf.name
        prompt = slm.tokenize(PROMPTS[1])
        greedy = build_policy(models, "greedy")
        assert not slm.lora_on
        base_out = [t.id for t in decode(slm, prompt, max_tokens=12, **greedy.decode_args())]
        policy = build_policy(models)  # default with a bundle: s2t-local, greedy over the adapted SLM
        assert policy.name == "s2t-local" and slm.lora_on and not policy.needs_hidden
        out = [t.id for t in decode(slm, prompt, max_tokens=12, **policy.decode_args())]
        # each token is the adapted model's greedy choice per torch + peft (up to a near-tie: the
        # KV cache is F16)
        with torch.no_grad():
            for i, tok in enumerate(out):
                row = model(input_ids=torch.tensor([prompt + out[:i]])).logits[0, -1]
                assert row[tok] >= row.max() - 1e-2
        assert out != base_out
        build_policy(models, "greedy")
        assert not slm.lora_on
    finally:
        models.close()


def test_sampling_draws_from_the_adapted_slm(bundle: Path) -> None:
    """--temperature under s2t-local (chat, generate, serve) samples the adapted SLM; plain
    sampling of the base SLM stays --policy greedy (and is not served next to an adapter)."""
    from s2t_edge.decode import decode
    from s2t_edge.policy import SAMPLED_ADAPTED, Policy, sampling
    from s2t_edge.serve.protocol import APIError, GenRequest
    from s2t_edge.serve.service import SAMPLE_TOP_K, Service

    models = open_models(bundle=str(bundle), ctx=256, threads=1, progress=False)
    try:
        slm = models.slm
        prompt = slm.tokenize(PROMPTS[1])

        def ids(p: Policy) -> list[int]:
            return [t.id for t in decode(slm, prompt, max_tokens=12, **p.decode_args())]

        slm.use_lora(False)
        base, base40 = ids(sampling(1.0, top_k=8, seed=3)), ids(sampling(1.0, top_k=SAMPLE_TOP_K, seed=3))
        slm.use_lora(True)
        adapted, adapted40 = ids(sampling(1.0, top_k=8, seed=3)), ids(sampling(1.0, top_k=SAMPLE_TOP_K, seed=3))
        assert adapted != base and adapted40 != base40
        p = build_policy(models, temperature=1.0, seed=3)  # default with the bundle: s2t-local
        assert p.name == SAMPLED_ADAPTED and slm.lora_on and ids(p) == adapted
        p = build_policy(models, "greedy", temperature=1.0, seed=3)
        assert p.name == "sample" and not slm.lora_on and ids(p) == base

        svc = Service(slm, None, build_policy(models), "tiny", ctx=256, max_tokens=12)  # type: ignore[arg-type]
        sampled = svc.policy_for(GenRequest("completion", "tiny", False, prompt=PROMPTS[1], temperature=1.0, seed=3))
        assert sampled.name == SAMPLED_ADAPTED and slm.lora_on and ids(sampled) == adapted40
        with pytest.raises(APIError, match="--bundle none"):
            svc.policy_for(GenRequest("completion", "tiny", True, prompt=PROMPTS[1]))
        assert [m["id"] for m in svc.models()["data"]] == ["tiny"]  # no :greedy alias to offer
        assert svc.adapted  # /health says so: the web chat disables its plain-greedy box
    finally:
        models.close()


def test_adapter_scale_override(bundle: Path, tiny_gguf: Path) -> None:
    from s2t_edge.decode import decode

    models = open_models(bundle=str(bundle), ctx=256, threads=1, progress=False, adapter_scale=0.0)
    try:
        slm = models.slm
        assert slm.lora_scale == 0.0 and models.bundle.adapter_scale == 1.0
        prompt = slm.tokenize(PROMPTS[1])
        base_out = [t.id for t in decode(slm, prompt, max_tokens=12, **build_policy(models, "greedy").decode_args())]
        policy = build_policy(models, "s2t-local")
        assert slm.lora_on  # the adapter is on, at scale 0: the base model's tokens
        assert [t.id for t in decode(slm, prompt, max_tokens=12, **policy.decode_args())] == base_out
    finally:
        models.close()
    with pytest.raises(S2TError, match="--adapter-scale needs a bundle with a LoRA adapter"):
        open_models(str(tiny_gguf), bundle="none", ctx=64, threads=1, progress=False, adapter_scale=0.5)


def test_cli_adapter_scale(tmp_path: Path, bundle: Path, tiny_gguf: Path) -> None:
    import json

    from click.testing import CliRunner

    from s2t_edge.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    args = ["eval", "--data", str(data), "--policy", "s2t-local", "--bundle", str(bundle), "--max-tokens", "4"]
    r = CliRunner().invoke(main, [*args, "--threads", "1", "--adapter-scale", "0.5", "--out", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "h" / "s2t-local" / "settings.json").read_text())
    assert settings["adapter_scale"] == 0.5  # a run at another scale is never resumed into this one
    r = CliRunner().invoke(main, [*args, "--threads", "1", "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert "adapter_scale" not in json.loads((tmp_path / "d" / "s2t-local" / "settings.json").read_text())
    gen = ["generate", "hi", "--model", str(tiny_gguf), "--bundle", "none", "--adapter-scale", "1"]
    r = CliRunner().invoke(main, gen)
    assert r.exit_code != 0
    assert r.output.strip().endswith("--adapter-scale needs a bundle with a LoRA adapter (this run has none)")
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["serve", *gen[2:]])  # refused before the server binds a port
    assert r.exit_code != 0 and r.output.strip().endswith("(this run has none)")


def test_copy_of_bundle_with_other_gguf_refused(tmp_path: Path, bundle: Path, tiny_teacher_gguf: Path) -> None:
    root = tmp_path / "b"
    shutil.copytree(bundle, root)
    with pytest.raises(S2TError, match="was built for"):
        open_models(str(tiny_teacher_gguf), bundle=str(root), ctx=64, threads=1, progress=False)


def test_eval_votes_over_the_adapted_slm(tmp_path: Path, bundle: Path, tiny_gguf: Path, cache: Path) -> None:
    """s2t-local-maj@N samples the adapted SLM (maj@N the base) with the same seeds: each record is
    the vote of exactly those samples; without an adapter the policy is refused before decoding."""
    import json

    from s2t_edge.collect import problem_prompt
    from s2t_edge.eval.runner import parse_policies, run_eval
    from s2t_edge.parallel import sample_parallel
    from s2t_edge.prompt import ChatTemplate

    questions = ["What is 2 + 3?", "Tom has 4 apples and eats 1. How many are left?"]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "#### 5"}) + "\n" for q in questions))
    specs = parse_policies(["maj@2", "s2t-local-maj@2"])
    assert [(s.maj_n, s.adapted) for s in specs] == [(2, False), (2, True)]
    models = open_models(bundle=str(bundle), ctx=1024, threads=1, progress=False, n_seq=2, unified=True)
    try:
        slm = models.slm
        run_eval(models, data, specs, tmp_path / "e", max_tokens=10, seed=7, progress=False)
        outs = {}
        for name, on in (("maj_at_2", False), ("s2t-local-maj_at_2", True)):
            d = tmp_path / "e" / name
            recs = [json.loads(x) for x in (d / "results.jsonl").read_text().splitlines()]
            assert len(recs) == 2 and all(len(r["answers"]) == 2 for r in recs)
            settings = json.loads((d / "settings.json").read_text())
            assert (settings["bundle"] is not None) == on  # never resumed into the other model's run
            slm.use_lora(on)
            for i, (q, r) in enumerate(zip(questions, recs)):
                samples = sample_parallel(slm, problem_prompt(slm, ChatTemplate(slm), q), 2, max_tokens=10, seed=7 + i)
                assert r["output"] == slm.detokenize(samples[0]) and r["tokens"] == sum(map(len, samples))
            outs[name] = [r["output"] for r in recs]
        assert outs["maj_at_2"] != outs["s2t-local-maj_at_2"]
    finally:
        models.close()
    models = open_models(str(tiny_gguf), bundle="none", ctx=1024, threads=1, progress=False, n_seq=2, unified=True)
    try:
        with pytest.raises(S2TError, match="s2t-local-maj@2 samples the adapted SLM: it needs a bundle with a LoRA"):
            run_eval(models, data, specs[1:], tmp_path / "f", max_tokens=10, progress=False)
        assert not (tmp_path / "f").exists()
    finally:
        models.close()
    with pytest.raises(S2TError, match="use s2t-local-maj@N with N >= 1"):
        parse_policies(["s2t-local-maj@0"])
    with pytest.raises(S2TError, match="unknown policy"):
        parse_policies(["greedy-maj@2"])


def test_cli_eval_adapted_vote_loads_the_bundle(tmp_path: Path, bundle: Path) -> None:
    """`eval --policy s2t-local-maj@N` opens the bundle (and its adapter) as s2t-local does."""
    import json

    from click.testing import CliRunner

    from s2t_edge.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    args = ["eval", "--data", str(data), "--policy", "s2t-local-maj@2", "--bundle", str(bundle), "--max-tokens", "4"]
    r = CliRunner().invoke(main, [*args, "--threads", "1", "--out", str(tmp_path / "h"), "--json"])
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "h" / "s2t-local-maj_at_2" / "settings.json").read_text())
    assert settings["bundle"] == load_bundle(bundle).digest[:16] and settings["policy"] == "s2t-local-maj@2"


def test_generate_votes_over_the_adapted_slm(bundle: Path) -> None:
    """`generate --votes N` prints the winner of exactly the N samples eval's maj@N draws from the
    same prompt and seed: of the adapted SLM under s2t-local, of the base SLM under --policy greedy."""
    import json

    from click.testing import CliRunner

    from s2t_edge.cli import main
    from s2t_edge.collect import problem_prompt
    from s2t_edge.eval.vote import majority_vote
    from s2t_edge.parallel import sample_parallel
    from s2t_edge.prompt import ChatTemplate

    args = ["generate", PROMPTS[1], "--bundle", str(bundle), "--votes", "3", "--max-tokens", "10", "--seed", "5"]
    outs = {}
    for extra in ([], ["--policy", "greedy"]):
        r = CliRunner().invoke(main, [*args, *extra, "--threads", "1", "--json"])
        assert r.exit_code == 0, r.output
        outs[bool(extra)] = json.loads(r.stdout)
    adapted, base = outs[False], outs[True]
    assert adapted["policy"] == "s2t-local-maj@3" and base["policy"] == "maj@3"
    models = open_models(bundle=str(bundle), ctx=1024, threads=1, progress=False, n_seq=3, unified=True)
    try:
        slm = models.slm
        prompt = problem_prompt(slm, ChatTemplate(slm), PROMPTS[1])  # eval's prompt: the same samples
        for out, on in ((adapted, True), (base, False)):
            slm.use_lora(on)
            samples = sample_parallel(slm, prompt, 3, max_tokens=10, seed=5)
            assert out["texts"] == [slm.detokenize(s) for s in samples]
            assert out["stats"]["tokens"] == sum(map(len, samples)) and out["stats"]["temperature"] == 0.7
            assert (out["answer"], out["votes"]) == majority_vote(out["answers"]) and out["text"] in out["texts"]
    finally:
        models.close()
    assert adapted["texts"] != base["texts"]


def test_reranker_over_a_bundles_adapter(
    tmp_path: Path, bundle: Path, tiny_gguf: Path, tiny_teacher_gguf: Path
) -> None:
    """`collect --bundle` records the adapted SLM's groups; a reranker trained on such groups is
    bundled with that bundle's checked adapter (`export --adapter BUNDLE`), one trained on the base
    SLM's groups is refused there; the result decodes s2t-local on both."""
    import json

    from s2t_edge.train.train import train

    from s2t_edge.collect import collect
    from s2t_edge.shards import read_shard, shard_paths
    from tests.conftest import PROBLEMS as MATH
    from tests.test_train_export import CFG, make_groups

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in MATH[:2]))
    kw = {"k": 8, "max_tokens": 6, "n_ctx": 512, "threads": 1, "progress": False}
    m = collect(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "g", bundle=bundle, **kw)
    sha = load_bundle(bundle).adapter["sha256"]
    assert m["adapter_sha256"] == sha and m["problems"] == 2
    _, first = read_shard(shard_paths(tmp_path / "g")[0])
    base = collect(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "base", **kw)
    assert "adapter_sha256" not in base
    _, plain_first = read_shard(shard_paths(tmp_path / "base")[0])
    assert not np.allclose(first["slm_logits"][0], plain_first["slm_logits"][0])
    with pytest.raises(S2TError, match="other settings"):  # never mixed with the base SLM's groups
        collect(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "g", **kw)

    torch.set_num_threads(1)
    plain = make_groups(tmp_path / "plain", tiny_gguf)
    train(plain, tmp_path / "r-plain", tiny_gguf, CFG, progress=False)
    with pytest.raises(S2TError, match="trained on groups of the base SLM, not of this adapter"):
        export_bundle(tiny_gguf, tmp_path / "r-plain" / "reranker.pt", tmp_path / "b-plain", adapter=bundle)
    adapted = make_groups(tmp_path / "adapted", tiny_gguf)
    man = json.loads((adapted / "manifest.json").read_text())
    (adapted / "manifest.json").write_text(json.dumps({**man, "adapter_sha256": sha}))
    train(adapted, tmp_path / "r", tiny_gguf, CFG, progress=False)
    out = export_bundle(tiny_gguf, tmp_path / "r" / "reranker.pt", tmp_path / "both", adapter=bundle)
    both = load_bundle(out)
    assert both.has_reranker and both.adapter == load_bundle(bundle).adapter
    assert both.manifest["training"]["groups"]["adapter_sha256"] == sha
    models = open_models(bundle=str(out), ctx=256, threads=1, progress=False)
    try:
        p = build_policy(models)
        assert p.name == "s2t-local" and p.selector is not None and models.slm.lora_on
    finally:
        models.close()
