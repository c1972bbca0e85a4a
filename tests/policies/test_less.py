"""LESS: the state update and the combined attention against a dense reference, exactness with nothing
evicted, strict kernel loading, and a few-step training run of scripts/train_less.py."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from kvbench.config import CONFIG_DIR
from kvbench.engine.engine import Engine, Step
from kvbench.errors import UserError
from kvbench.policies.base import Budget
from kvbench.policies.full import FullCache
from kvbench.policies.less import Kernels, LESSPolicy

from .test_matrix import essay_ids, run


def load_trainer():
    spec = importlib.util.spec_from_file_location("train_less", CONFIG_DIR.parents[1] / "scripts" / "train_less.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_random_kernels(path, n_heads, n_kv_heads, dim, rank=4, hidden=16, base="h2o", model=None):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    kernels = Kernels(n_heads, n_kv_heads, dim, rank, hidden)
    with torch.no_grad():  # large enough that the state matters against exp(q k scale)
        kernels.s1.uniform_(0.5, 2.0)
        kernels.s2.uniform_(0.1, 0.5)
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"layers.0.{name}": t.contiguous() for name, t in kernels.state_dict().items()},
              str(path / "kernels.safetensors"))  # fmt: skip
    manifest = {"model": model, "base": base, "rank": rank, "hidden": hidden, "n_layers": 1, "n_heads": n_heads,
                "n_kv_heads": n_kv_heads, "head_dim": dim, "budget": 0.5}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    return kernels


def test_state_and_combined_attention_match_the_dense_formula(tmp_path):
    batch, kv_heads, group, dim, prompt = 2, 2, 3, 8, 12
    heads = kv_heads * group
    kernels = write_random_kernels(tmp_path, heads, kv_heads, dim)
    policy = LESSPolicy(rank=4, kernels=str(tmp_path))
    engine = Engine(policy, Budget("tokens", 5), n_layers=1, group_size=group)
    engine.prompt_lengths = torch.full((batch,), prompt)
    torch.manual_seed(0)
    q = torch.randn(batch, heads, prompt + 1, dim)
    k = torch.randn(batch, kv_heads, prompt + 1, dim)
    v = torch.randn(batch, kv_heads, prompt + 1, dim)
    scale = 1 / math.sqrt(dim)
    positions = torch.arange(prompt + 1)[None].expand(batch, -1)
    step = Step(positions[:, :prompt], "prefill", evict=True)
    engine.attend(0, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], scale, step)
    layer = engine.cache.layers[0]
    held = torch.zeros(batch, kv_heads, prompt + 1, dtype=torch.bool)
    held.scatter_(-1, layer.positions.long(), True)
    evicted = ~held[..., :prompt]  # [B, Hkv, P]
    assert int(evicted.sum()) == batch * kv_heads * (prompt - 5)

    with torch.no_grad():
        psi = kernels.psi(k[:, :, :prompt]) * evicted[..., None]  # [B, Hkv, P, R]
        torch.testing.assert_close(layer.extra["less_z"], psi.sum(2))
        torch.testing.assert_close(layer.extra["less_h"], psi.transpose(-1, -2) @ v[:, :, :prompt])

    step = Step(positions[:, prompt:], "decode", evict=True)
    out = engine.attend(0, q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], scale, step)  # [B, 1, H, D]

    held[..., prompt] = True
    with torch.no_grad():
        phi = kernels.phi(q[:, :, prompt:])[:, :, 0]  # [B, H, R]
        psi_all = kernels.psi(k).repeat_interleave(group, 1)  # [B, H, P + 1, R]
    keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    weights = torch.where(
        held.repeat_interleave(group, 1),
        torch.exp(torch.einsum("bhd,bhtd->bht", q[:, :, prompt], keys) * scale),
        torch.einsum("bhr,bhtr->bht", phi, psi_all),
    )  # e_j on held keys, phi(q) psi(k_j) on evicted ones
    reference = torch.einsum("bht,bhtd->bhd", weights, values) / weights.sum(-1, keepdim=True)
    sparse_only = torch.einsum("bht,bhtd->bhd", weights * held.repeat_interleave(group, 1), values)
    sparse_only = sparse_only / (weights * held.repeat_interleave(group, 1)).sum(-1, keepdim=True)
    assert not torch.allclose(reference, sparse_only, atol=1e-3)  # the state contributes
    torch.testing.assert_close(out[:, 0], reference, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_kernels(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("less") / "tiny"
    args = "--model tiny_random_llama --windows 2 --window-tokens 96 --epochs 1 --loss-from 16 --hidden 8"
    args = [*args.split(), "--corpus", "local", "--data-dir", str(data_dir), "--out", str(out)]
    load_trainer().main(args)
    return out


def test_training_run_writes_kernels_and_manifest(tiny_kernels):
    manifest = json.loads((tiny_kernels / "manifest.json").read_text())
    assert (tiny_kernels / "kernels.safetensors").stat().st_size > 0
    assert manifest["model"] == "tiny_random_llama" and manifest["base"] == "h2o" and manifest["rank"] == 8
    assert manifest["trained_layers"] == [0, 1, 2, 3]
    losses = [value for layer in manifest["val_mse"].values() for value in layer.values()]
    assert len(losses) == 12 and all(math.isfinite(value) for value in losses)
    assert all(layer["less"] <= layer["base"] * 1.001 for layer in manifest["val_mse"].values())


def test_budget_one_reproduces_full_cache_and_a_budget_fills_the_state(tiny, data_dir, tiny_kernels):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 2000), (700, 900)])
    full, _ = run(model, tokenizer, FullCache(), Budget(), ids, 12)
    policy = LESSPolicy(kernels=str(tiny_kernels), model="tiny_random_llama")
    tokens, engine = run(model, tokenizer, policy, Budget("fraction", 1.0), ids, 12)
    assert tokens == full and not engine.cache.layers[0].extra
    _, engine = run(model, tokenizer, policy, Budget("fraction", 0.2), ids, 4)
    layer = engine.cache.layers[0]
    assert bool((layer.extra["less_z"].sum(-1) > 0).all())
    assert layer.side_nbytes() >= layer.extra["less_h"].nbytes + layer.extra["less_z"].nbytes


def test_kernels_are_required_and_checked(tmp_path):
    with pytest.raises(UserError, match="train_less.py"):
        LESSPolicy(kernels=None).load()
    with pytest.raises(UserError, match="no kernels"):
        LESSPolicy(kernels=str(tmp_path / "missing")).load()
    write_random_kernels(tmp_path, 4, 2, 8, base="h2o", model="tiny_random_llama")
    with pytest.raises(UserError, match="base=h2o, not lambda"):
        LESSPolicy(base="lambda", rank=4, kernels=str(tmp_path)).load()
    with pytest.raises(UserError, match="rank=4, not 8"):
        LESSPolicy(kernels=str(tmp_path)).load()
    with pytest.raises(UserError, match="model=tiny_random_llama, not smollm2_135m"):
        LESSPolicy(rank=4, kernels=str(tmp_path), model="smollm2_135m").load()


def lambda_args(budget, n_sink=4):
    return load_trainer().parse_args(["--base", "lambda", "--budget", str(budget), "--n-sink", str(n_sink)])


@pytest.mark.parametrize(("budget", "extra"), [(0.1, 0), (0.3, 0), (0.3, 4), (0.9, 0)])
def test_lambda_ranges_are_the_complement_of_the_lambda_mask(budget, extra):
    trainer = load_trainer()
    n, args = 70, lambda_args(budget)
    probs = torch.rand(2, n, n)  # Lambda ignores the scores
    held = trainer._prefill(probs, Budget("fraction", budget), args, extra)  # [Hkv, N, N]
    start, stop = trainer.lambda_ranges(n, Budget("fraction", budget), args.n_sink, extra)
    keys, rows = torch.arange(n)[None, :], torch.arange(n)[:, None]
    evicted = (keys >= start[:, None]) & (keys < stop[:, None])
    assert bool(evicted.any())
    for head in held:
        assert torch.equal(evicted, (keys < rows) & ~head)


def test_prediction_equals_the_dense_combined_attention_for_both_sparse_forms():
    """predict() (held terms computed once, prefix sums for Lambda) against the formula written out densely:
    softmax weights exp(q k scale) on held keys, phi(q) psi(k) on evicted ones, normalised together."""
    trainer = load_trainer()
    windows, kv_heads, group, n, dim = 2, 2, 3, 40, 8
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(windows, kv_heads * group, n, dim),
        torch.randn(windows, kv_heads, n, dim),
        torch.randn(windows, kv_heads, n, dim),
    )
    kernels = Kernels(kv_heads * group, kv_heads, dim, 4, 16).eval()
    with torch.no_grad():
        kernels.s1.uniform_(0.5, 2.0)
        kernels.s2.uniform_(0.1, 0.5)
    o_proj = torch.nn.Linear(kv_heads * group * dim, 5, bias=False)
    scale, rows = 1 / math.sqrt(dim), torch.arange(3, n)
    start, stop = trainer.lambda_ranges(n, Budget("fraction", 0.3), 2)
    keys = torch.arange(n)[None, :]
    held = (keys <= torch.arange(n)[:, None]) & ~((keys >= start[:, None]) & (keys < stop[:, None]))
    ranges = trainer.Sparse(start=start, stop=stop)
    mask = trainer.Sparse(held=held.expand(windows, kv_heads, n, n).clone())

    with torch.no_grad():
        keys_h, values_h = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        linear = kernels.phi(q) @ kernels.psi(k).repeat_interleave(group, 1).transpose(-1, -2)
        weights = torch.where(held, torch.exp(q @ keys_h.transpose(-1, -2) * scale), linear) * causal
        dense = (weights @ values_h) / weights.sum(-1, keepdim=True)
        reference = o_proj(dense.transpose(1, 2).reshape(windows, n, -1))[:, rows]
        for sparse in (ranges, mask):
            data = {"q": q, "k": k, "v": v, **trainer.held_part(q, k, v, sparse, scale)}
            torch.testing.assert_close(trainer.predict(data, sparse, kernels, o_proj, rows), reference)
            plain = trainer.predict(data, sparse, None, o_proj, rows)
            assert not torch.allclose(plain, reference, atol=1e-3)  # the state contributes


def test_spilled_capture_equals_capture_in_memory(tiny, tmp_path):
    model, _ = tiny
    windows = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    trainer = load_trainer()
    in_memory = trainer.capture(model, windows, [0, 2], "cpu")
    spilled = trainer.capture(model, windows, [0, 2], "cpu", spill=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 8
    for layer in (0, 2):
        for name, tensor in in_memory[layer].items():
            assert torch.equal(spilled[layer][name], tensor) and bool(tensor.abs().sum() > 0)


def test_validation_and_evaluation_windows_come_from_text_training_never_reads():
    trainer = load_trainer()
    ids = list(range(5000))  # each token id is its position in the corpus
    train, val = trainer.split_windows(ids, 12, 64, seed=0)
    tail = trainer.held_out_tokens(len(ids), 12, 64)
    assert train.shape == (11, 64) and val.shape == (1, 64)
    assert int(train.max()) < len(ids) - tail <= int(val.min())
    manifest = {"windows": 12, "window_tokens": 64}
    longer = trainer.held_out_windows(ids, manifest, 3, 256, seed=0)
    assert longer.shape == (3, 256) and int(longer.min()) >= len(ids) - tail
    with pytest.raises(SystemExit, match="held-out part"):
        trainer.held_out_windows(ids, manifest, 1, tail, seed=0)


def test_evaluate_measures_saved_kernels_on_longer_held_out_windows(tiny_kernels, data_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = f"--evaluate {tiny_kernels} --model tiny_random_llama --window-tokens 160 --windows 10 --loss-from 16"
    load_trainer().main([*args.split(), "--corpus", "local", "--data-dir", str(data_dir), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["window_tokens"] == 160 and report["windows"] == 1
    assert report["trained"]["model"] == "tiny_random_llama" and report["trained"]["base"] == "h2o"
    assert sorted(report["val_mse"]) == ["0", "1", "2", "3"]
    assert all(math.isfinite(v) and v >= 0 for layer in report["val_mse"].values() for v in layer.values())
    assert report["val_mse_mean"]["plus"] <= report["val_mse_mean"]["base"]  # more held tokens, less error
