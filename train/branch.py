"""The published S2T-LOCAL scorer (issue #10, route 5), trained as an addition to the LoRA adapter.

Where an LLM-free trigger fires (the SLM's top-1 probability below `trigger_p`), each of the K
candidates is appended to the prefix as a one-token branch; the branch's final hidden state `h`
gives the candidate a bonus `w · h` (`w` is one learned vector: the logit of a reserved token) on
top of the adapted model's own candidate logit. All branches of a trajectory run in one forward
pass with a tree attention mask: branch token at step t sits at the position of the step's token
and sees the prefix and itself only. At runtime this is one batch of K tokens at a fired step.

The loss is the adapter's (listwise toward the teacher over the K candidates + KL to the frozen
SLM), with the branch-scored logits in place of the plain ones at fired steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from s2t_edge.train.adapter import AdapterConfig, Trajectory
from s2t_edge.train.objective import selection_losses


@dataclass
class BranchConfig(AdapterConfig):
    trigger_p: float = 0.9  # branch-score the steps where the SLM's top-1 probability is below this
    head_lr: float = 1e-3  # the score vector starts at zero and needs a larger step than LoRA


def fired_rows(t: Trajectory, trigger_p: float) -> np.ndarray:
    """Scored positions where the trigger fires (from the frozen SLM's labelled log-probs)."""
    return np.flatnonzero(np.exp(t.base[:, 0]) < trigger_p)


def tree_inputs(t: Trajectory, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [1, L], float attention mask [1, 1, L, L], position ids [1, L]): the trajectory,
    then K branch tokens per fired row, each seeing the prefix of its step and itself."""
    n, k = len(t.tokens), t.ids.shape[1]
    m = len(rows) * k
    last = np.repeat(t.first + rows, k)  # the last trunk index a branch token sees
    allowed = torch.zeros(n + m, n + m, dtype=torch.bool)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[n:, :n] = torch.arange(n)[None, :] <= torch.from_numpy(last)[:, None]
    allowed[torch.arange(n, n + m), torch.arange(n, n + m)] = True
    mask = torch.zeros(1, 1, n + m, n + m).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ids = torch.from_numpy(np.concatenate([t.tokens, t.ids[rows].reshape(-1)]))[None]
    pos = torch.from_numpy(np.concatenate([np.arange(n), last + 1]))[None]
    return ids, mask, pos


def branch_logits(
    model, w: torch.Tensor, t: Trajectory, rows: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trunk hidden states at the scored positions [T, H], candidate logits [T, K], the same with
    the branch bonus added at `rows`)."""
    inner = model.get_base_model()
    ids, mask, pos = tree_inputs(t, rows)
    h_all = inner.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[0]
    n, k = len(t.tokens), t.ids.shape[1]
    h = h_all[t.first : n]
    logits = torch.einsum("td,tkd->tk", h, inner.lm_head.weight[torch.from_numpy(t.ids)])
    if not len(rows):
        return h, logits, logits
    bonus = (h_all[n:] @ w).view(len(rows), k)
    return h, logits, logits.index_add(0, torch.from_numpy(rows), bonus)


def branch_losses(model, w: torch.Tensor, t: Trajectory, cfg: BranchConfig, rng: np.random.Generator) -> dict:
    h, logits, scored = branch_logits(model, w, t, fired_rows(t, cfg.trigger_p))
    return selection_losses(model, h, logits, t, cfg, rng, scored)


@torch.no_grad()
def branch_evaluate(model, w: torch.Tensor, trajs: list[Trajectory], trigger_p: float) -> dict:
    """Teacher-forced: the pick among the K candidates, branch-scored where the trigger fires and
    the plain adapted logits elsewhere (and, for comparison, the plain logits everywhere)."""
    model.eval()
    n = {"total": 0, "agree": 0, "div": 0, "div_hit": 0, "same": 0, "changed": 0, "fired": 0, "plain_div_hit": 0}
    for t in trajs:
        rows = fired_rows(t, trigger_p)
        _, plain, logits = branch_logits(model, w, t, rows)
        pick, plain_pick = logits.argmax(-1).numpy(), plain.argmax(-1).numpy()
        target = t.teacher.argmax(-1)
        d = target != 0
        n["total"] += len(target)
        n["agree"] += int((pick == target).sum())
        n["div"] += int(d.sum())
        n["div_hit"] += int((pick[d] == target[d]).sum())
        n["plain_div_hit"] += int((plain_pick[d] == target[d]).sum())
        n["same"] += int((~d).sum())
        n["changed"] += int((pick[~d] != 0).sum())
        n["fired"] += len(rows)
    model.train()
    return {
        "positions": n["total"],
        "agreement": n["agree"] / max(n["total"], 1),
        "base_agreement": 1 - n["div"] / max(n["total"], 1),
        "hit_at_divergence": n["div_hit"] / max(n["div"], 1),
        "plain_hit_at_divergence": n["plain_div_hit"] / max(n["div"], 1),
        "changed_where_agreeing": n["changed"] / max(n["same"], 1),
        "fire_rate": n["fired"] / max(n["total"], 1),
    }
