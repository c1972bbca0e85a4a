"""Expected Attention against a dense reference built from explicit rotation matrices: the statistics of the
window of queries before RoPE, the rotation averaged over the next n positions, the Gaussian expectation of
the logits, softmax, group mean, times ||v||; and the window slides while generating."""

from __future__ import annotations

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import Budget
from kvbench.policies.expected_attention import ExpectedAttentionPolicy

from .hand import context
from .test_matrix import essay_ids, run

DIM, HEADS, GROUP = 8, 4, 2
INV_FREQ = 1.0 / (100.0 ** (torch.arange(0, DIM, 2).float() / DIM))


def rotation(position: float) -> torch.Tensor:
    """RoPE's rotation at ``position`` as a [D, D] matrix (half-split pairs i, i + D/2)."""
    matrix = torch.zeros(DIM, DIM)
    half = DIM // 2
    for i, freq in enumerate(INV_FREQ.tolist()):
        c, s = torch.cos(torch.tensor(position * freq)), torch.sin(torch.tensor(position * freq))
        matrix[i, i], matrix[i, i + half], matrix[i + half, i], matrix[i + half, i + half] = c, -s, s, c
    return matrix


def test_expected_attention_matches_the_closed_form():
    torch.manual_seed(0)
    n_keys, n_queries, n_future, seen = 9, 6, 5, 20
    plain = torch.randn(1, HEADS, n_queries, DIM)  # queries before RoPE
    q_positions = torch.arange(seen - n_queries, seen)
    rotated = torch.zeros_like(plain)  # what the hook receives: the queries after RoPE
    for i, p in enumerate(q_positions.tolist()):
        rotated[0, :, i] = plain[0, :, i] @ rotation(float(p)).T
    keys, values = torch.randn(1, HEADS // GROUP, n_keys, DIM), torch.randn(1, HEADS // GROUP, n_keys, DIM)
    layer = LayerCache()
    layer.append(keys, values, torch.arange(n_keys)[None] * 2)
    policy = ExpectedAttentionPolicy(window=4, n_future=n_future, n_sink=0)
    ctx = context(seen=seen, capacity=3, group_size=GROUP)
    ctx.inv_freq = INV_FREQ
    policy.observe_queries(layer, rotated[:, :, :3], q_positions[None, :3], ctx)  # two chunks
    policy.observe_queries(layer, rotated[:, :, 3:], q_positions[None, 3:], ctx)
    scores = policy.score(layer, ctx)
    # Reference: the last 4 queries only (the window), explicit matrices throughout.
    window = plain[0, :, -4:]  # [H, 4, D]
    mean = window.mean(1)
    cov = torch.stack([(w - m).T @ (w - m) / 4 for w, m in zip(window, mean, strict=True)])
    average = torch.stack([rotation(float(seen + j)) for j in range(n_future)]).mean(0)
    expected = torch.zeros(HEADS // GROUP, n_keys)
    for head in range(HEADS):
        k = keys[0, head // GROUP]  # [T, D]
        mu, sigma = average @ mean[head], average @ cov[head] @ average.T
        logits = k @ mu / DIM**0.5 + 0.5 * torch.einsum("td,de,te->t", k, sigma, k) / DIM
        expected[head // GROUP] += torch.softmax(logits, -1) / GROUP
    expected *= values[0].norm(dim=-1)
    assert torch.allclose(scores[0], expected, atol=1e-5)


def test_expected_attention_window_slides_while_generating(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 600)])
    policy = ExpectedAttentionPolicy(window=16)
    _, engine = run(model, tokenizer, policy, Budget("fraction", 0.3), ids, 5)
    positions = engine.cache.layers[0].extra["ea_positions"][0]
    prompt = len(ids[0][0])
    # The 16 newest queries: the last 12 of the prompt and the 4 decode steps fed back (the 5th token is not).
    assert sorted(positions.tolist()) == list(range(prompt - 12, prompt + 4))
