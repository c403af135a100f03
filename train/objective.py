"""The adapter's objective: the SLM's logits over its K candidates, the selection loss toward the
teacher (listwise over K, or cross-entropy over the vocabulary), the KL to the frozen SLM, and the
teacher-forced agreement a run is measured by on validation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from s2t_edge.train.trajectories import Trajectory
from s2t_edge.train.trunk import TrunkCache, final_hidden

from s2t_edge.errors import S2TError

if TYPE_CHECKING:
    from s2t_edge.train.adapter import AdapterConfig


def candidate_logits(
    model, t: Trajectory, trunk: TrunkCache | None = None, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states at the scored positions [T, H], candidate logits [T, K]); the logits
    and everything after them are float32 even when the decoder ran in bf16."""
    h = final_hidden(model, t.tokens, trunk, bf16)[t.first :]
    w = model.get_base_model().lm_head.weight
    ids = torch.from_numpy(t.ids)
    return h, torch.einsum("td,tkd->tk", h, w[ids])


def losses(
    model, t: Trajectory, cfg: AdapterConfig, rng: np.random.Generator, trunk: TrunkCache | None = None
) -> dict[str, torch.Tensor]:
    """The selection loss toward the teacher (`cfg.objective`) and the KL to the frozen SLM."""
    h, logits = candidate_logits(model, t, trunk, cfg.bf16)
    return selection_losses(model, h, logits, t, cfg, rng)


def selection_losses(
    model,
    h: torch.Tensor,
    logits: torch.Tensor,
    t: Trajectory,
    cfg: AdapterConfig,
    rng: np.random.Generator,
    scored: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """`losses` from the hidden states [T, H] and the candidate logits [T, K] of the language
    model; `scored` [T, K] replaces the logits the selection is trained on (not the KL's)."""
    scored = logits if scored is None else scored
    raw = torch.from_numpy(t.teacher)  # the teacher's full-vocabulary log-probs of the K candidates
    teacher = torch.log_softmax(raw, -1)  # renormalised over the K candidates
    if cfg.toward == "chosen" or (cfg.toward == "samples" and "-sample" in t.source):
        teacher = chosen_target(t, teacher)
    elif cfg.toward not in ("teacher", "samples"):
        raise S2TError(f"unknown adapter target {cfg.toward!r}")
    target = teacher.argmax(-1)
    div = target != 0  # the teacher prefers another candidate than the SLM's top-1
    if cfg.divergent_margin > 0:  # the teacher's own preference (its labels, even when the target is the chosen token)
        div = div & (raw.max(-1).values - raw[:, 0] >= cfg.divergent_margin)
    div = div.float()
    w = 1 + (cfg.divergent_weight - 1) * div
    if cfg.early_weight != 1.0:  # the answer's setup: where a teacher prefix turns the SLM's answers right
        early = (torch.arange(len(div)) < cfg.early_fraction * len(div)).float()
        w = w * (1 + (cfg.early_weight - 1) * early)
    head = model.get_base_model().lm_head.weight
    n = min(cfg.kl_positions, len(t.ids))
    pos = torch.from_numpy(np.sort(rng.choice(len(t.ids), n, replace=False)))
    if cfg.objective == "vocab":
        if scored is not logits:
            raise S2TError("the vocabulary objective trains the language model's own logits, not a scorer's")
        lse_all = torch.logsumexp(h @ head.T, -1, keepdim=True)
        sel = lse_all[:, 0] - scored.gather(1, target[:, None])[:, 0]  # -log p(teacher's token) over the vocabulary
        lse = lse_all[pos]
    elif cfg.objective == "select":
        logp = torch.log_softmax(scored, -1)
        soft = (teacher.exp() * (teacher - logp)).sum(-1)  # KL(teacher || adapted) over the K candidates
        sel = cfg.teacher_kl_weight * soft + F.cross_entropy(scored, target, reduction="none")
        lse = torch.logsumexp(h[pos] @ head.T, -1, keepdim=True)
    else:
        raise S2TError(f"unknown adapter objective {cfg.objective!r}")
    sel = (w * sel).sum() / w.sum()
    # KL(frozen || adapted) over K + 1 buckets (the candidates, everything else) at sampled positions
    ad = logits[pos] - lse
    base = torch.from_numpy(t.base)[pos]
    ad_rest = torch.log1p(-ad.exp().sum(-1).clamp(max=1 - 1e-6))
    base_rest = torch.log1p(-base.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (base.exp() * (base - ad)).sum(-1) + base_rest.exp() * (base_rest - ad_rest)
    return {"select": sel, "kl": kl.mean(), "loss": sel + cfg.kl_weight * kl.mean()}


def chosen_target(t: Trajectory, teacher: torch.Tensor) -> torch.Tensor:
    """Log-probs [T, K] all on the token the trajectory took (rejection sampling: a right answer's
    own tokens are the targets); where that token is not among the K candidates, the teacher's."""
    hit = torch.from_numpy(t.ids == t.chosen[:, None])
    onehot = torch.where(hit, 0.0, -1e4)  # log of a one-hot, finite so the KL term stays 0 * finite
    return torch.where(hit.any(-1, keepdim=True), onehot, teacher)


@torch.no_grad()
def evaluate(model, trajs: list[Trajectory], trunk: TrunkCache | None = None) -> dict:
    """Teacher-forced agreement with the teacher's choice among the K candidates."""
    model.eval()
    agree = total = div_hit = div_n = changed = same_n = 0
    for t in trajs:
        _, logits = candidate_logits(model, t, trunk)
        pick = logits.argmax(-1).numpy()
        target = t.teacher.argmax(-1)
        agree += int((pick == target).sum())
        total += len(target)
        d = target != 0
        div_hit += int((pick[d] == target[d]).sum())
        div_n += int(d.sum())
        changed += int((pick[~d] != 0).sum())
        same_n += int((~d).sum())
    model.train()
    return {
        "positions": total,
        "agreement": agree / max(total, 1),
        "base_agreement": 1 - div_n / max(total, 1),
        "hit_at_divergence": div_hit / max(div_n, 1),
        "changed_where_agreeing": changed / max(same_n, 1),
    }
