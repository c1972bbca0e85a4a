"""The task interface: a task turns data into ``Example``s and scores one prediction.

A task is a dataclass instantiated from ``kvbench/configs/task/<name>.yaml`` (``_target_`` + choices). The runner
builds the model input from an example: the user message ``prompt`` (middle-truncated to the model's max prompt
length, then wrapped in the chat template when ``chat`` is true), followed by ``answer_prefix`` as the start of
the reply. Under the ``query_agnostic`` protocol the trailing ``question`` (a suffix of ``prompt``) and
everything after it are appended after compression; under ``official`` the policy sees the whole prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.errors import UserError


@dataclass
class Example:
    """One prompt and its references."""

    id: str
    prompt: str  # the user message: context and question together
    answers: list[str]
    question: str = ""  # suffix of ``prompt`` held out of compression under query_agnostic
    answer_prefix: str = ""  # start of the assistant's reply, e.g. "The secret passkey is"
    meta: dict[str, Any] = field(default_factory=dict)  # length, depth, all_classes, language, ...


# The synthetic tasks' default depth grid: 11 depths from 0.05 to 0.95, measured over the whole model input.
DEPTHS = [round(0.05 + 0.09 * i, 2) for i in range(11)]


def template_overhead(tokenizer: Any, chat: bool, answer_prefix: str) -> tuple[int, int]:
    """Tokens the model input adds before and after the user message: the chat template's prefix, and its
    suffix plus the answer prefix (without a template: the BOS token, if any, and the answer prefix)."""
    if chat and getattr(tokenizer, "chat_template", None):
        marker = "@@kvbench-message@@"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        before, _, after = text.partition(marker)
        return len(tokenizer.encode(before, add_special_tokens=False)), len(
            tokenizer.encode(after + answer_prefix, add_special_tokens=False)
        )
    bos = len(tokenizer.encode("", add_special_tokens=True))
    return bos, len(tokenizer.encode(answer_prefix, add_special_tokens=False))


@dataclass
class Task:
    """Base class. Subclasses set the fields' defaults in their YAML and implement ``examples``/``score``."""

    name: str = "task"
    max_new_tokens: int = 32
    chat: bool = True  # apply the model's chat template
    stop: list[str] = field(default_factory=list)  # stop strings (besides the model's EOS)
    needs_data: bool = False  # whether ``examples`` reads from the data dir
    version: str = "1"
    family: str = ""

    def subtasks(self) -> list[Task]:
        """The tasks a config stands for: itself, or each member of a suite (one results row each)."""
        return [self]

    def examples(self, data_dir: Path, tokenizer: Any) -> Iterator[Example]:
        """Yield the task's examples in a fixed order (seeded where random)."""
        raise NotImplementedError

    def example_ids(self, data_dir: Path) -> list[str] | None:
        """The ids of ``examples`` when they are known without the tokenizer (read from data), else None:
        ``ids=[...]`` is then checked before the model loads."""
        return None

    def score(self, prediction: str, example: Example) -> float:
        """Score of one prediction in [0, 1]."""
        raise NotImplementedError

    def aggregate(self, scores: list[float]) -> float:
        """Task score from per-example scores: 100 x mean, as LongBench and RULER report."""
        return 100.0 * sum(scores) / len(scores) if scores else float("nan")

    def breakdown(self, scores: list[float], metas: list[dict[str, Any]]) -> dict[str, float]:
        """Scores of slices of the task, written beside the task score in its row. The default: by target
        length (and depth) when the examples record them, as the synthetic tasks' grids do, and by whether the
        needle lay inside a window the policy protects (``needle_in_window=true|false``)."""
        cells: dict[str, list[float]] = {}
        for score, meta in zip(scores, metas, strict=True):
            if "length" in meta:
                key = f"length={meta['length']}" + (f",depth={meta['depth']}" if "depth" in meta else "")
                cells.setdefault(key, []).append(score)
            if "needle_in_window" in meta:  # needles a policy keeps by position (sinks, recent window) vs the rest
                cells.setdefault(f"needle_in_window={str(meta['needle_in_window']).lower()}", []).append(score)
        return {key: self.aggregate(values) for key, values in cells.items()}

    def check_data(self, data_dir: Path) -> None:
        """Raise a one-line UserError when the data this task needs is missing."""
        if self.needs_data and not Path(data_dir).is_dir():
            raise UserError(f"task '{self.name}' needs data_dir, and {data_dir} does not exist (set data_dir=<path>)")

    def stopped(self, text: str) -> bool:
        """Whether generation should stop: a stop string after the leading newlines (LongBench's samsum stops at
        a newline token but only after one new token, so a reply that opens with newlines goes on)."""
        body = text.lstrip("\n")
        return any(stop in body for stop in self.stop)

    def postprocess(self, prediction: str) -> str:
        """Cut the raw decoded text at the first stop string after its leading newlines."""
        body = prediction.lstrip("\n")
        cuts = [body.index(stop) for stop in self.stop if stop in body]
        return prediction[: len(prediction) - len(body) + min(cuts)] if cuts else prediction


def check_ids(task: str, ids: list[Any], known: list[str]) -> set[str]:
    """The requested ``ids`` as strings; a one-line ``UserError`` naming some valid ids when one is unknown."""
    wanted = {str(i) for i in ids}
    missing = sorted(wanted - set(known))
    if missing:
        shown = ", ".join(known[:5]) + (f", ... ({len(known)} in all)" if len(known) > 5 else "")
        raise UserError(f"task '{task}' has no example with id {', '.join(missing)}; valid ids: {shown}")
    return wanted


def select(task: str, examples: list[Example], ids: list[Any] | None, limit: int | None) -> list[Example]:
    """The examples a run evaluates: those of ``ids`` (in the task's order) when given, then the first ``limit``."""
    if ids is not None:
        wanted = check_ids(task, ids, [example.id for example in examples])
        examples = [example for example in examples if example.id in wanted]
    return examples if limit is None else examples[: int(limit)]
