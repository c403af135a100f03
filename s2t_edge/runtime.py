"""Loading what a command needs once: the SLM, its S2T-LOCAL bundle, an optional teacher, and the
policy that combines them. `generate`, `chat` and `eval` all go through here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from s2t_edge.bundle import Bundle, default_bundle_path, load_bundle
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.policy import SAMPLED_ADAPTED, Policy, greedy, sampling
from s2t_edge.reranker import OnnxReranker, S2TLocal
from s2t_edge.store import resolve_model
from s2t_edge.teacher import KLTrigger, TeacherSelector, check_same_vocab
from s2t_edge.trigger import Always, Entropy

POLICIES = ("greedy", "s2t-local", "s2t", "takeover")
TRIGGERS = ("always", "kl", "entropy")


@dataclass
class Models:
    slm: Engine
    bundle: Bundle | None = None
    teacher: Engine | None = None

    def close(self) -> None:
        self.slm.close()
        if self.teacher:
            self.teacher.close()


def default_bundle_for(slm_path: Path, explicit_model: bool) -> Bundle | None:
    """The shipped default bundle, unless the user picked a model it was not built for (then
    decoding is plain, silently: they did not ask for a reranker; `chat` shows the policy)."""
    path = default_bundle_path()
    if path is None:
        return None
    b = load_bundle(path)
    if explicit_model and b.manifest["slm"]["size"] != slm_path.stat().st_size:
        return None
    return b


def open_models(
    model: str | None = None,
    *,
    bundle: str | None = None,
    teacher: str | None = None,
    ctx: int = 4096,
    threads: int | None = None,
    gpu_layers: int = 0,
    n_seq: int = 1,
    teacher_seq: int = 1,
    unified: bool | None = None,
    progress: bool = True,
    pull: bool | None = None,
    adapter_scale: float | None = None,
) -> Models:
    """Load the SLM, its bundle and an optional teacher.

    `bundle`: None → the shipped default; "none" → no reranker; a path → that bundle (a bundle
    that carries its own GGUF runs on it unless `model` is given). The bundle is verified
    against the GGUF before anything is decoded. `n_seq` / `teacher_seq` sequences share each
    model's context (`ctx` cells: one unified KV cache, or with `unified=False` a cache of
    `ctx / n_seq` cells per sequence; see `Engine`). `pull`: see `store.resolve_model`.
    `adapter_scale` overrides the scale the bundle applies its LoRA adapter at.
    """
    if bundle is None or bundle == "none":
        slm_path = resolve_model(model, progress=progress, pull=pull)
        chosen = default_bundle_for(slm_path, model is not None) if bundle is None else None
    else:
        chosen = load_bundle(bundle)
        slm_path = (
            chosen.gguf_path
            if model is None and chosen.gguf_path
            else resolve_model(model, progress=progress, pull=pull)
        )

    if adapter_scale is not None and (chosen is None or chosen.adapter_path is None):
        raise S2TError("--adapter-scale needs a bundle with a LoRA adapter (this run has none)")
    slm = Engine(
        slm_path,
        n_ctx=ctx,
        n_threads=threads,
        n_gpu_layers=gpu_layers,
        hidden=chosen is not None and chosen.has_reranker,
        n_seq=n_seq,
        unified=unified,
    )
    if chosen is not None:
        chosen.check_slm(slm_path, slm.n_vocab)  # before the adapter is loaded or anything decodes
        if chosen.adapter_path is not None:
            slm.load_lora(chosen.adapter_path, chosen.adapter_scale if adapter_scale is None else adapter_scale)
            slm.use_lora(False)  # the base model until build_policy picks s2t-local
    t = None
    if teacher:
        t = Engine(
            resolve_model(teacher, role="teacher", progress=progress, pull=pull),
            n_ctx=ctx,
            n_threads=threads,
            n_gpu_layers=gpu_layers,
            n_seq=teacher_seq,
            unified=unified,
        )
        check_same_vocab(slm, t)
    return Models(slm, chosen, t)


def build_policy(
    models: Models,
    policy: str | None = None,
    *,
    k: int = 8,
    temperature: float = 0.0,
    seed: int | None = None,
    trigger: str = "always",
    threshold: float | None = None,
) -> Policy:
    """The named policy over loaded models. Default: s2t-local when a bundle is loaded, else greedy;
    a temperature > 0 samples instead (under s2t-local from the adapted SLM, if the bundle has an
    adapter).

    A bundle's LoRA adapter belongs to s2t-local, greedy or sampled: building a policy switches it
    on for s2t-local and off for every other (the SLM's KV cache is dropped when that changes the
    model). A caller decoding without a built policy (maj@N, s2t-local-maj@N) switches it with
    `models.slm.use_lora`."""
    if policy is None:
        policy = "s2t-local" if models.bundle else "greedy"
    if not math.isfinite(temperature) or temperature < 0:  # NaN would pass as "not > 0": greedy, silently
        raise S2TError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
        # KL and entropy are >= 0: NaN would never fire, a negative value fire at every step
        raise S2TError(f"--threshold must be a finite number >= 0, got {threshold}")
    if policy == "s2t-local" and models.bundle is None:
        raise S2TError("policy s2t-local needs a bundle (--bundle PATH, or the default bundle)")
    if models.slm.lora_path is not None:  # the bundle's adapter is part of s2t-local only
        models.slm.use_lora(policy == "s2t-local")
    if temperature > 0:  # sampling over the top-k; the selectors (reranker, teacher) choose greedily
        return sampling(temperature, top_k=k, seed=seed, name=SAMPLED_ADAPTED if models.slm.lora_on else "sample")
    if policy == "greedy":
        return greedy(k)
    if policy == "s2t-local":
        if not models.bundle.has_reranker:  # greedy over the adapted SLM
            return Policy("s2t-local", k=models.bundle.k)
        sel = S2TLocal(OnnxReranker(models.bundle.onnx_path), models.bundle.threshold, models.bundle.select_rule)
        return Policy("s2t-local", k=models.bundle.k, trigger=sel, selector=sel, needs_hidden=True)
    if policy in ("s2t", "takeover"):
        if models.teacher is None:
            raise S2TError(f"policy {policy} needs a teacher (--teacher MODEL)")
        sel = TeacherSelector(models.teacher, policy)
        if trigger == "always":
            trig = Always()
        elif threshold is None:
            raise S2TError(f"--trigger {trigger} needs --threshold (see `s2t-edge analyze coverage` for KL quantiles)")
        elif trigger == "kl":
            trig = KLTrigger(sel, threshold)
        elif trigger == "entropy":
            trig = Entropy(threshold)
        else:
            raise S2TError(f"unknown --trigger {trigger!r}; choose one of {', '.join(TRIGGERS)}")
        return Policy(f"{policy}/{trigger}" if trigger != "always" else policy, k=k, trigger=trig, selector=sel)
    raise S2TError(f"unknown --policy {policy!r}; choose one of {', '.join(POLICIES)}")
