"""The branch scorer's tree attention on the tiny model: a branch token computes exactly what the
model computes for prefix + that candidate, the trunk is untouched by its branches, and training
the score vector moves toward the teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from s2t_edge.train import adapter as ad
from s2t_edge.train import branch as br

from s2t_edge.label import label


@pytest.fixture(scope="module")
def trajs(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path):
    out = tmp_path_factory.mktemp("labels")
    label(tiny_gguf, tiny_teacher_gguf, data, out, k=4, max_tokens=16, batch=3, threads=1, progress=False)
    return ad.load_trajectories(out)


def test_branch_tokens_see_their_prefix_and_nothing_else(trajs, tiny_gguf: Path) -> None:
    model = ad.add_lora(ad.load_slm(tiny_gguf), ad.AdapterConfig(rank=4, alpha=8))
    model.eval()
    inner = model.get_base_model().model
    t = trajs[0]
    rows = np.array([0, len(t.ids) // 2, len(t.ids) - 1])
    ids, mask, pos = br.tree_inputs(t, rows)
    n, k = len(t.tokens), t.ids.shape[1]
    with torch.no_grad():
        h = inner(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[0]
        plain = inner(input_ids=torch.from_numpy(t.tokens)[None]).last_hidden_state[0]
        torch.testing.assert_close(h[:n], plain, rtol=1e-4, atol=1e-4)  # the trunk ignores the branches
        for b, r in enumerate(rows):
            for j in range(k):
                prefix = np.concatenate([t.tokens[: t.first + r + 1], [t.ids[r, j]]])
                alone = inner(input_ids=torch.from_numpy(prefix)[None]).last_hidden_state[0, -1]
                torch.testing.assert_close(h[n + b * k + j], alone, rtol=1e-4, atol=1e-4)


def test_zero_score_vector_is_the_adapter_and_training_moves_it(trajs, tiny_gguf: Path) -> None:
    cfg = br.BranchConfig(rank=4, alpha=8, lr=5e-3, head_lr=5e-2, kl_positions=4, trigger_p=1.01)
    model = ad.add_lora(ad.load_slm(tiny_gguf), cfg)
    w = torch.zeros(model.get_base_model().config.hidden_size, requires_grad=True)
    t = trajs[0]
    rows = br.fired_rows(t, cfg.trigger_p)
    assert len(rows) == len(t.ids)  # p1 < 1.01 fires everywhere
    _, plain, scored = br.branch_logits(model, w, t, rows)
    torch.testing.assert_close(plain, scored)
    opt = torch.optim.Adam([w], lr=cfg.head_lr)
    rng = np.random.default_rng(0)
    first = br.branch_losses(model, w, t, cfg, rng)["select"].item()
    for _ in range(20):
        opt.zero_grad()
        br.branch_losses(model, w, t, cfg, rng)["loss"].backward()
        opt.step()
    assert br.branch_losses(model, w, t, cfg, rng)["select"].item() < first
    m = br.branch_evaluate(model, w, [t], cfg.trigger_p)
    assert m["fire_rate"] == 1.0 and 0 <= m["hit_at_divergence"] <= 1
