"""The two protocols and the two prefill-eviction modes, end to end on the tiny model and real data."""

from __future__ import annotations

import pytest

from kvbench.batching import encode
from kvbench.policies.base import Budget
from kvbench.policies.snapkv import SnapKVPolicy
from kvbench.runner import run
from kvbench.tasks.longbench import LongBenchTask
from kvbench.tasks.passkey import PasskeyTask

from .policies.test_matrix import essay_ids
from .policies.test_matrix import run as generate_with


def test_query_agnostic_holds_out_the_question_and_after(tiny, data_dir):
    _, tokenizer = tiny
    (example,) = list(PasskeyTask(lengths=[600], depths=[0.5], n_per_cell=1).examples(data_dir, tokenizer))
    whole, nothing = encode(example, tokenizer, True, 2000, "official")
    head, tail = encode(example, tokenizer, True, 2000, "query_agnostic")
    assert nothing == []
    tail_text = tokenizer.decode(tail)
    assert tail_text.startswith(example.question) and tail_text.endswith(example.answer_prefix)
    assert tokenizer.decode(head) + tail_text == tokenizer.decode(whole)


def test_longbench_question_is_held_out(tiny, data_dir):
    _, tokenizer = tiny
    example = next(iter(LongBenchTask(subset="multifieldqa_zh").examples(data_dir, tokenizer)))
    _, tail = encode(example, tokenizer, True, 1500, "query_agnostic")
    assert tokenizer.decode(tail).startswith("问题：")


def test_held_out_question_is_never_evicted(tiny, data_dir):
    model, tokenizer = tiny
    (example,) = list(PasskeyTask(lengths=[800], depths=[0.5], n_per_cell=1).examples(data_dir, tokenizer))
    head, tail = encode(example, tokenizer, True, 2000, "query_agnostic")
    _, engine = generate_with(model, tokenizer, SnapKVPolicy(), Budget("fraction", 0.2), [[head, tail]], 3)
    question = set(range(len(head), len(head) + len(tail)))
    for layer in engine.cache.layers:
        held = set(layer.positions[0, 0].tolist())
        assert question <= held
        assert len(held) <= int(0.2 * len(head)) + len(tail) + 2


def test_chunked_prefill_eviction_bounds_prefill_memory(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 6000)])
    policy = SnapKVPolicy()
    _, whole = generate_with(model, tokenizer, policy, Budget("fraction", 0.25), ids, 1, chunk_size=128)
    _, chunked = generate_with(model, tokenizer, policy, Budget("fraction", 0.25), ids, 1, 128, True)
    assert chunked.meters.peak_nbytes < 0.6 * whole.meters.peak_nbytes
    assert abs(float(chunked.meters.kept_fraction()[0]) - float(whole.meters.kept_fraction()[0])) < 0.02


@pytest.mark.parametrize("protocol", ["official", "query_agnostic"])
@pytest.mark.parametrize("task", ["longbench/multi_news", "longbench/passage_retrieval_zh", "ruler/niah_single_2"])
def test_real_tasks_run_end_to_end(task, protocol, make_config):
    cfg = make_config(
        "model=tiny_random_llama", f"task={task}", "+policy=snapkv", "budget=0.3", f"protocol={protocol}",
        "limit=1", "task.max_new_tokens=4", "batch_size=1",
    )  # fmt: skip
    if task.startswith("ruler"):
        cfg.task.lengths = [1024]
    (row,) = run(cfg)
    assert row["protocol"] == protocol and row["task"] == task and row["n_examples"] == 1
    assert 0 < row["kv_kept_fraction"] < 0.45


def test_batches_are_grouped_by_length_within_a_window():
    from kvbench.batching import length_grouped
    from kvbench.tasks.base import Example

    lengths = [5, 90, 10, 80, 20, 70, 30, 60]
    examples = [Example(id=str(i), prompt="x" * n, answers=[]) for i, n in enumerate(lengths)]
    batches = length_grouped(examples, 2, window=2)  # windows of 4 examples
    assert [[len(e.prompt) for e in batch] for batch in batches] == [[5, 10], [80, 90], [20, 30], [60, 70]]
    assert sorted(e.id for batch in batches for e in batch) == sorted(e.id for e in examples)
