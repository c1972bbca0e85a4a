"""LongBench tasks: official prompts on the real files, middle truncation, configs, and the hub loading path."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from kvbench.config import CONFIG_DIR
from kvbench.errors import UserError
from kvbench.models import converted_dir, model_spec
from kvbench.prompting import truncate_middle
from kvbench.tasks import longbench
from kvbench.tasks.longbench import LongBenchSuite, LongBenchTask

LOCAL_TASKS = ["multi_news", "multifieldqa_zh", "passage_retrieval_zh"]


def read_records(data_dir: Path, task: str) -> list[dict]:
    with (data_dir / "longbench" / f"{task}.jsonl").open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def official_prompts(data_dir) -> dict[str, str]:
    return json.loads((data_dir / "longbench" / "dataset2prompt.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(converted_dir(model_spec("smollm2_135m")))


def test_packaged_config_is_the_official_copy(data_dir):
    for name in ("dataset2prompt.json", "dataset2maxlen.json"):
        assert (longbench.CONFIG_DIR / name).read_bytes() == (data_dir / "longbench" / name).read_bytes()


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_prompts_are_the_official_template_filled_with_the_record(task, data_dir, official_prompts):
    records = read_records(data_dir, task)
    examples = list(LongBenchTask(subset=task, source="local").examples(data_dir, tokenizer=None))
    assert len(examples) == len(records) == 200
    for record, example in zip(records, examples, strict=True):
        assert example.prompt == official_prompts[task].format(**record)
        assert example.id == record["_id"]
        assert example.answers == record["answers"]
        assert example.answer_prefix == ""
        assert example.meta == {
            "length": record["length"],
            "all_classes": record["all_classes"],
            "language": record["language"],
            "dataset": task,
        }
        assert example.question and example.prompt.endswith(example.question)


def test_question_is_the_trailing_question_segment(data_dir):
    zh = next(LongBenchTask(subset="multifieldqa_zh").examples(data_dir, None))
    assert zh.question == f"问题：{read_records(data_dir, 'multifieldqa_zh')[0]['input']}\n回答："
    retrieval = next(LongBenchTask(subset="passage_retrieval_zh").examples(data_dir, None))
    assert retrieval.question.startswith(read_records(data_dir, "passage_retrieval_zh")[0]["input"])
    assert retrieval.question.endswith("答案是：")
    news = next(LongBenchTask(subset="multi_news").examples(data_dir, None))
    assert news.question == "\n\nNow, write a one-page summary of all the news.\n\nSummary:"


def test_every_template_splits_into_context_and_question():
    record = {"context": "<CONTEXT>", "input": "<INPUT>"}
    for task in longbench.TASKS:
        prompt = longbench.prompt_template(task).format(**record)
        question = longbench.question_template(task).format(**record)
        assert prompt.endswith(question) and "<CONTEXT>" not in question
        assert ("<INPUT>" in question) == ("{input}" in longbench.prompt_template(task))
    assert longbench.question_template("hotpotqa") == "Question: {input}\nAnswer:"
    assert longbench.question_template("trec") == "{input}"
    assert longbench.question_template("repobench-p") == "{input}Next line of code:\n"
    assert longbench.question_template("lcc") == "Next line of code:\n"


def test_official_generation_settings():
    chatless = {t for t in longbench.TASKS if not LongBenchTask(subset=t).chat}
    assert chatless == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert LongBenchTask(subset="samsum").stop == ["\n"]
    assert all(LongBenchTask(subset=t).stop == [] for t in longbench.TASKS if t != "samsum")
    assert LongBenchTask(subset="gov_report").max_new_tokens == 512
    assert LongBenchTask(subset="hotpotqa").max_new_tokens == 32
    assert LongBenchTask(subset="qasper", e=True).name == "longbench_e/qasper"


def test_scores_through_the_task(data_dir):
    task = LongBenchTask(subset="passage_retrieval_zh")
    examples = list(islice(task.examples(data_dir, None), 3))
    scores = [task.score(example.answers[0], example) for example in examples]
    assert scores == [1.0, 1.0, 1.0]
    assert task.score("段落3和段落27", examples[0]) == 0.5
    assert task.aggregate([1.0, 0.0, 0.0]) == 33.33


def test_truncate_middle_keeps_the_first_and_last_halves(data_dir, tokenizer):
    prompt = next(LongBenchTask(subset="multi_news").examples(data_dir, None)).prompt
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2000
    for budget in (1000, 1001):
        cut = truncate_middle(prompt, tokenizer, budget)
        head = tokenizer.decode(ids[:500], skip_special_tokens=True)
        tail = tokenizer.decode(ids[-500:], skip_special_tokens=True)
        assert cut == head + tail
        assert cut.startswith("You are given several news passages.") and cut.endswith("Summary:")
    assert truncate_middle(prompt, tokenizer, len(ids)) == prompt


def test_invalid_choices_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown LongBench task 'nq'"):
        LongBenchTask(subset="nq")
    with pytest.raises(UserError, match="LongBench-E has no 'narrativeqa'"):
        LongBenchTask(subset="narrativeqa", e=True)
    with pytest.raises(UserError, match="unknown LongBench source"):
        LongBenchTask(subset="trec", source="s3")
    with pytest.raises(UserError, match="use 'longbench_e/qasper'"):
        LongBenchTask(subset="qasper", e=True, name="longbench/qasper")


def test_local_source_needs_the_file(tmp_path):
    task = LongBenchTask(subset="trec", source="local")
    with pytest.raises(UserError, match=r"needs .*longbench/trec\.jsonl"):
        task.check_data(tmp_path)
    with pytest.raises(UserError, match=r"needs .*longbench/trec\.jsonl"):
        list(task.examples(tmp_path, None))


def load_config(path: Path):
    return instantiate(OmegaConf.load(path))


def test_every_longbench_config_instantiates_to_the_official_settings():
    files = sorted((CONFIG_DIR / "task" / "longbench").glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(longbench.TASKS)
    for path in files:
        task = load_config(path)
        assert task == LongBenchTask(subset=path.stem), path.name
        assert task.subtasks() == [task]


@pytest.mark.parametrize(
    ("config", "count", "prefix"),
    [("longbench", 21, "longbench/"), ("longbench_en", 16, "longbench/"), ("longbench_e", 13, "longbench_e/")],
)
def test_suites_expand_to_one_task_per_subset(config, count, prefix):
    suite = load_config(CONFIG_DIR / "task" / f"{config}.yaml")
    assert isinstance(suite, LongBenchSuite)
    tasks = suite.subtasks()
    assert len(tasks) == len({t.name for t in tasks}) == count
    assert all(isinstance(t, LongBenchTask) and t.name.startswith(prefix) for t in tasks)
    if config == "longbench_en":
        chinese = {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
        assert {t.subset for t in tasks} == set(longbench.TASKS) - chinese


def test_longbench_e_rows_carry_the_length_buckets():
    task = LongBenchTask(subset="multi_news", e=True, name="longbench_e/multi_news")
    metas = [{"length": 1200}, {"length": 3999}, {"length": 5000}, {"length": 9000}]
    buckets = task.breakdown([1.0, 0.0, 0.5, 1.0], metas)
    assert buckets == {"0-4k": 50.0, "4-8k": 50.0, "8k+": 100.0}
    assert LongBenchTask(subset="multi_news").breakdown([1.0], [{"length": 10}]) == {}
