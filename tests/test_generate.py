"""The engine with the full cache is plain greedy decoding: tokens equal ``model.generate``'s."""

from __future__ import annotations

import torch

from kvbench.batching import collate
from kvbench.engine import make_engine
from kvbench.engine.generate import decoder, generate, teacher_forced_nll
from kvbench.policies.base import Budget
from kvbench.policies.full import FullCache
from kvbench.policies.streaming_llm import StreamingLLMPolicy


def _prompts(data_dir, tokenizer, sizes):
    essay = (data_dir / "haystack" / "PaulGrahamEssays" / "addiction.txt").read_text()
    texts = [essay[start : start + size] + "\n\nSummarize the text above." for start, size in sizes]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def _engine(model, policy=None, budget=None):
    return make_engine(model, policy or FullCache(), budget or Budget())


def _reference(model, tokenizer, texts, max_new_tokens):
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tokens = []
    for row in out[:, encoded.input_ids.shape[1] :].tolist():
        stop = next((i for i, token in enumerate(row) if token in eos), len(row))
        tokens.append(row[:stop])
    return tokens, eos


def _ours(model, tokenizer, texts, max_new_tokens, eos, chunk_size, engine=None):
    ids = [[tokenizer.encode(text, add_special_tokens=False), []] for text in texts]
    batch = collate(ids, tokenizer.pad_token_id, "cpu")
    engine = engine or _engine(model)
    return generate(model, engine, batch, max_new_tokens, eos, chunk_size=chunk_size).tokens


def test_full_cache_equals_generate_on_smollm2_batch(smollm2, data_dir):
    model, tokenizer = smollm2
    texts = _prompts(data_dir, tokenizer, [(0, 4400), (3000, 2200)])  # ~1k and ~0.5k tokens
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert lengths[0] > 900 and lengths[0] != lengths[1]
    model.set_attn_implementation("sdpa")
    reference, eos = _reference(model, tokenizer, texts, 24)
    ours = _ours(model, tokenizer, texts, 24, eos, chunk_size=512)
    assert ours == reference
    assert all(len(tokens) > 5 for tokens in ours)


def test_full_cache_equals_generate_on_tiny_gqa(tiny, data_dir):
    model, tokenizer = tiny
    model.set_attn_implementation("sdpa")
    texts = _prompts(data_dir, tokenizer, [(0, 1500), (500, 700)])
    reference, eos = _reference(model, tokenizer, texts, 16)
    assert _ours(model, tokenizer, texts, 16, eos, chunk_size=128) == reference


def test_cache_holds_every_token_and_no_hooks_remain(tiny, data_dir):
    model, tokenizer = tiny
    texts = _prompts(data_dir, tokenizer, [(0, 800)])
    engine = _engine(model)
    _ours(model, tokenizer, texts, 4, set(), chunk_size=64, engine=engine)
    seen = int(engine.seen()[0])
    assert all(int(layer.held().min()) == seen for layer in engine.cache.layers)
    assert model.config._attn_implementation != "kvbench"
    assert not any(hasattr(module, "kvbench_engine") for module in model.modules())
    assert torch.isclose(engine.meters.kept_fraction(), torch.ones(1, dtype=torch.float64)).all()


def test_teacher_forced_nll_full_cache_equals_one_forward_pass(smollm2, data_dir):
    """Full cache: each target's NLL equals the plain model's on prompt + targets; budget 1.0 changes nothing and
    a small window raises it."""
    model, tokenizer = smollm2
    model.set_attn_implementation("sdpa")
    essay = (data_dir / "haystack" / "PaulGrahamEssays" / "addiction.txt").read_text()
    ids = tokenizer.encode(essay, add_special_tokens=False)
    prompts, targets = [ids[:300], ids[50:250]], torch.tensor([ids[300:332], ids[250:282]])
    batch = collate([[p, []] for p in prompts], tokenizer.pad_token_id, "cpu")
    ours = teacher_forced_nll(model, _engine(model), batch, targets, chunk_size=128)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + targets[row].tolist()])).logits[0, len(prompt) - 1 : -1]
        reference = torch.nn.functional.cross_entropy(logits.float(), targets[row], reduction="none")
        torch.testing.assert_close(ours[row], reference, atol=2e-4, rtol=1e-4)
    window = StreamingLLMPolicy(n_sink=4)
    same = teacher_forced_nll(model, _engine(model, window, Budget("fraction", 1.0)), batch, targets, chunk_size=128)
    torch.testing.assert_close(same, ours, atol=2e-4, rtol=1e-4)
    small = teacher_forced_nll(model, _engine(model, window, Budget("tokens", 16)), batch, targets, chunk_size=128)
    assert small.mean() > ours.mean() + 0.5


def test_compiled_decode_steps_give_eager_tokens(tiny, data_dir):
    """``compile=true``: decode steps under torch.compile, a padded batch, the full cache and a fixed-capacity
    policy (StreamingLLM at 64 tokens, evicting every step): the same tokens as eager."""
    model, tokenizer = tiny
    texts = _prompts(data_dir, tokenizer, [(0, 1500), (500, 700)])
    eos = {tokenizer.eos_token_id}
    for policy, budget in ((FullCache(), Budget()), (StreamingLLMPolicy(), Budget("tokens", 64))):
        eager = _ours(model, tokenizer, texts, 12, eos, 128, make_engine(model, policy, budget))
        compiled = make_engine(model, policy, budget, compile=True)
        assert _ours(model, tokenizer, texts, 12, eos, 128, compiled) == eager
        assert compiled.meters.decode_steps == 11
    assert isinstance(decoder(model, compiled), torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled
