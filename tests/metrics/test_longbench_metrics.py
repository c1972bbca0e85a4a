"""LongBench metrics on hand-scored cases and on real records (the official definitions, eval.py's rules)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import jieba
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench.metrics import longbench as lb


def first_record(data_dir: Path, task: str) -> dict:
    with (data_dir / "longbench" / f"{task}.jsonl").open(encoding="utf-8") as lines:
        return json.loads(next(lines))


def test_every_task_has_a_metric_and_a_category():
    assert len(lb.METRICS) == 21
    assert set(lb.CATEGORIES) == set(lb.METRICS)
    assert sorted(set(lb.CATEGORIES.values())) == sorted(
        ["Single-doc QA", "Multi-doc QA", "Summarization", "Few-shot", "Synthetic", "Code"]
    )


def test_qa_f1_ignores_case_articles_and_punctuation():
    assert lb.qa_f1("The Paris.", "Paris") == 1.0
    assert lb.qa_f1("an apple", "Apple!") == 1.0
    # "capital of france" vs "paris france": 1 shared of 3 and 2 tokens -> F1 = 2 * (1/3) * (1/2) / (1/3 + 1/2)
    assert lb.qa_f1("The capital of France", "Paris, France") == pytest.approx(0.4)
    assert lb.qa_f1("London", "Paris") == 0.0
    assert lb.qa_f1("", "Paris") == 0.0


def test_qa_f1_zh_on_a_real_answer_and_a_partial_overlap(data_dir):
    record = first_record(data_dir, "multifieldqa_zh")
    assert record["answers"] == ["厦门大学。"]
    assert lb.score("multifieldqa_zh", record["answers"][0], record["answers"], None) == 1.0
    assert lb.qa_f1_zh("厦门大学", "厦门大学。") == 1.0  # punctuation-only tokens are dropped
    # jieba: [厦门大学, 和, 北京大学] vs [第十八届, 年会, 在, 厦门大学]: 1 shared -> P = 1/3, R = 1/4, F1 = 2/7
    assert list(jieba.cut("厦门大学和北京大学")) == ["厦门大学", "和", "北京大学"]
    assert list(jieba.cut("第十八届年会在厦门大学")) == ["第十八届", "年会", "在", "厦门大学"]
    value = lb.qa_f1_zh("厦门大学和北京大学", "第十八届年会在厦门大学")
    assert Fraction(value).limit_denominator(100) == Fraction(2, 7)


def test_rouge_on_a_real_reference(data_dir):
    record = first_record(data_dir, "multi_news")
    reference = record["answers"][0]
    assert lb.score("multi_news", reference, record["answers"], None) == pytest.approx(1.0, abs=1e-6)
    half = " ".join(reference.split()[: len(reference.split()) // 2])
    assert 0.3 < lb.rouge(half, reference) < 0.9
    assert lb.rouge("", reference) == 0.0  # the rouge package raises on an empty hypothesis


def test_rouge_zh_segments_with_jieba_first():
    # Without spaces a Chinese sentence is one "word" for the rouge package; jieba makes it four.
    assert lb.rouge_zh("会议在厦门大学举办", "会议在厦门大学举办") == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < lb.rouge_zh("会议在北京大学举办", "会议在厦门大学举办") < 1.0


def test_retrieval_zh_on_a_real_answer(data_dir):
    record = first_record(data_dir, "passage_retrieval_zh")
    answers = record["answers"]
    assert answers == ["段落27"]
    assert lb.score("passage_retrieval_zh", "段落27", answers, None) == 1.0
    assert lb.score("passage_retrieval_zh", "段落3", answers, None) == 0.0
    assert lb.score("passage_retrieval_zh", "段落3和段落27", answers, None) == 0.5
    assert lb.score("passage_retrieval_zh", "不知道", answers, None) == 0.0


def test_retrieval_en_and_count_take_the_fraction_of_matching_integers():
    assert lb.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert lb.retrieval("Paragraph 1 or Paragraph 12, maybe 3", "Paragraph 12") == pytest.approx(1 / 3)
    assert lb.retrieval("Paragraph 012", "Paragraph 12") == 0.0  # compared as strings
    assert lb.count("There are 5 unique paragraphs out of 7.", "5") == 0.5
    assert lb.count("five", "5") == 0.0


def test_classification_drops_partial_matches_of_the_ground_truth():
    classes = ["location", "other location", "city"]
    # "location" is inside the ground truth "other location" but not equal to it: dropped.
    assert lb.classification("other location", "other location", classes) == 1.0
    assert lb.classification("city or other location", "other location", classes) == 0.5
    assert lb.classification("city", "other location", classes) == 0.0


def test_classification_keeps_the_official_skip_after_a_dropped_match():
    # eval.py removes from the list it iterates: after dropping "a", "ab" is never examined and stays.
    assert lb.classification("abc", "abc", ["a", "ab", "abc"]) == 0.5


def test_code_sim_scores_the_first_line_without_comment_or_fence():
    prediction = "\n```python\n# the next line\n// also skipped\nx = foo(1)\ny = 2"
    assert lb.code_sim(prediction, "x = foo(1)") == 1.0
    assert lb.code_sim("x = foo(2)\n", "x = foo(1)") == 0.9  # fuzz.ratio 90
    assert lb.code_sim("abcd", "abce") == 0.75


def test_first_line_rule_applies_to_trec_triviaqa_samsum_lsht_only():
    classes = ["location", "other location", "city"]
    assert lb.score("trec", "\nother location\ncity", ["other location"], classes) == 1.0
    assert lb.score("triviaqa", "Paris\nLondon Rome", ["Paris"], None) == 1.0
    assert lb.score("hotpotqa", "Paris\nLondon Rome", ["Paris"], None) == 0.5
    summary = "Amanda will bring cookies."
    assert lb.score("samsum", f"\n{summary}\nDialogue: more text", [summary], None) == pytest.approx(1.0, abs=1e-6)
    assert lb.score("multi_news", f"{summary}\nDialogue: more text", [summary], None) < 0.9


def test_score_is_the_max_over_references():
    assert lb.score("triviaqa", "City of Light", ["Paris", "the city of light"], None) == 1.0
    assert lb.score("passage_count", "3", [], None) == 0.0
    with pytest.raises(ValueError, match="unknown LongBench task"):
        lb.score("qasper_e", "x", ["x"], None)


def test_task_score_and_length_buckets():
    assert lb.task_score([1.0, 0.0, 0.5]) == 50.0
    assert lb.task_score([1 / 3] * 3) == 33.33
    assert math.isnan(lb.task_score([]))
    assert [lb.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]
    buckets = lb.bucket_scores([1.0, 0.0, 1.0], [100, 5000, 9000])
    assert buckets == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    assert math.isnan(lb.bucket_scores([1.0], [10])["8k+"])


def test_category_means_and_macro_average():
    scores = {"longbench/qasper": 20.0, "narrativeqa": 10.0, "longbench_e/trec": 60.0}
    means = lb.category_means(scores)
    assert means == {"Single-doc QA": 15.0, "Few-shot": 60.0}
    assert lb.macro_average(means.values()) == 37.5
    assert lb.macro_average(scores.values()) == 30.0


REFERENCES = {"passage_retrieval_en": "Paragraph 3", "passage_retrieval_zh": "段落3", "passage_count": "3"}
CLASSES = ["location", "other location", "city"]


@settings(max_examples=25, deadline=None)
@given(prediction=st.text(alphabet="ab3 \n#.段落城市location", max_size=40))
def test_every_score_is_in_the_unit_interval(prediction):
    for task in lb.METRICS:
        assert 0.0 <= lb.score(task, prediction, [REFERENCES.get(task, "other location")], CLASSES) <= 1.0
