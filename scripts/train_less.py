"""Train LESS kernels (phi, psi) for one model, base policy and budget; writes kernels.safetensors + manifest.json.

    python scripts/train_less.py --model smollm2_135m --base h2o --budget 0.1   # scaled CPU run (defaults)
    python scripts/train_less.py --model llama2_7b_chat --windows 512 --window-tokens 4096 --epochs 40 \
        --hidden 512 --device cuda                                               # the paper's schedule

Recipe (methods.md §2(c)): the frozen model runs over text windows; each layer's post-RoPE Q, K, V and its true
attention-block output O (after o_proj) are captured; per layer, independently, the kernels minimise the MSE
between O and o_proj(combined attention), where keys outside the base policy's sparse set are represented by
phi(q) psi(k); Adam lr 1e-3, StepLR(10 epochs, 0.5), dropout 0.3 on the first kernel layer, 90/10 split of the
windows, best-validation state per layer. The manifest also holds, per layer, the validation MSE of the plain
base policy and of the base at the same memory (``plus``: capacity + R/2 tokens, the paper's "Baseline+").

Sparse mask (``--mask``): ``prefill`` (default) gives every row t the set the engine holds at the first decode
step after a t-token prompt (H2O: top floor(budget t) by column sums of full attention over rows < t, recent
window protected; Lambda: sinks + recent) plus token t itself, i.e. what the generative code folds after prefill;
``sequential`` evicts step by step from the first token (the paper's H2O mask, scores of evicted keys dropped).
Corpus: C4 (allenai/c4 en/c4-train.00000-of-01024) when the hub answers, else the local Paul Graham essays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvbench.config import model_spec
from kvbench.models import load
from kvbench.policies.base import Budget, top_capacity
from kvbench.policies.less import Kernels, default_kernels_dir

CAPTURE = "less_capture"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"


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
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    parser.add_argument("--layers-per-pass", type=int, default=30, help="layers captured per pass over the data")
    parser.add_argument("--data-dir", default=os.environ.get("KVBENCH_DATA_DIR", "../shared/data"))
    parser.add_argument("--corpus", choices=("auto", "c4", "local"), default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


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


def make_windows(tokenizer, texts: list[str], n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens [n, length] from the concatenated documents (seeded)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(ids) < length + 1:
        sys.exit(f"train_less: the corpus has {len(ids)} tokens, fewer than one window of {length}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - length) for _ in range(n)]
    return torch.tensor([ids[s : s + length] for s in starts])


def capture(model, windows: torch.Tensor, layers: list[int], device: str) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: post-RoPE q [W, H, N, D], k/v [W, Hkv, N, D], the true attention-block output o [W, N, C]."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    store: dict[int, dict[str, list[torch.Tensor]]] = {i: {"q": [], "k": [], "v": [], "o": []} for i in layers}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx in store:
            for name, tensor in (("q", query), ("k", key), ("v", value)):
                store[module.layer_idx][name].append(tensor.float().cpu())
        groups = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=groups > 1)
        return out.transpose(1, 2).contiguous(), None

    def keep_output(index):
        def hook(module, inputs, output):
            store[index]["o"].append(output[0].float().cpu())

        return hook

    AttentionInterface.register(CAPTURE, attention)
    AttentionMaskInterface.register(CAPTURE, lambda *a, **k: None)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    handles = [model.model.layers[i].self_attn.register_forward_hook(keep_output(i)) for i in layers]
    try:
        with torch.no_grad():
            for window in windows:
                model.model(input_ids=window[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    return {i: {name: torch.cat(parts) for name, parts in tensors.items()} for i, tensors in store.items()}


def sparse_mask(q, k, scale, args, extra_tokens: int = 0) -> torch.Tensor:
    """The base policy's held set for every query row [W, Hkv, N, N] (bool; row t, key j; includes j = t)."""
    windows, heads, n, _ = k.shape
    group = q.shape[1] // heads
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    budget = Budget("fraction", args.budget)
    masks = []
    for w in range(windows):
        logits = torch.matmul(q[w], k[w].repeat_interleave(group, 0).transpose(-1, -2)) * scale  # [H, N, N]
        probs = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)
        probs = probs.reshape(heads, group, n, n).mean(1)  # [Hkv, N, N], the engine's GQA average
        if args.mask == "sequential":
            masks.append(_sequential(logits.reshape(heads, group, n, n), budget, args, extra_tokens))
        else:
            masks.append(_prefill(probs, budget, args, extra_tokens))
    return torch.stack(masks)


