"""LongBench v1 metrics, reimplemented from the definitions of the official scorer (THUDM/LongBench ``metrics.py``
and ``eval.py``), with the same libraries: jieba, rouge 1.0.1 and fuzzywuzzy.

Every metric takes one prediction and one ground truth and returns a value in [0, 1]; ``score`` applies the
official per-task rules (first-line cut, max over references) and ``task_score`` the official rounding.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

# The official Chinese punctuation set (normalize_zh_answer), ASCII punctuation added on top. It has "》" but not "《".
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
    + "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")

# Tasks whose prediction is cut to its first line before scoring (eval.py).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def _jieba_cut(text: str) -> list[str]:
    import jieba  # builds its prefix dictionary on first use; kept out of import time

    return list(jieba.cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """English normalization: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalization: lowercase, drop CJK and ASCII punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def f1_score(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Token-level F1 over multisets (``Counter`` intersection); 0 when nothing is shared."""
    same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """F1 over whitespace tokens of the normalized English strings."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """F1 over jieba tokens, each normalized (punctuation and spaces removed), empty tokens dropped."""

    def tokens(text: str) -> list[str]:
        return [tok for tok in map(normalize_zh_answer, _jieba_cut(text)) if tok]

    return f1_score(tokens(prediction), tokens(ground_truth))


def rouge(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """ROUGE-L F of the ``rouge`` package (``get_scores(..., avg=True)``); 0 when it raises (e.g. empty text)."""
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
    except Exception:  # the official scorer maps every failure (empty hypothesis, recursion depth) to 0
        return 0.0


def rouge_zh(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """ROUGE-L F after joining jieba tokens with spaces."""
    return rouge(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """1/len(matches) if the ground truth is among the class names found as substrings of the prediction, else 0.

    Matches that are substrings of the ground truth but not equal to it are dropped. The official scorer does this
    while iterating over the same list, so the match right after a dropped one is never examined; kept here.
    """
    matches = [name for name in all_classes or [] if name in prediction]
    i = 0
    while i < len(matches):
        name = matches[i]
        if name in ground_truth and name != ground_truth:
            matches.remove(name)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """Fraction of the integers in the prediction equal to the ground truth; 0 when there are none."""
    return _fraction_equal(prediction, str(ground_truth))


def _retrieval(pattern: str, prediction: str, ground_truth: str) -> float:
    found = re.search(pattern, ground_truth)
    if found is None:
        raise ValueError(f"ground truth {ground_truth!r} has no paragraph id (pattern {pattern!r})")
    return _fraction_equal(prediction, found.group(1))


def retrieval(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """Fraction of the integers in the prediction equal to N of the ground truth ``Paragraph N``."""
    return _retrieval(r"Paragraph (\d+)", prediction, ground_truth)


def retrieval_zh(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """Fraction of the integers in the prediction equal to N of the ground truth ``段落N``."""
    return _retrieval(r"段落(\d+)", prediction, ground_truth)


def code_sim(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """``fuzz.ratio / 100`` between the ground truth and the first prediction line (after ``lstrip('\\n')``)
    containing none of a backtick, ``#`` or ``//`` (empty when no line qualifies)."""
    with warnings.catch_warnings():
        # Without python-Levenshtein (not in the official requirements) fuzzywuzzy warns once and uses difflib.
        warnings.filterwarnings("ignore", message="Using slow pure-python SequenceMatcher")
        from fuzzywuzzy import fuzz

    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz.ratio(line, ground_truth) / 100


Metric = Callable[[str, str, Sequence[str] | None], float]

# dataset -> metric, as in eval.py's dataset2metric.
METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1,
    "qasper": qa_f1,
    "multifieldqa_en": qa_f1,
    "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1,
    "2wikimqa": qa_f1,
    "musique": qa_f1,
    "dureader": rouge_zh,
    "gov_report": rouge,
    "qmsum": rouge,
    "multi_news": rouge,
    "vcsum": rouge_zh,
    "trec": classification,
    "triviaqa": qa_f1,
    "samsum": rouge,
    "lsht": classification,
    "passage_count": count,
    "passage_retrieval_en": retrieval,
    "passage_retrieval_zh": retrieval_zh,
    "lcc": code_sim,
    "repobench-p": code_sim,
}

# dataset -> category, as grouped in the LongBench paper and README.
CATEGORIES: dict[str, str] = {
    **dict.fromkeys(["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"], "Single-doc QA"),
    **dict.fromkeys(["hotpotqa", "2wikimqa", "musique", "dureader"], "Multi-doc QA"),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "vcsum"], "Summarization"),
    **dict.fromkeys(["trec", "triviaqa", "samsum", "lsht"], "Few-shot"),
    **dict.fromkeys(["passage_count", "passage_retrieval_en", "passage_retrieval_zh"], "Synthetic"),
    **dict.fromkeys(["lcc", "repobench-p"], "Code"),
}


def score(task: str, prediction: str, answers: list[str], all_classes: list[str] | None) -> float:
    """Score of one prediction in [0, 1]: the first-line cut for trec/triviaqa/samsum/lsht, then the max of the
    task's metric over the references (starting from 0, as eval.py does)."""
    if task not in METRICS:
        raise ValueError(f"unknown LongBench task {task!r}")
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[task]
    return max([0.0, *(metric(prediction, answer, all_classes) for answer in answers)])


def task_score(per_example: Sequence[float]) -> float:
    """Task score as eval.py reports it: ``round(100 * mean, 2)``; NaN for no examples."""
    return round(100 * sum(per_example) / len(per_example), 2) if per_example else math.nan


def length_bucket(length: int) -> str:
    """LongBench-E bucket of a record's ``length`` field (words, or characters for Chinese)."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def bucket_scores(per_example: Sequence[float], lengths: Sequence[int]) -> dict[str, float]:
    """LongBench-E task score per length bucket (``scorer_e``): ``task_score`` of each bucket, NaN when empty."""
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for value, length in zip(per_example, lengths, strict=True):
        buckets[length_bucket(length)].append(value)
    return {name: task_score(values) for name, values in buckets.items()}


def macro_average(scores: Iterable[float]) -> float:
    """Unweighted mean of task (or category) scores, rounded to 2 decimals; NaN for none."""
    values = list(scores)
    return round(sum(values) / len(values), 2) if values else math.nan


def category_means(task_scores: dict[str, float]) -> dict[str, float]:
    """Mean task score per category; keys are task names, bare or prefixed (``longbench_e/qasper``). Pass one
    language's tasks for the README's tables, whose "Avg" is ``macro_average`` of these means."""
    grouped: dict[str, list[float]] = {}
    for task, value in task_scores.items():
        grouped.setdefault(CATEGORIES[task.rsplit("/", 1)[-1]], []).append(value)
    return {category: macro_average(values) for category, values in grouped.items()}
