"""KVzip against a dense reference: each context pair's score is the largest attention it gets from the
reconstruction rows, recomputed here by the plain model (eager attention) on context + repeat, chunk by chunk."""

from __future__ import annotations

import math

import torch

from kvbench.batching import collate
from kvbench.cache import EMPTY
from kvbench.engine import make_engine
from kvbench.engine.generate import generate
from kvbench.policies import build
from kvbench.policies.base import Budget

from .test_matrix import essay_ids

CHUNK, OVERLAP = 24, 8


def repeats(tokenizer, policy, context: list[int]) -> list[list[int]]:
    """The reconstruction inputs of ``context``, chunk by chunk, built from the paper's recipe."""
    first = tokenizer.encode(policy.prompt, add_special_tokens=False)
    later = tokenizer.encode(policy.continued, add_special_tokens=False)
    chunks = [context[s : s + CHUNK] for s in range(0, len(context), CHUNK)]
    out = [first + chunks[0]]
    out += [later + chunks[k - 1][-OVERLAP:] + chunks[k] for k in range(1, len(chunks))]
    return out


def dense_scores(model, context: list[int], rows: list[list[int]], group: int) -> torch.Tensor:
    """[L, Hkv, n]: max over the repeat rows of every chunk and over each KV head's query heads of the
    model's own attention probabilities on the context columns (context + repeat as one causal sequence)."""
    n = len(context)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        scores = None
        for row in rows:
            with torch.no_grad():
                out = model(torch.tensor([context + row]), output_attentions=True, use_cache=False)
            per_layer = []
            for attention in out.attentions:  # [1, H, N, N]
                block = attention[0, :, n:, :n].float()  # repeat rows x context columns
                heads = block.shape[0]
                per_layer.append(block.reshape(heads // group, group, *block.shape[1:]).amax(dim=(1, 2)))
            chunk = torch.stack(per_layer)
            scores = chunk if scores is None else torch.maximum(scores, chunk)
    finally:
        model.set_attn_implementation(previous)
    return scores


def recording(policy):
    """Record every layer's (positions, kvzip scores) when the policy selects."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    original = policy.select

    def select(layer, ctx):
        seen[ctx.layer_idx] = (layer.positions.clone(), layer.stat("kvzip").clone())
        return original(layer, ctx)

    policy.select = select
    return seen


def test_scores_are_the_reconstructions_max_attention_on_a_padded_batch(tiny, data_dir):
    model, tokenizer = tiny
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    assert group > 1  # the max runs over a real GQA group
    ids = essay_ids(data_dir, tokenizer, [(0, 260), (400, 150)])
    contexts = [pair[0] for pair in ids]
    assert len(contexts[0]) > 2 * CHUNK and len(contexts[1]) > CHUNK  # several chunks, different counts
    policy = build("kvzip", chunk_size=CHUNK, overlap=OVERLAP)
    policy.bind(tokenizer)
    seen, fed = recording(policy), []
    original = policy.reconstruction_ids

    def reconstruction_ids(context, start, end):
        fed.append(original(context, start, end))
        return fed[-1]

    policy.reconstruction_ids = reconstruction_ids
    engine = make_engine(model, policy, Budget("fraction", 0.5))
    out = generate(model, engine, collate(ids, tokenizer.pad_token_id, "cpu"), 2, set(), chunk_size=32)
    assert out.score_pass_s is not None and out.score_pass_s > 0
    expected = [repeats(tokenizer, policy, context) for context in contexts]
    assert sorted(fed) == sorted(row for rows in expected for row in rows)  # the paper's prompts and overlap
    for b, context in enumerate(contexts):
        reference = dense_scores(model, context, expected[b], group)  # [L, Hkv, n]
        for layer, (positions, scores) in seen.items():
            for head in range(reference.shape[1]):
                held = positions[b, head] != EMPTY
                order = positions[b, head][held].long()
                assert order.tolist() == list(range(len(context)))  # the repeat's own entries are gone
                torch.testing.assert_close(scores[b, head][held], reference[layer, head, order], atol=1e-5, rtol=1e-4)


def test_the_kept_pairs_are_the_sinks_then_the_best_reference_scores(tiny, data_dir):
    model, tokenizer = tiny
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    ((context, _),) = ids = essay_ids(data_dir, tokenizer, [(0, 200)])
    policy = build("kvzip", chunk_size=CHUNK, overlap=OVERLAP)
    policy.bind(tokenizer)
    engine = make_engine(model, policy, Budget("fraction", 0.4))
    generate(model, engine, collate(ids, tokenizer.pad_token_id, "cpu"), 1, set(), chunk_size=64)
    reference = dense_scores(model, context, repeats(tokenizer, policy, context), group)
    capacity = math.floor(0.4 * len(context) + 1e-9)
    for index, layer in enumerate(engine.cache.layers):
        for head in range(reference.shape[1]):
            rest = reference[index, head, policy.n_sink :].argsort(descending=True)[: capacity - policy.n_sink]
            expected = sorted([*range(policy.n_sink), *(rest + policy.n_sink).tolist()])
            assert sorted(layer.positions[0, head].tolist()) == expected


def test_chunked_prefill_eviction_reconstructs_each_new_span_once(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 300)])
    policy = build("kvzip", chunk_size=CHUNK)
    policy.bind(tokenizer)
    spans: list[tuple[int, int]] = []
    original = policy.reconstruction_ids

    def reconstruction_ids(context, start, end):
        spans.append((start, end))
        assert len(context) == end
        return original(context, start, end)

    policy.reconstruction_ids = reconstruction_ids
    engine = make_engine(model, policy, Budget("fraction", 0.3))
    generate(model, engine, collate(ids, tokenizer.pad_token_id, "cpu"), 1, set(), chunk_size=40, evict_per_chunk=True)
    n = len(ids[0][0])
    # Before each eviction (every 40 prefilled tokens), the tokens since the previous one, in chunks of CHUNK.
    expected = [(s, min(s + CHUNK, a + 40, n)) for a in range(0, n, 40) for s in range(a, min(a + 40, n), CHUNK)]
    assert spans == expected


def test_a_policy_without_a_scoring_pass_reports_none(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 200)])
    engine = make_engine(model, build("snapkv"), Budget("fraction", 0.5))
    assert generate(model, engine, collate(ids, tokenizer.pad_token_id, "cpu"), 1, set()).score_pass_s is None


def test_a_wrapper_runs_its_scorers_reconstruction(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 200)])
    policy = build("adakv", scorer="kvzip", scorer_params={"chunk_size": CHUNK})
    policy.bind(tokenizer)
    seen = recording(policy.inner)
    engine = make_engine(model, policy, Budget("fraction", 0.4))
    out = generate(model, engine, collate(ids, tokenizer.pad_token_id, "cpu"), 1, set())
    assert out.score_pass_s is not None
    assert all(bool((scores[positions != EMPTY] > 0).all()) for positions, scores in seen.values())
