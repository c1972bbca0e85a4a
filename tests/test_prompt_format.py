"""Model-side prompt settings (issue 15): LongBench's Llama-2-chat format, and the derived prompt length."""

from __future__ import annotations

import json

import pytest

from kvbench import runner
from kvbench.batching import encode, render
from kvbench.errors import UserError
from kvbench.models import model_spec
from kvbench.tasks.longbench import LongBenchTask

TINY = ["model=tiny_random_llama", "progress=false", "limit=1", "task.max_new_tokens=4"]


def test_llama2_inst_is_longbench_pred_format(tiny, data_dir):
    # LongBench's pred.py for llama2: prompt = f"[INST]{prompt}[/INST]", tokenized with the special tokens (BOS).
    task = LongBenchTask(subset="multi_news")
    example = next(iter(task.examples(data_dir, tiny[1])))
    text, special = render(example, tiny[1], True, 100_000, "llama2_inst")
    assert text == f"[INST]{example.prompt}[/INST]" + example.answer_prefix
    assert special is True
    ids, held_out = encode(example, tiny[1], True, 100_000, "official", "llama2_inst")
    assert ids == tiny[1](text, add_special_tokens=True)["input_ids"] and held_out == []
    template, _ = render(example, tiny[1], True, 100_000, "template")
    assert "[INST]" not in template  # the default stays the tokenizer's own chat template
    assert model_spec("llama2_7b_chat").chat_format == "llama2_inst"  # the official preset uses it


def test_llama2_inst_reaches_the_model_input(make_config, tmp_path, tiny, data_dir):
    example = next(iter(LongBenchTask(subset="multi_news").examples(data_dir, tiny[1])))
    counts = {}
    for fmt in ("llama2_inst", "template"):
        out = tmp_path / fmt
        (row,) = runner.run(
            make_config(*TINY, "task=longbench/multi_news", f"model.chat_format={fmt}", f"results_dir={out}")
        )
        (record,) = [json.loads(line) for line in (out / "predictions" / f"{row['config_hash']}.jsonl").open()]
        counts[fmt] = record["n_prompt_tokens"]
        assert counts[fmt] == len(encode(example, tiny[1], True, row["max_prompt_tokens"], "official", fmt)[0])
    assert counts["llama2_inst"] != counts["template"]


def test_unset_max_prompt_tokens_is_the_context_minus_the_generation_length(make_config):
    # tiny_random_llama: max_position_embeddings 8192; passkey generates 4 tokens here.
    (row,) = runner.run(make_config(*TINY, "model.max_prompt_tokens=null"))
    assert row["max_prompt_tokens"] == 8192 - 4


def test_unset_max_prompt_tokens_still_refuses_a_task_that_would_be_truncated(make_config, tmp_path):
    with pytest.raises(UserError, match="would be truncated: length 9000 is over model .* max_prompt_tokens=8188"):
        runner.plan(make_config(*TINY, "model.max_prompt_tokens=null", "task.lengths=[9000]"))


def test_unknown_chat_format_is_one_line_naming_the_choices(make_config):
    with pytest.raises(UserError, match="unknown model.chat_format 'chatml'; valid: template, llama2_inst"):
        runner.plan(make_config(*TINY, "model.chat_format=chatml"))
