"""Everything the GPU claims need, in one call: a random-weight Llama-3.1-8B-shaped model in bf16, a 3.5k-token
prompt, 64 new tokens, batch 1/8/16; kvbench full, SnapKV 0.3, H2O 0.3 and StreamingLLM 0.3 against HF
``generate`` (DynamicCache). Reports examples/s, decode ms/step, peak GiB and the decode roofline computed from
the measured copy bandwidth (weights + the KV held, read once per step).

    python scripts/bench_gpu.py --out results/bench                 # on a GPU
    python scripts/bench_gpu.py --device cpu --tiny --out /tmp/b    # the same code path, in seconds (tests)

Random weights: cost does not depend on their values. Writes ``bench_gpu_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kvbench.bench import as_dict, copy_bandwidth, time_hf_generate, time_kvbench
from kvbench.policies import build as build_policy
from kvbench.policies.base import Budget
from kvbench.runner import git_commit, versions

LLAMA_3_1_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096}  # fmt: skip
POLICIES = {  # name: (factory, budget); each policy as its configs/policy YAML sets it
    "full": (lambda: build_policy("full"), Budget()),
    "snapkv": (lambda: build_policy("snapkv"), Budget("fraction", 0.3)),
    "h2o": (lambda: build_policy("h2o"), Budget("fraction", 0.3)),
    "streaming_llm": (lambda: build_policy("streaming_llm"), Budget("fraction", 0.3)),
}


def build(tiny: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    config = LlamaConfig(**(TINY if tiny else LLAMA_3_1_8B))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class _Tokenizer:
    """What kvbench needs of a tokenizer for random token ids: a pad id and nothing to bind."""

    pad_token_id = 0


def kv_bytes(model: torch.nn.Module, batch: int, tokens: float) -> float:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return batch * tokens * per_token * next(model.parameters()).element_size()


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, short prompts (checks the code path)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (3500; tiny: 96)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens (64; tiny: 4)")
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (1 8 16; tiny: 1 2)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    prompt = args.prompt or (96 if args.tiny else 3500)
    new_tokens = args.new_tokens or (4 if args.tiny else 64)
    batches = args.batches or ([1, 2] if args.tiny else [1, 8, 16])
    device = args.device
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    model = build(args.tiny, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device, n_bytes=(1 << 24) if args.tiny else (1 << 32))
    generator = torch.Generator().manual_seed(0)
    steps = new_tokens - 1
    rows = []
    for batch in batches:
        ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=generator).tolist()
        hf = time_hf_generate(model, ids, steps, device)
        rows.append({"engine": "hf_generate", "policy": "full", "batch": batch, **as_dict(hf)})
        for name, (make, budget) in POLICIES.items():
            timing = time_kvbench(model, _Tokenizer(), make, budget, ids, steps, device)
            rows.append({"engine": "kvbench", "policy": name, "batch": batch, **as_dict(timing)})
        for row in rows[-1 - len(POLICIES) :]:
            held = prompt * row["kept_fraction"] + new_tokens / 2
            roofline_ms = 1000 * (weight_bytes + kv_bytes(model, batch, held)) / bandwidth
            total_s = row["prefill_s"] + steps * row["ms_per_step"] / 1000
            row.update(roofline_ms=roofline_ms, vs_roofline=row["ms_per_step"] / roofline_ms)
            row["examples_per_s"] = batch / total_s if total_s > 0 else None
            print(json.dumps(row), flush=True)
    report = {
        "command": "python scripts/bench_gpu.py " + " ".join(argv),
        "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "model": "random-weight Llama-2-layer tiny" if args.tiny else "random-weight Llama-3.1-8B shape",
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "git_commit": git_commit(),
        "versions": versions(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_gpu_{torch.device(device).type}.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