def _protected(positions: torch.Tensor, seen: torch.Tensor, capacity: torch.Tensor, args) -> torch.Tensor:
    """positions [.., T] vs seen/capacity [rows]: H2O's recent window, or Lambda's sinks."""
    if args.base == "h2o":
        window = torch.floor(capacity * args.recent_fraction).long()
        return positions >= (seen - window)[:, None, None]
    return positions < args.n_sink


def _prefill(probs: torch.Tensor, budget: Budget, args, extra_tokens: int) -> torch.Tensor:
    heads, n, _ = probs.shape
    rows = torch.arange(n)
    columns = torch.cumsum(probs, dim=1) - probs  # [Hkv, N, N]: column sums over rows < t
    capacity = budget.capacity(rows.clamp(min=1)) + extra_tokens  # prompt of t tokens (row 0 has none)
    positions = rows[None, None, :].expand(n, heads, n)  # [rows, Hkv, T]
    valid = positions < rows[:, None, None]
    if args.base == "h2o":
        scores = columns.transpose(0, 1)
    else:
        scores = torch.where(positions < args.n_sink, -positions, positions).float()
    held = top_capacity(scores, capacity, valid, _protected(positions, rows, capacity, args))
    held |= positions == rows[:, None, None]
    return held.transpose(0, 1)  # [Hkv, N, N]


def _sequential(logits: torch.Tensor, budget: Budget, args, extra_tokens: int) -> torch.Tensor:
    heads, _, n, _ = logits.shape
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
            score = (
                scores if args.base == "h2o" else torch.where(positions[0] < args.n_sink, -positions[0], positions[0])
            )
            keep = top_capacity(score[None].float(), capacity, held[None], _protected(positions, seen, capacity, args))
            held &= keep[0]
            scores = scores.masked_fill(~held, 0.0)
    return mask


def predict(q, k, v, held, kernels: Kernels | None, scale: float, o_proj) -> torch.Tensor:
    """o_proj of the combined attention [W, N, C]: softmax over the held keys plus phi psi over the evicted."""
    windows, heads, n, dim = k.shape
    group = q.shape[1] // heads
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    held = held.repeat_interleave(group, 1)  # [W, H, N, N]
    keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = (torch.matmul(q, keys.transpose(-1, -2)) * scale).masked_fill(~held, -math.inf)
    peak = logits.amax(-1, keepdim=True)  # [W, H, N, 1]
    weights = torch.exp(logits - peak)
    if kernels is not None:
        linear = torch.matmul(kernels.phi(q), kernels.psi(k).repeat_interleave(group, 1).transpose(-1, -2))
        # Evicted keys weigh phi(q) psi(k) against exp(q k scale); in the row's shifted scale: * exp(-peak).
        weights = weights + linear * (causal & ~held) * torch.exp(-peak.clamp(min=-60))
    out = torch.matmul(weights, values) / weights.sum(-1, keepdim=True)
    return o_proj(out.transpose(1, 2).reshape(windows, n, -1))


def mse(prediction: torch.Tensor, target: torch.Tensor, loss_from: int) -> torch.Tensor:
    return F.mse_loss(prediction[:, loss_from:], target[:, loss_from:])


def evaluate(data, held, kernels, scale, o_proj, index, args) -> float:
    with torch.no_grad():
        losses = [
            mse(predict(data["q"][i : i + 1], data["k"][i : i + 1], data["v"][i : i + 1], held[i : i + 1],
                        kernels, scale, o_proj), data["o"][i : i + 1], args.loss_from)
            for i in index
        ]  # fmt: skip
    return float(torch.stack(losses).mean())


