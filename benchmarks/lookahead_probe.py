"""Does one step of SLM lookahead tell where the teacher prefers the 2nd candidate?

    python benchmarks/lookahead_probe.py extract GROUPS_DIR FEATS_DIR [--threads 2]
    python benchmarks/lookahead_probe.py probe GROUPS_DIR FEATS_DIR [--threads 1]
    python benchmarks/lookahead_probe.py check GROUPS_DIR FEATS_DIR

`check` runs the first stored trajectory three ways: plain (its final layer against the hidden
state llama.cpp recorded), and with candidate 1 fed as the branch at every step (each branch
must reproduce the trunk position it copies, which tests the tree attention mask).

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


def branch_forward(model, prompt: list[int], chosen: list[int], branch: list[int]) -> torch.Tensor:
    """Final hidden states of prompt + chosen (the trunk) followed by one branch token per step:
    branch t sits at the position of chosen[t] and sees the prompt and chosen[:t], then itself."""
    P, T = len(prompt), len(branch)
    trunk = prompt + chosen
    L = len(trunk)
    allowed = torch.ones(L + T, L + T, dtype=torch.bool).tril()
    allowed[L:, :] = False
    for t in range(T):
        allowed[L + t, : P + t] = True
        allowed[L + t, L + t] = True
    mask = torch.zeros(1, 1, L + T, L + T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    pos = torch.tensor([list(range(L)) + [P + t for t in range(T)]])
    with torch.no_grad():
        return model.model(
            input_ids=torch.tensor([trunk + branch]), attention_mask=mask, position_ids=pos
        ).last_hidden_state[0]


def extract(groups: Path, feats: Path) -> None:
    from layer_probe import trajectories  # benchmarks/ is on sys.path when run as a script

    for model, path, _, a, prompt in trajectories(groups, feats):
        P, T, L = len(prompt), len(a["chosen"]), len(prompt) + len(a["chosen"])
        # the trunk token at P+t is the step-t choice; branch t is candidate 2 at step t
        h = branch_forward(model, prompt, a["chosen"].tolist(), a["slm_ids"][:, 1].tolist())
        with torch.no_grad():
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


def check(groups: Path, feats: Path) -> None:
    import tempfile

    from layer_probe import trajectories

    with tempfile.TemporaryDirectory() as tmp:  # the first trajectory, whatever `feats` holds
        model, path, _, a, prompt = next(trajectories(groups, Path(tmp)))
    chosen = a["chosen"].tolist()
    P, T, L = len(prompt), len(chosen), len(prompt) + len(chosen)
    with torch.no_grad():
        plain = model.model(input_ids=torch.tensor([prompt + chosen])).last_hidden_state[0]
    ours, theirs = plain[P - 1 : P - 1 + T].numpy().ravel(), a["hidden"].astype(np.float32).ravel()
    h = branch_forward(model, prompt, chosen, chosen)  # candidate 1 as the branch: a copy of the trunk
    print(
        f"{path.name}: final layer vs llama.cpp hidden state, correlation {np.corrcoef(ours, theirs)[0, 1]:.4f}; "
        f"trunk with branches vs plain, max |diff| {(h[:L] - plain).abs().max():.1e}; "
        f"branches vs the trunk positions they copy, max |diff| {(h[L:] - plain[P:L]).abs().max():.1e} "
        f"(mean |h| {plain.abs().mean():.2f})"
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

    main({"extract": extract, "probe": probe, "check": check})
