"""Does one step of SLM lookahead tell where the teacher prefers the 2nd candidate?

    python benchmarks/lookahead_probe.py extract GROUPS_DIR FEATS_DIR [--threads 2]
    python benchmarks/lookahead_probe.py probe GROUPS_DIR FEATS_DIR [--threads 1]

At every stored step t the trajectory took candidate 1 (greedy); `extract` also feeds the SLM
candidate 2 at that step (one extra "branch" token per step, all branches of a trajectory in
one forward pass with a tree attention mask) and stores, after each of the two candidates, the
SLM's next-token entropy and top-1 probability and its final hidden state. This is the
information the published S2T-LOCAL buys with extra SLM passes per candidate. `probe` trains the
same probe as `layer_probe.py` with and without these features (test problems of the seed-0
split; gain in teacher probability per position x1e4 from taking candidate 2 where it fires).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _stats(logits: torch.Tensor) -> np.ndarray:
    """[n, 2]: entropy and top-1 probability of each row's next-token distribution."""
    lp = torch.log_softmax(logits.float(), -1)
    return torch.stack([-(lp.exp() * lp).sum(-1), lp.max(-1).values.exp()], -1).numpy()


def extract(groups: Path, feats: Path) -> None:
    from layer_probe import trajectories  # benchmarks/ is on sys.path when run as a script

    for model, path, _, a, prompt in trajectories(groups, feats):
        P, T = len(prompt), len(a["chosen"])
        trunk = prompt + a["chosen"].tolist()  # the trunk token at P+t is the step-t choice
        branch = a["slm_ids"][:, 1].tolist()  # candidate 2 at each step, placed where the choice was
        L, B = len(trunk), T
        allowed = torch.ones(L + B, L + B, dtype=torch.bool).tril()
        allowed[L:, :] = False
        for t in range(T):  # branch t sees the prompt and the choices before step t, then itself
            allowed[L + t, : P + t] = True
            allowed[L + t, L + t] = True
        mask = torch.zeros(1, 1, L + B, L + B).masked_fill(~allowed, torch.finfo(torch.float32).min)
        pos = torch.tensor([list(range(L)) + [P + t for t in range(T)]])
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([trunk + branch]), attention_mask=mask, position_ids=pos)
            h = h.last_hidden_state[0]
            after1, after2 = h[P : P + T], h[L : L + T]  # state after taking candidate 1 / candidate 2
            s1, s2 = _stats(model.lm_head(after1)), _stats(model.lm_head(after2))
        np.savez(
            feats / path.name,
            stats1=s1.astype(np.float32),
            stats2=s2.astype(np.float32),
            h1=after1.numpy().astype(np.float16),
            h2=after2.numpy().astype(np.float16),
            same=(a["chosen"] == a["slm_ids"][:, 0]),
        )


def probe(groups: Path, feats: Path) -> None:
    from layer_probe import load_features, probe_features
    from s2t_edge.train.data import load_groups, split_problems

    g, _ = load_groups(groups, 8)
    F = load_features(groups, feats)
    assert F["same"].all(), "collection took candidate 1 at every step (greedy mode)"
    split = split_problems(len(g.problem_ids), 0)
    s1, s2 = F["stats1"], F["stats2"]
    look = np.concatenate([s1, s2, s2 - s1], 1)
    dh = F["h2"].astype(np.float32) - F["h1"].astype(np.float32)
    probe_features(
        g,
        split,
        {
            "logits only": None,
            "logits + lookahead entropy/top-1 after each candidate": look,
            "logits + lookahead stats + hidden(after 2) - hidden(after 1)": np.concatenate([look, dh], 1),
        },
    )


if __name__ == "__main__":
    from layer_probe import main  # benchmarks/ is on sys.path when run as a script

    main(extract, probe)