def train_layer(data, layer, config, args, log) -> tuple[Kernels, dict[str, float]]:
    """Fit one layer's kernels; returns the best-validation kernels and the validation MSEs."""
    scale = layer.self_attn.scaling
    o_proj = layer.self_attn.o_proj
    windows = data["k"].shape[0]
    n_val = max(1, round(0.1 * windows))
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(args.seed)).tolist()
    val, train = order[:n_val], order[n_val:]
    held = sparse_mask(data["q"], data["k"], scale, args)
    held_plus = sparse_mask(data["q"][val], data["k"][val], scale, args, extra_tokens=args.rank // 2)
    plus_data = {name: tensor[val] for name, tensor in data.items()}
    result = {
        "base": evaluate(data, held, None, scale, o_proj, val, args),
        "plus": evaluate(plus_data, held_plus, None, scale, o_proj, range(n_val), args),
    }
    kernels = Kernels(
        config.num_attention_heads, config.num_key_value_heads, data["k"].shape[-1], args.rank, args.hidden,
        dropout=args.dropout,
    )  # fmt: skip
    optimizer = torch.optim.Adam(kernels.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_epochs, gamma=0.5)
    # The untrained kernels (s1 = s2 = 1e-4) are nearly the plain base: they are the first candidate.
    kernels.eval()
    best = evaluate(data, held, kernels, scale, o_proj, val, args)
    best_state = {name: p.detach().clone() for name, p in kernels.state_dict().items()}
    for epoch in range(args.epochs):
        kernels.train()
        random.Random(args.seed + epoch).shuffle(train)
        for start in range(0, len(train), args.batch_size):
            batch = train[start : start + args.batch_size]
            prediction = predict(data["q"][batch], data["k"][batch], data["v"][batch], held[batch], kernels, scale,
                                 o_proj)  # fmt: skip
            loss = mse(prediction, data["o"][batch], args.loss_from)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss = loss.detach()
        schedule.step()
        kernels.eval()
        current = evaluate(data, held, kernels, scale, o_proj, val, args)
        log(f"  epoch {epoch + 1}: train {float(loss):.3e} val {current:.3e} (base {result['base']:.3e})")
        if current < best:
            best, best_state = current, {name: p.detach().clone() for name, p in kernels.state_dict().items()}
    kernels.load_state_dict(best_state)
    result["less"] = best
    return kernels.eval(), result


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    spec = model_spec(args.model)
    model, tokenizer = load(spec, args.device, torch.float32)
    model.requires_grad_(False)
    config = model.config
    out = Path(args.out).expanduser() if args.out else default_kernels_dir(args.model, args.base, args.budget)
    texts, source = corpus_texts(args, needed_chars=args.windows * args.window_tokens * 6)
    windows = make_windows(tokenizer, texts, args.windows, args.window_tokens, args.seed)
    layers = list(range(config.num_hidden_layers))
    if args.layers:
        layers = [int(i) for i in args.layers.split(",")]

    def log(message: str) -> None:
        print(f"[train_less {time.perf_counter() - started:7.1f}s] {message}", flush=True)

    log(f"{args.model}: {len(windows)} windows x {args.window_tokens} tokens from {source}; layers {layers}")
    trained: dict[int, Kernels] = {}
    losses: dict[str, dict[str, float]] = {}
    for first in range(0, len(layers), args.layers_per_pass):
        group = layers[first : first + args.layers_per_pass]
        captured = capture(model, windows, group, args.device)
        for index in group:
            data = {name: tensor.to(args.device) for name, tensor in captured.pop(index).items()}
            log(f"layer {index}")
            trained[index], losses[str(index)] = train_layer(data, model.model.layers[index], config, args, log)
            log(f"layer {index}: val mse base {losses[str(index)]['base']:.3e} plus {losses[str(index)]['plus']:.3e}"
                f" less {losses[str(index)]['less']:.3e}")  # fmt: skip
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
    mean = {kind: sum(v[kind] for v in losses.values()) / len(losses) for kind in ("base", "plus", "less")}
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
