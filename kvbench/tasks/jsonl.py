"""A task from your own jsonl file: ``task=jsonl task.path=<file> task.metric=<name>``.

Each line is a JSON object with ``context``, ``question`` and ``answers`` (a list of reference strings), and
optionally ``id`` (default: the line number) and ``answer_prefix`` (the start of the reply). The user message
is ``template`` filled with the record (default: the context, a blank line, the question); under
``protocol=query_agnostic`` the question, which must end the message, is held out of compression. Each
prediction gets the best ``metric`` over the references (one of kvbench's metrics, see ``METRICS``); the task
score is 100 x their mean. The file's SHA-256 is part of the configuration hash: an edited file is a new run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.errors import UserError
from kvbench.metrics import longbench
from kvbench.tasks import ruler
from kvbench.tasks.base import Example, Task


def _best_of(metric: Callable[..., float]) -> Callable[[str, Sequence[str]], float]:
    """A per-reference metric as a score over all references: the best one (LongBench's rule)."""
    return lambda prediction, answers: max([0.0, *(metric(prediction, answer) for answer in answers)])


# Metric name -> score of one prediction against the list of references, in [0, 1].
METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "qa_f1": _best_of(longbench.qa_f1),
    "qa_f1_zh": _best_of(longbench.qa_f1_zh),
    "rouge": _best_of(longbench.rouge),
    "rouge_zh": _best_of(longbench.rouge_zh),
    "code_sim": _best_of(longbench.code_sim),
    "count": _best_of(longbench.count),
    "string_match_all": ruler.string_match_all,
    "string_match_part": ruler.string_match_part,
}
REQUIRED = {"context": str, "question": str}
OPTIONAL = {"answer_prefix": str, "id": (str, int)}


@dataclass
class JsonlTask(Task):
    """Your examples from ``path`` (a jsonl file), scored by ``metric``; ``template`` builds the user message."""

    path: str = ""
    metric: str = "qa_f1"
    template: str = "{context}\n\n{question}"
    name: str = "jsonl"
    family: str = "jsonl"
    max_new_tokens: int = 64
    sha256: str = field(default="", init=False)  # of the file: set on load, hashed with the configuration

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"unknown task.metric '{self.metric}'; valid: {', '.join(METRICS)}")
        if not self.path:
            raise UserError("task=jsonl needs task.path=<file.jsonl> (rows with context, question, answers)")
        if not self.template.rstrip().endswith("{question}"):
            raise UserError(f"task.template must end with {{question}}, got {self.template!r}")
        self._records = self._load()

    @property
    def data_revision(self) -> str:
        """The file's SHA-256 (first 16 hex digits), recorded in every row."""
        return self.sha256[:16]

    def _load(self) -> list[dict[str, Any]]:
        """The file's records, each checked; a bad line is one ``UserError`` naming ``file:line``."""
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise UserError(f"task '{self.name}': task.path {path} is not a file")
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        records, seen = [], set()
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            where = f"task '{self.name}': {path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where} is not a JSON object ({error.msg})") from None
            _check(record, where)
            record["id"] = str(record.get("id", number))
            if record["id"] in seen:
                raise UserError(f"{where}: id '{record['id']}' appears twice; ids must be unique")
            seen.add(record["id"])
            records.append(record)
        if not records:
            raise UserError(f"task '{self.name}': {path} holds no records")
        return records

    def example_ids(self, data_dir: Path) -> list[str]:
        return [record["id"] for record in self._records]

    def examples(self, data_dir: Path, tokenizer: Any) -> Iterator[Example]:
        """The records in file order."""
        for record in self._records:
            yield Example(
                id=record["id"],
                prompt=self.template.format(**record),
                answers=list(record["answers"]),
                question=record["question"],
                answer_prefix=record.get("answer_prefix", ""),
            )

    def score(self, prediction: str, example: Example) -> float:
        return METRICS[self.metric](prediction, example.answers)


def _check(record: Any, where: str) -> None:
    """A record has a string context and question, a non-empty list of string answers, optional fields typed."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object")
    for key, kind in REQUIRED.items():
        if not isinstance(record.get(key), kind):
            raise UserError(f"{where}: '{key}' must be a string, got {record.get(key)!r}")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(answer, str) for answer in answers):
        raise UserError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
    for key, kind in OPTIONAL.items():
        if key in record and (not isinstance(record[key], kind) or isinstance(record[key], bool)):
            raise UserError(f"{where}: '{key}' must be a string, got {record[key]!r}")
