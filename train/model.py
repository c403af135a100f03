"""The S2T-LOCAL reranker: scores the SLM's K candidates and predicts divergence points.

Per candidate j it sees the SLM's log-probability, rank, and a low-rank interaction between the
step's final hidden state h and the candidate's output-embedding row E_j (the same vectors whose
dot product is the SLM's own logit): a learned low-rank correction of the SLM's LM head, applied
to K rows only. Per step, a trigger head reads h and the top-K distribution.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_VERSION = 1  # inputs: hidden [B,H] f32, ids [B,K] i64, logits [B,K] f32


class Reranker(nn.Module):
    def __init__(
        self,
        n_embd: int,
        k: int,
        rank: int = 32,
        width: int = 64,
        use_hidden: bool = True,
        use_tokens: bool = True,
        token_prior: bool = False,
    ) -> None:
        super().__init__()
        self.k, self.rank, self.use_hidden, self.use_tokens = k, rank, use_hidden, use_tokens
        self.token_prior = token_prior and use_tokens and use_hidden  # without h, codes enter alone anyway
        self.h_proj = nn.Linear(n_embd, rank)
        self.tok_proj = nn.Linear(n_embd, rank, bias=False)  # applied to output-embedding rows
        self.rank_emb = nn.Embedding(k, 8)
        cand_in = 8 + 4 + (rank if use_tokens else 0) + (rank if use_hidden else 0) + (rank if self.token_prior else 0)
        self.cand_mlp = nn.Sequential(nn.Linear(cand_in, width), nn.GELU(), nn.Linear(width, 1))
        trig_in = k + 2 + (rank if use_hidden else 0)
        self.trig_mlp = nn.Sequential(nn.Linear(trig_in, width), nn.GELU(), nn.Linear(width, 1))

    def forward(
        self, hidden: torch.Tensor, logits: torch.Tensor, codes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [B,K], trigger logit [B]); scores are the SLM log-probs plus a learned correction.

        `codes` [B,K,rank] are the candidates' token codes: `tok_proj` of their output-embedding
        rows in training, a lookup in a precomputed [V, rank] table in the exported model.
        """
        lp = torch.log_softmax(logits, dim=-1)
        B, K = logits.shape
        p = lp.exp()
        entropy = -(p * lp).sum(-1, keepdim=True)
        margin = logits[:, :1] - logits[:, 1:2]
        parts = [
            self.rank_emb.weight[:K].unsqueeze(0).expand(B, K, -1),
            torch.stack([lp, logits - logits[:, :1], entropy.expand(B, K), margin.expand(B, K)], -1),
        ]
        hp = torch.tanh(self.h_proj(hidden)) if self.use_hidden else None
        if self.use_tokens:
            parts.append(codes * hp.unsqueeze(1) if hp is not None else codes)
        if hp is not None:
            parts.append(hp.unsqueeze(1).expand(B, K, -1))
        if self.token_prior:  # the candidate's identity alone: which tokens the teacher tends to prefer
            parts.append(codes)
        scores = lp + self.cand_mlp(torch.cat(parts, -1)).squeeze(-1)
        trig_parts = [lp, entropy, margin] + ([hp] if hp is not None else [])
        trigger = self.trig_mlp(torch.cat(trig_parts, -1)).squeeze(-1)
        return scores, trigger
