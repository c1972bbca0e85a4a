"""Train LESS kernels (phi, psi) for one model, base policy and budget; writes kernels.safetensors + manifest.json.
The command is ``scripts/train_less.py`` (``main`` here):

    python scripts/train_less.py --model smollm2_135m --base h2o --budget 0.1   # scaled CPU run (defaults)
    python scripts/train_less.py --model llama2_7b_chat --windows 512 --window-tokens 4096 --epochs 40 \
        --hidden 512 --device cuda                                               # the paper's schedule

Recipe (methods.md §2(c)): the frozen model runs over text windows; each layer's post-RoPE Q, K, V and its true
attention-block output O (after o_proj) are captured; per layer, independently, the kernels minimise the MSE
between O and o_proj(combined attention), where keys outside the base policy's sparse set are represented by
phi(q) psi(k); Adam lr 1e-3, StepLR(10 epochs, 0.5), dropout 0.3 on the first kernel layer, 90/10 split of the
windows, best-validation state per layer. The manifest also holds, per layer, the validation MSE of the plain
base policy and of the base at the same memory (``plus``: capacity + R/2 tokens, the paper's "Baseline+").
Validation windows come from the corpus's last tenth and training windows from the rest, so they share no text.
The softmax terms over the held keys carry no parameter and are computed once per layer; with the Lambda base the
state's sums over a row's evicted range are differences of prefix sums, so no N x N tensor is built and windows
of the model's full length (the paper's choice) are affordable. ``--loss-rows`` samples the rows of each step
(deviation: the paper counts every row). ``--evaluate KERNELS`` trains nothing and measures saved kernels on
held-out windows of ``--window-tokens`` (e.g. longer than they were trained on).

Sparse mask (``--mask``): ``prefill`` (default) gives every row t the set the engine holds at the first decode
step after a t-token prompt (H2O: top floor(budget t) by column sums of full attention over rows < t, recent
window protected; Lambda: sinks + recent) plus token t itself, i.e. what the generative code folds after prefill;
``sequential`` evicts step by step from the first token (the paper's H2O mask, scores of evicted keys dropped).
Corpus: C4 (allenai/c4 en/c4-train.00000-of-01024) when the hub answers, else the local Paul Graham essays.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kvbench.cache import EMPTY, LayerCache
from kvbench.engine.hooks import capture as capture_attention
from kvbench.engine.kernels import ROW_BLOCK
from kvbench.models import cache_root, load, model_spec
from kvbench.policies.base import Budget, Context, ScorerPolicy
from kvbench.policies.h2o import H2OPolicy
from kvbench.policies.less import Kernels, load_kernels
from kvbench.policies.streaming_llm import StreamingLLMPolicy

C4_FILE = "en/c4-train.00000-of-01024.json.gz"
# What an ``--evaluate`` report repeats of the kernels' manifest: how they were trained.
TRAINED = ("model", "base", "budget", "rank", "hidden", "windows", "window_tokens", "epochs", "loss_rows", "mask")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--base", choices=("h2o", "lambda"), default="h2o")
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of tokens seen kept by the base")
    parser.add_argument("--recent-fraction", type=float, default=0.5)
    parser.add_argument("--n-sink", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64, help="kernel hidden width (paper: 512 for 7B models)")
    parser.add_argument("--windows", type=int, default=12, help="text windows (paper: 512)")
    parser.add_argument("--window-tokens", type=int, default=512, help="tokens per window (paper: max positions)")
    parser.add_argument("--epochs", type=int, default=2, help="paper: 40")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--step-epochs", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--mask", choices=("prefill", "sequential"), default="prefill")
    parser.add_argument("--loss-from", type=int, default=64, help="first position counted in the loss")
    parser.add_argument("--loss-rows", type=int, default=0, help="rows per training step, sampled (0: all)")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    parser.add_argument("--layers-per-pass", type=int, default=30, help="layers captured per pass over the data")
    parser.add_argument("--spill", default=None, help="directory for memory-mapped captures (default: in RAM)")
    parser.add_argument("--data-dir", default=os.environ.get("KVBENCH_DATA_DIR", "../shared/data"))
    parser.add_argument("--corpus", choices=("auto", "c4", "local"), default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--evaluate",
        default=None,
        metavar="KERNELS",
        help="no training: held-out MSE of these kernels at --window-tokens, to --out (JSON)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def default_kernels_dir(model: str, base: str, budget: float) -> Path:
    """Where training writes by default (``kvbench/configs/policy/less.yaml`` points here for SmolLM2 H2O 0.1)."""
    return cache_root() / "less" / f"{model}_{base}_{budget:g}"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Fast offline check: HF_HUB_OFFLINE, then a TCP connect to the hub with a short timeout."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def corpus_texts(args: argparse.Namespace, needed_chars: int) -> tuple[list[str], str]:
    """Documents to cut windows from, and a label of where they came from."""
    if args.corpus in ("auto", "c4") and hub_reachable():
        from datasets import load_dataset

        stream = load_dataset("allenai/c4", data_files=C4_FILE, split="train", streaming=True)
        texts, total = [], 0
        for record in stream:
            texts.append(record["text"])
            total += len(record["text"])
            if total >= needed_chars:
                break
        return texts, f"allenai/c4 {C4_FILE}"
    if args.corpus == "c4":
        sys.exit("train_less: the hub is unreachable (or HF_HUB_OFFLINE=1); use --corpus local")
    haystack = Path(args.data_dir).expanduser() / "haystack"
    texts = [path.read_text() for path in sorted((haystack / "PaulGrahamEssays").glob("*.txt"))]
    ruler = haystack / "ruler_PaulGrahamEssays.json"
    if ruler.is_file() and sum(map(len, texts)) < needed_chars:  # the same essays again; only when short
        texts.append(json.loads(ruler.read_text())["text"])
        return texts, f"local {haystack}/PaulGrahamEssays/*.txt + ruler_PaulGrahamEssays.json"
    if not texts:
        sys.exit(f"train_less: no text under {haystack}; set --data-dir")
    return texts, f"local {haystack}/PaulGrahamEssays/*.txt"


def corpus_ids(tokenizer, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids


def make_windows(ids: list[int], n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens [n, length] from the token stream ``ids`` (seeded)."""
    if len(ids) < length + 1:
        sys.exit(f"train_less: the corpus has {len(ids)} tokens, fewer than one window of {length}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - length) for _ in range(n)]
    return torch.tensor([ids[s : s + length] for s in starts])


def n_validation(n: int) -> int:
    """Validation windows among ``n``: 10%, at least one."""
    return max(1, round(0.1 * n))


def held_out_tokens(n_ids: int, n: int, length: int) -> int:
    """Size of the corpus's last part that training never reads: a tenth, or enough for the validation windows
    of ``n`` not to overlap."""
    return max(n_ids // 10, n_validation(n) * length + 1)


def split_windows(ids: list[int], n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) windows cut from disjoint parts of the corpus: validation windows from its held-out
    last part, training windows from the rest."""
    tail = held_out_tokens(len(ids), n, length)
    if len(ids) - tail < length + 1:
        sys.exit(f"train_less: the corpus has {len(ids)} tokens, too few for disjoint windows of {length}")
    n_val = n_validation(n)
    return make_windows(ids[:-tail], n - n_val, length, seed), make_windows(ids[-tail:], n_val, length, seed + 1)


def held_out_windows(ids: list[int], manifest: dict, n: int, length: int, seed: int) -> torch.Tensor:
    """``--evaluate``: ``n`` windows of ``length`` from the part of the corpus the kernels' training held out."""
    tail = held_out_tokens(len(ids), manifest["windows"], manifest["window_tokens"])
    if tail < length + 1:
        sys.exit(f"train_less: the held-out part has {tail} tokens, too few for windows of {length}")
    return make_windows(ids[-tail:], n, length, seed + 1)


def capture(
    model, windows: torch.Tensor, layers: list[int], device: str, spill: Path | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: post-RoPE q [W, H, N, D], k/v [W, Hkv, N, D], the true attention-block output o [W, N, C], fp32,
    written in place window by window; with ``spill`` they are memory-mapped files in that directory (windows of
    the model's full length, for every layer, do not fit in RAM)."""

    config = model.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_windows, n = windows.shape
    shapes = {
        "q": (config.num_attention_heads, n, dim),
        "k": (config.num_key_value_heads, n, dim),
        "v": (config.num_key_value_heads, n, dim),
        "o": (n, config.hidden_size),
    }

    def allocate(layer: int, name: str) -> torch.Tensor:
        shape = (n_windows, *shapes[name])
        if spill is None:
            return torch.empty(shape)
        path = spill / f"layer{layer}_{name}_{n_windows}x{n}.npy"
        return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape))

    store = {i: {name: allocate(i, name) for name in shapes} for i in layers}
    current = 0

    def keep(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor) -> None:
        for name, tensor in (("q", query), ("k", key), ("v", value), ("o", out)):
            store[layer][name][current] = tensor[0].float().cpu()

    with torch.no_grad(), capture_attention(model, layers, keep):
        for current, window in enumerate(windows):  # noqa: B007 (read by ``keep``)
            model.model(input_ids=window[None].to(device), use_cache=False)
    return store


@dataclass
class Sparse:
    """The base policy's split of every row's keys into held (softmax over the cache) and evicted (the state).

    H2O: a mask ``held`` [W, Hkv, N, N] (row t, key j; includes j = t). Lambda: the evicted keys of row t are
    one range [start_t, stop_t) (``start``, ``stop`` [N]), the same for every window and head, so the state's
    sums over them are differences of prefix sums and no N x N tensor is needed.
    """

    held: torch.Tensor | None = None
    start: torch.Tensor | None = None
    stop: torch.Tensor | None = None

    def subset(self, index) -> Sparse:
        return self if self.held is None else Sparse(held=self.held[index])

    def held_rows(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        """Held keys among the first ``n_keys`` for the query ``rows`` [r]: [W or 1, Hkv or 1, r, n_keys]."""
        if self.held is not None:
            return self.held[:, :, rows, :n_keys]
        keys = torch.arange(n_keys)
        evicted = (keys >= self.start[rows, None]) & (keys < self.stop[rows, None])
        return ((keys <= rows[:, None]) & ~evicted)[None, None]


def sparse_set(q, k, scale, args, extra_tokens: int = 0) -> Sparse:
    """The base policy's held set for every query row of every window."""
    if args.base == "lambda":
        start, stop = lambda_ranges(k.shape[2], Budget("fraction", args.budget), args.n_sink, extra_tokens)
        return Sparse(start=start, stop=stop)
    return Sparse(held=sparse_mask(q, k, scale, args, extra_tokens))


def lambda_ranges(n: int, budget: Budget, n_sink: int, extra_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lambda's evicted keys [start_t, stop_t) for every row t: all but the min(capacity, n_sink) first and the
    capacity - n_sink most recent of the t tokens before it (the ``prefill`` mask; ``sequential`` is the same,
    since sinks + recent never depend on scores)."""
    rows = torch.arange(n)
    capacity = budget.capacity(rows.clamp(min=1)) + extra_tokens
    sink = capacity.clamp(max=n_sink)
    start = torch.minimum(sink, rows)
    return start, torch.maximum(start, rows - (capacity - sink))


def sparse_mask(q, k, scale, args, extra_tokens: int = 0) -> torch.Tensor:
    """The base policy's held set for every query row [W, Hkv, N, N] (bool; row t, key j; includes j = t)."""
    windows, heads, n, _ = k.shape
    group = q.shape[1] // heads
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    budget = Budget("fraction", args.budget)
    masks = []
    for w in range(windows):
        logits = torch.matmul(q[w], k[w].repeat_interleave(group, 0).transpose(-1, -2)) * scale  # [H, N, N]
        if args.mask == "sequential":
            masks.append(_sequential(logits.reshape(heads, group, n, n), budget, args, extra_tokens))
            continue
        probs = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)
        masks.append(_prefill(probs.reshape(heads, group, n, n).mean(1), budget, args, extra_tokens))
    return torch.stack(masks)


def base_policy(args) -> ScorerPolicy:
    """The sparse base as the engine runs it: H2O (heavy hitters + recent) or Lambda (StreamingLLM's sinks + recent)."""
    if args.base == "h2o":
        return H2OPolicy(recent_fraction=args.recent_fraction)
    return StreamingLLMPolicy(n_sink=args.n_sink)


def base_keep(policy: ScorerPolicy, positions, valid, scores, seen, capacity) -> torch.Tensor:
    """The base policy's own keep mask [B, Hkv, T] over slots at ``positions`` (``valid`` ones held), for
    ``seen`` tokens [B] under ``capacity`` [B]: ``policy.select`` on a cache of positions only, H2O's accumulated
    attention ``scores`` as its statistic (unused by Lambda)."""
    layer = LayerCache(positions=positions.masked_fill(~valid, EMPTY).to(torch.int32))
    layer.stat("h2o").copy_(scores)  # H2OPolicy.score reads the accumulated attention under this name
    ctx = Context(layer_idx=0, n_layers=1, phase="prefill", seen=seen, prompt_lengths=seen, capacity=capacity,
                  token_ids=None, group_size=1)  # fmt: skip
    keep = policy.select(layer, ctx)
    return layer.valid if keep is None else keep


def _prefill(probs: torch.Tensor, budget: Budget, args, extra_tokens: int) -> torch.Tensor:
    heads, n, _ = probs.shape
    rows = torch.arange(n)
    columns = torch.cumsum(probs, dim=1) - probs  # [Hkv, N, N]: column sums over rows < t
    capacity = budget.capacity(rows.clamp(min=1)) + extra_tokens  # prompt of t tokens (row 0 has none)
    positions = rows[None, None, :].expand(n, heads, n)  # [rows, Hkv, T]
    valid = positions < rows[:, None, None]
    held = base_keep(base_policy(args), positions, valid, columns.transpose(0, 1), rows, capacity)
    held |= positions == rows[:, None, None]
    return held.transpose(0, 1)  # [Hkv, N, N]


def _sequential(logits: torch.Tensor, budget: Budget, args, extra_tokens: int) -> torch.Tensor:
    heads, _, n, _ = logits.shape
    policy = base_policy(args)
    held = torch.zeros(heads, n, dtype=torch.bool)
    scores = torch.zeros(heads, n)
    positions = torch.arange(n)[None, None, :].expand(1, heads, n)
    mask = torch.zeros(heads, n, n, dtype=torch.bool)
    for t in range(n):
        held[:, t] = True
        mask[:, t] = held
        row = torch.softmax(logits[:, :, t].masked_fill(~held[:, None], -math.inf), -1).mean(1)
        scores += row
        seen = torch.tensor([t + 1])
        capacity = budget.capacity(seen) + extra_tokens
        if int(held.sum(-1).max()) > int(capacity):
            held &= base_keep(policy, positions, held[None], scores[None], seen, capacity)[0]
            scores = scores.masked_fill(~held, 0.0)
    return mask


def held_part(q, k, v, sparse: Sparse, scale: float) -> dict[str, torch.Tensor]:
    """Each row's softmax terms over its held keys, in the row's own scale (e_j = exp(q k_j scale - peak)):
    ``num`` = sum_j e_j v_j [W, H, N, D], ``den`` = sum_j e_j [W, H, N], ``peak`` [W, H, N]. They hold no kernel
    parameter, so they are computed once per layer, in blocks of rows over the causal prefix of keys."""
    windows, heads, n, dim = k.shape
    group = q.shape[1] // heads
    keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    parts: dict[str, list[torch.Tensor]] = {"num": [], "den": [], "peak": []}
    with torch.no_grad():
        for first in range(0, n, ROW_BLOCK):
            rows = torch.arange(first, min(first + ROW_BLOCK, n))
            width = int(rows[-1]) + 1
            held = sparse.held_rows(rows, width)
            held = held.repeat_interleave(group, 1) if held.shape[1] > 1 else held
            logits = torch.matmul(q[:, :, rows], keys[:, :, :width].transpose(-1, -2)) * scale
            logits = logits.masked_fill(~held, -math.inf)
            peak = logits.amax(-1, keepdim=True)
            weights = torch.exp(logits - peak)
            parts["num"].append(torch.matmul(weights, values[:, :, :width]))
            parts["den"].append(weights.sum(-1))
            parts["peak"].append(peak[..., 0])
    return {name: torch.cat(tensors, dim=2) for name, tensors in parts.items()}


def state_part(phi, psi, v, sparse: Sparse, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The state's terms of ``rows``: sum over each row's evicted keys j of phi(q_t) psi(k_j) v_j [W, H, r, D]
    and of phi(q_t) psi(k_j) [W, H, r]; phi [W, H, r, R] of those rows, psi [W, Hkv, N, R] of every key."""
    windows, heads, n, dim = v.shape
    group = phi.shape[1] // heads
    if sparse.held is None:  # Lambda: prefix sums of psi(k_j) v_j^T and psi(k_j), in fp64 so differences stay exact
        outer = F.pad((psi[..., :, None] * v[..., None, :]).double().cumsum(2), (0, 0, 0, 0, 1, 0))
        total = F.pad(psi.double().cumsum(2), (0, 0, 1, 0))
        stop, start = sparse.stop[rows], sparse.start[rows]
        state_h = (outer[:, :, stop] - outer[:, :, start]).float()  # [W, Hkv, r, R, D]
        state_z = (total[:, :, stop] - total[:, :, start]).float()  # [W, Hkv, r, R]
        phi = phi.reshape(windows, heads, group, len(rows), -1)
        num = torch.einsum("wkgrs,wkrsd->wkgrd", phi, state_h).reshape(windows, heads * group, len(rows), dim)
        den = torch.einsum("wkgrs,wkrs->wkgr", phi, state_z).reshape(windows, heads * group, len(rows))
        return num, den
    causal = torch.arange(n)[None, :] < rows[:, None]  # [r, N]
    evicted = (causal & ~sparse.held[:, :, rows]).repeat_interleave(group, 1)  # [W, H, r, N]
    weights = torch.matmul(phi, psi.repeat_interleave(group, 1).transpose(-1, -2)) * evicted
    return torch.matmul(weights, v.repeat_interleave(group, 1)), weights.sum(-1)


def predict(data: dict[str, torch.Tensor], sparse: Sparse, kernels: Kernels | None, o_proj, rows) -> torch.Tensor:
    """o_proj of the combined attention of ``rows`` [W, r, C]: (sum_held e_j v_j + phi H) / (sum_held e_j + phi z),
    the state's terms (weights phi(q) psi(k) against exp(q k scale)) brought into the row's shifted scale."""
    num, den = data["num"][:, :, rows], data["den"][:, :, rows]
    if kernels is not None:
        shift = torch.exp(-data["peak"][:, :, rows].clamp(min=-60))  # [W, H, r]
        state_num, state_den = state_part(kernels.phi(data["q"][:, :, rows]), kernels.psi(data["k"]), data["v"],
                                          sparse, rows)  # fmt: skip
        num, den = num + state_num * shift[..., None], den + state_den * shift
    out = num / den[..., None]
    return o_proj(out.transpose(1, 2).reshape(out.shape[0], len(rows), -1))


def loss_rows(n: int, args, generator: torch.Generator | None = None) -> torch.Tensor:
    """The rows the loss counts: every row from ``--loss-from`` on, or a random ``--loss-rows`` of them."""
    rows = torch.arange(args.loss_from, n)
    if generator is None or not args.loss_rows or args.loss_rows >= len(rows):
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[: args.loss_rows].sort().values]


def evaluate(data, sparse: Sparse, kernels, o_proj, args) -> float:
    """Validation MSE over every loss row, one window at a time."""
    rows = loss_rows(data["k"].shape[2], args)
    with torch.no_grad():
        losses = [
            F.mse_loss(
                predict(window_of(data, i), sparse.subset([i]), kernels, o_proj, rows), data["o"][i : i + 1, rows]
            )
            for i in range(data["k"].shape[0])
        ]
    return float(torch.stack(losses).mean())


def window_of(data: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    index = [index] if isinstance(index, int) else index
    return {name: tensor[index] for name, tensor in data.items()}


def prepare(data: dict[str, torch.Tensor], scale: float, args, extra_tokens: int = 0) -> tuple[dict, Sparse]:
    """Captured q, k, v, o plus their held-key terms, and the sparse set they were computed under."""
    sparse = sparse_set(data["q"], data["k"], scale, args, extra_tokens)
    return {**data, **held_part(data["q"], data["k"], data["v"], sparse, scale)}, sparse


def train_layer(train, val, layer, config, args, log) -> tuple[Kernels, dict[str, float]]:
    """Fit one layer's kernels on ``train`` windows; returns the best-validation kernels and the validation MSEs."""
    scale, o_proj = layer.self_attn.scaling, layer.self_attn.o_proj
    val_data, val_sparse = prepare(val, scale, args)
    plus_data, plus_sparse = prepare(val, scale, args, extra_tokens=args.rank // 2)
    result = {
        "base": evaluate(val_data, val_sparse, None, o_proj, args),
        "plus": evaluate(plus_data, plus_sparse, None, o_proj, args),
    }
    del plus_data
    train_data, train_sparse = prepare(train, scale, args)
    kernels = Kernels(
        config.num_attention_heads, config.num_key_value_heads, train["k"].shape[-1], args.rank, args.hidden,
        dropout=args.dropout,
    )  # fmt: skip
    optimizer = torch.optim.Adam(kernels.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_epochs, gamma=0.5)
    generator = torch.Generator().manual_seed(args.seed)
    # The untrained kernels (s1 = s2 = 1e-4) are nearly the plain base: they are the first candidate.
    kernels.eval()
    best = evaluate(val_data, val_sparse, kernels, o_proj, args)
    best_state = {name: p.detach().clone() for name, p in kernels.state_dict().items()}
    order = list(range(train["k"].shape[0]))
    for epoch in range(args.epochs):
        kernels.train()
        random.Random(args.seed + epoch).shuffle(order)
        for first in range(0, len(order), args.batch_size):
            batch = order[first : first + args.batch_size]
            rows = loss_rows(train["k"].shape[2], args, generator)
            prediction = predict(window_of(train_data, batch), train_sparse.subset(batch), kernels, o_proj, rows)
            loss = F.mse_loss(prediction, train["o"][batch][:, rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss = loss.detach()
        schedule.step()
        kernels.eval()
        current = evaluate(val_data, val_sparse, kernels, o_proj, args)
        log(f"  epoch {epoch + 1}: train {float(loss):.3e} val {current:.3e} (base {result['base']:.3e})")
        if current < best:
            best, best_state = current, {name: p.detach().clone() for name, p in kernels.state_dict().items()}
    kernels.load_state_dict(best_state)
    result["less"] = best
    return kernels.eval(), result


def evaluate_kernels(
    model, windows: torch.Tensor, layers: list[int], args, log, spill: Path | None = None
) -> tuple[dict[str, dict[str, float]], dict]:
    """Held-out MSE of saved kernels (``--evaluate``) per layer: base, plus (same memory) and LESS; and their
    manifest."""
    trained, manifest = load_kernels(args.evaluate, None, None, None)  # their manifest says what they are
    for key in ("base", "budget", "recent_fraction", "n_sink", "rank"):
        if manifest.get(key) is not None:
            setattr(args, key, manifest[key])
    losses: dict[str, dict[str, float]] = {}
    for first in range(0, len(layers), args.layers_per_pass):
        group = layers[first : first + args.layers_per_pass]
        captured = capture(model, windows, group, args.device, spill)
        for index in group:
            data = {name: tensor.to(args.device) for name, tensor in captured.pop(index).items()}
            attention = model.model.layers[index].self_attn
            prepared, sparse = prepare(data, attention.scaling, args)
            plus, plus_sparse = prepare(data, attention.scaling, args, extra_tokens=args.rank // 2)
            losses[str(index)] = {
                "base": evaluate(prepared, sparse, None, attention.o_proj, args),
                "plus": evaluate(plus, plus_sparse, None, attention.o_proj, args),
                "less": evaluate(prepared, sparse, trained[index], attention.o_proj, args),
            }
            log(f"layer {index}: " + " ".join(f"{k} {v:.3e}" for k, v in losses[str(index)].items()))
    return losses, manifest


def mean_losses(losses: dict[str, dict[str, float]]) -> dict[str, float]:
    return {kind: sum(v[kind] for v in losses.values()) / len(losses) for kind in ("base", "plus", "less")}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    spec = model_spec(args.model)
    model, tokenizer = load(spec, args.device, torch.float32)
    model.requires_grad_(False)
    config = model.config
    if args.evaluate:  # the corpus the kernels were trained on, and the part of it their training held out
        manifest = json.loads((Path(args.evaluate).expanduser() / "manifest.json").read_text())
        texts, source = corpus_texts(args, needed_chars=manifest["windows"] * manifest["window_tokens"] * 6)
        ids = corpus_ids(tokenizer, texts)
        train, val = None, held_out_windows(ids, manifest, n_validation(args.windows), args.window_tokens, args.seed)
    else:
        texts, source = corpus_texts(args, needed_chars=args.windows * args.window_tokens * 6)
        train, val = split_windows(corpus_ids(tokenizer, texts), args.windows, args.window_tokens, args.seed)
    layers = list(range(config.num_hidden_layers))
    if args.layers:
        layers = [int(i) for i in args.layers.split(",")]

    def log(message: str) -> None:
        print(f"[train_less {time.perf_counter() - started:7.1f}s] {message}", flush=True)

    with tempfile.TemporaryDirectory(dir=args.spill) if args.spill else contextlib.nullcontext() as spill:
        return run(model, train, val, layers, source, args, log, Path(spill) if spill else None, started)


def run(model, train, val, layers: list[int], source: str, args, log, spill: Path | None, started: float) -> Path:
    """Evaluate saved kernels (``--evaluate``) or train new ones, layer by layer; returns the file written."""
    config = model.config
    if args.evaluate:
        log(f"{args.evaluate}: {len(val)} held-out windows x {args.window_tokens} tokens from {source}")
        losses, manifest = evaluate_kernels(model, val, layers, args, log, spill)
        out = Path(args.out).expanduser() if args.out else Path(args.evaluate).expanduser() / "eval.json"
        report = {"kernels": args.evaluate, "data": source, "windows": len(val), "window_tokens": args.window_tokens,
                  "loss_from": args.loss_from, "trained": {key: manifest.get(key) for key in TRAINED},
                  "val_mse_mean": mean_losses(losses), "val_mse": losses}  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"mean {report['val_mse_mean']}; wrote {out}")
        return out
    out = Path(args.out).expanduser() if args.out else default_kernels_dir(args.model, args.base, args.budget)
    log(f"{args.model}: {len(train)} + {len(val)} windows x {args.window_tokens} tokens from {source}; layers {layers}")
    trained: dict[int, Kernels] = {}
    losses: dict[str, dict[str, float]] = {}
    for first in range(0, len(layers), args.layers_per_pass):
        group = layers[first : first + args.layers_per_pass]
        captured_train = capture(model, train, group, args.device, spill)
        captured_val = capture(model, val, group, args.device, spill)
        for index in group:
            data_train = {name: tensor.to(args.device) for name, tensor in captured_train.pop(index).items()}
            data_val = {name: tensor.to(args.device) for name, tensor in captured_val.pop(index).items()}
            log(f"layer {index}")
            trained[index], losses[str(index)] = train_layer(data_train, data_val, model.model.layers[index], config,
                                                             args, log)  # fmt: skip
            log(f"layer {index}: val mse " + " ".join(f"{k} {v:.3e}" for k, v in losses[str(index)].items()))
    write(out, trained, losses, args, config, source, time.perf_counter() - started)
    log(f"wrote {out}")
    return out


def write(out: Path, trained, losses, args, config, source: str, wall_s: float) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"layers.{index}.{name}": tensor.detach().contiguous().cpu()
        for index, kernels in trained.items()
        for name, tensor in kernels.state_dict().items()
    }
    save_file(tensors, str(out / "kernels.safetensors"))
    mean = mean_losses(losses)
    manifest = {
        "model": args.model,
        "base": args.base,
        "budget": args.budget,
        "recent_fraction": args.recent_fraction if args.base == "h2o" else None,
        "n_sink": args.n_sink if args.base == "lambda" else None,
        "rank": args.rank,
        "hidden": args.hidden,
        "n_layers": config.num_hidden_layers,
        "trained_layers": sorted(trained),
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "head_dim": int(next(iter(trained.values())).k1.shape[1]),
        "data": source,
        "windows": args.windows,
        "window_tokens": args.window_tokens,
        "val_split": 0.1,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "step_epochs": args.step_epochs,
        "dropout": args.dropout,
        "mask": args.mask,
        "loss_from": args.loss_from,
        "loss_rows": args.loss_rows,
        "seed": args.seed,
        "wall_s": round(wall_s, 1),
        "val_mse_mean": mean,
        "val_mse": losses,
        "val_mse_note": "per layer, held-out windows: base = sparse policy alone, plus = base with R/2 more "
        "tokens per head (same memory as LESS), less = base + learned state (best epoch)",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
