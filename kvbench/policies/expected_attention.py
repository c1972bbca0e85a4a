"""Expected Attention (Devoto et al. 2025, kvpress; arXiv 2510.00636): keep the keys future queries are
expected to attend to, in closed form from the statistics of recent queries."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbench.cache import EMPTY, LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import Context, Needs, ScorerPolicy, rotate, to_kv_heads, windows


@dataclass
class ExpectedAttentionPolicy(ScorerPolicy):
    """Model the next queries as Gaussian, q ~ N(mu, Sigma), with mu and Sigma the mean and covariance of the
    last ``window`` queries before RoPE, per query head. A query at a future position p is R_p q; averaged over
    the next ``n_future`` positions, the rotation is R = mean_p R_p, so the future query's mean is R mu and its
    covariance R Sigma R^T. The expected attention logit of a key k is then, from the Gaussian moment
    generating function, k.(R mu)/sqrt(d) + k^T R Sigma R^T k / (2d); a softmax over the held keys gives each
    key's expected attention, averaged over the query heads of its KV head and multiplied by ||v|| (the key's
    expected contribution to the output). The first ``n_sink`` tokens are kept (method, §3).

    Phase: both. At the end of prefill the statistics are those of the last ``window`` prompt queries; while
    generating, the same window slides over the newest queries (each decode step's query enters it) and the
    cache is held to its budget after every step. Budget: fraction or tokens. Needs no attention rows, only the
    queries (``observe_queries``), so it runs with flash kernels. Deviations: the scale is 1/sqrt(d) (Llama's;
    the model's own ``scaling`` is not passed to policies); ``use_covariance=false`` drops the second term;
    the window of recent queries (rather than all prompt queries) is kvbench's choice, one rule at prefill
    and decode. Side state: the window of queries, ``window`` x H x D floats per example and layer.
    """

    window: int = field(default=64, metadata={"min": 1})
    n_future: int = field(default=512, metadata={"min": 1})
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    needs = Needs(queries=lambda p: p.window, decode_queries=True)

    def observe_queries(
        self, layer: LayerCache, queries: torch.Tensor, query_positions: torch.Tensor, ctx: Context
    ) -> None:
        if ctx.inv_freq is None:
            raise UserError("expected_attention needs a RoPE model (its rotary embedding's frequencies)")
        batch, heads, n_new, dim = queries.shape
        valid = query_positions != EMPTY  # [B, q]
        delta = torch.where(valid, -query_positions.long(), 0)[:, None, :].expand(batch, heads, n_new)
        plain = rotate(queries.float(), delta, ctx.inv_freq)  # [B, H, q, D] before RoPE
        ring = layer.extra.get("ea_queries")
        if ring is None:
            ring = layer.extra["ea_queries"] = plain.new_zeros(batch, heads, self.window, dim)
            layer.extra["ea_positions"] = torch.full((batch, self.window), EMPTY, device=plain.device)
        start = layer.host.get("ea_next", 0)  # the ring's next slot, kept on the host (no device read)
        first = max(0, n_new - self.window)  # only the newest ``window`` queries can stay
        slots = torch.tensor([(start + i) % self.window for i in range(first, n_new)], device=ring.device)
        ring[:, :, slots] = plain[:, :, first:]
        layer.extra["ea_positions"][:, slots] = query_positions[:, first:].to(torch.int64)
        layer.host["ea_next"] = (start + n_new) % self.window

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        ring = layer.extra["ea_queries"]  # [B, H, W, D]
        present = (layer.extra["ea_positions"] != EMPTY)[:, None, :, None].float()  # [B, 1, W, 1]
        count = present.sum(2).clamp(min=1)  # [B, 1, 1]
        mean = (ring * present).sum(2) / count  # [B, H, D]
        dim = ring.shape[-1]
        future = ctx.seen.long()[:, None] + torch.arange(self.n_future, device=ring.device)  # [B, n]
        angles = future[..., None].float() * ctx.inv_freq.float()  # [B, n, D/2]
        cos, sin = angles.cos().mean(1).repeat(1, 2), angles.sin().mean(1).repeat(1, 2)  # [B, D]
        mean_future = mean * cos[:, None] + _rotate_half(mean) * sin[:, None]  # R mu
        keys = layer.keys.float().repeat_interleave(ctx.group_size, dim=1)  # [B, H, T, D]
        scale = dim**-0.5
        logits = scale * torch.einsum("bhtd,bhd->bht", keys, mean_future)
        if self.use_covariance:
            centred = (ring - mean[:, :, None]) * present
            cov = torch.einsum("bhwd,bhwe->bhde", centred, centred) / count[..., None]  # [B, H, D, D]
            rotation = torch.diag_embed(cos) + torch.diag_embed(sin) @ _half_turn(dim, ring.device)  # [B, D, D]
            cov_future = rotation[:, None] @ cov @ rotation[:, None].transpose(-1, -2)
            logits = logits + 0.5 * scale**2 * torch.einsum("bhtd,bhde,bhte->bht", keys, cov_future, keys)
        valid = layer.valid.repeat_interleave(ctx.group_size, dim=1)
        probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
        scores = to_kv_heads(probs, ctx.group_size)  # [B, Hkv, T]
        if self.use_vnorm:
            scores = (scores + self.epsilon) * layer.values.float().norm(dim=-1)
        return scores

    def protected(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        """The first ``n_sink`` positions, or as many of the first as the capacity holds."""
        first = ctx.capacity.clamp(max=self.n_sink)[:, None, None]  # [B, 1, 1]
        return layer.valid & (layer.positions < first)

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        return windows(prompt_tokens, head=min(self.n_sink, capacity or 0))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def _half_turn(dim: int, device: torch.device) -> torch.Tensor:
    """The matrix J of ``_rotate_half`` (J x = rotate_half(x)): [D, D]."""
    return _rotate_half(torch.eye(dim, device=device)).T
