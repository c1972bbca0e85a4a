"""KeyDiff (Park et al. 2025, arXiv 2504.15364): keep the keys least like the average key."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.cache import LayerCache
from kvbench.policies.base import Context, ScorerPolicy


@dataclass
class KeyDiffPolicy(ScorerPolicy):
    """Score every held key by its negative cosine similarity to the anchor, the mean of the held keys after
    L2 normalisation, per (example, KV head); keep the most dissimilar (§3, Eq. for the anchor and score;
    Algorithm 1 evicts after every block of the prompt and keeps the cache at its budget while generating).

    Phase: both (under ``evict_per_chunk`` a chunked prefill is the paper's block-wise processing). Budget:
    fraction or tokens. Needs no attention, so it runs with any kernel (flash included). Keys are the cached,
    post-RoPE ones, as in the paper's cache; empty slots (padding, ragged heads) take no part in the anchor.
    """

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        keys = F.normalize(layer.keys.float(), dim=-1)  # [B, Hkv, T, D]
        valid = layer.valid[..., None]
        anchor = (keys * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp(min=1)  # [B, Hkv, 1, D]
        return -F.cosine_similarity(keys, anchor, dim=-1)
