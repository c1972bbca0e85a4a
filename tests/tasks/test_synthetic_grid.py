"""Passkey and needle grids that measure: 11 depths x 3 keys by default, depth over the whole model input, the
needle's token span recorded, and a flag for needles inside a window the policy keeps by rule."""

from __future__ import annotations

import pytest

from kvbench.batching import encode, needle_span
from kvbench.policies.h2o import H2OPolicy
from kvbench.policies.snapkv import SnapKVPolicy
from kvbench.policies.streaming_llm import StreamingLLMPolicy
from kvbench.policies.tova import TOVAPolicy
from kvbench.runner import run
from kvbench.tasks.base import DEPTHS
from kvbench.tasks.needle import NeedleTask
from kvbench.tasks.passkey import PasskeyTask


def test_default_grid_is_eleven_depths_by_three_keys():
    assert DEPTHS[0] == 0.05 and DEPTHS[-1] == 0.95 and len(DEPTHS) == 11
    for task in (PasskeyTask(), NeedleTask()):
        assert task.depths == DEPTHS and task.n_per_cell == 3


@pytest.mark.parametrize("task", [PasskeyTask(lengths=[2048], n_per_cell=1), NeedleTask(lengths=[2048])])
def test_depth_is_measured_over_the_whole_input_and_the_span_is_the_needle(task, smollm2, data_dir):
    _, tokenizer = smollm2
    examples = list(task.examples(data_dir, tokenizer))
    assert len(examples) == 11 * task.n_per_cell
    for example in examples:
        (ids, _) = encode(example, tokenizer, True, 7900, "official")
        start, end = needle_span(example, tokenizer, True, 7900)
        assert example.meta["needle"] in tokenizer.decode(ids[max(0, start - 1) : end + 1])
        assert abs(start / len(ids) - example.meta["depth"]) < 0.03, (example.id, start, len(ids))
        assert abs(len(ids) - task.lengths[0]) < 0.03 * task.lengths[0]
    assert len({e.answers[0] for e in examples}) >= min(3, len(examples))  # a key per example of a cell


def test_protected_windows_are_the_rule_kept_positions():
    assert StreamingLLMPolicy(n_sink=4).protected_windows(1000, 100) == [(0, 4), (904, 1000)]
    assert H2OPolicy(recent_fraction=0.5).protected_windows(1000, 100) == [(950, 1000)]
    assert SnapKVPolicy(window=32).protected_windows(1000, 100) == [(968, 1000)]
    assert TOVAPolicy().protected_windows(1000, 100) == []


def test_records_carry_the_span_and_the_window_flag(make_config):
    cfg = make_config(
        "model=tiny_random_llama", "task=passkey", "+policy=h2o", "budget=0.5", "task.lengths=[600]",
        "task.depths=[0.1,0.95]", "task.n_per_cell=1", "task.max_new_tokens=2",
    )  # fmt: skip
    (row,) = run(cfg)
    from kvbench.store import ResultStore

    records = sorted(ResultStore(cfg.results_dir).predictions(row["config_hash"]).values(), key=lambda r: r["id"])
    shallow, deep = records
    assert shallow["meta"]["needle_in_window"] is False and deep["meta"]["needle_in_window"] is True
    for record in records:
        start, end = record["meta"]["needle_span"]
        assert 0 <= start < end <= record["n_prompt_tokens"]
    assert {"needle_in_window=true", "needle_in_window=false"} <= set(row["score_breakdown"])
