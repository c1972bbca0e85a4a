"""LongBench v1 and LongBench-E (Bai et al. 2023, arXiv:2308.14508) under the official protocol.

A prompt is the official ``dataset2prompt`` template filled with a record, ``max_new_tokens`` the official
``dataset2maxlen`` (both copied in ``longbench_config/``); the chat exclusions, the samsum newline stop and the
metrics follow ``pred.py`` / ``eval.py``. Middle truncation is the runner's (``kvbench.prompting.truncate_middle``).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from kvbench.errors import UserError
from kvbench.hub import hub_file
from kvbench.metrics import longbench as metrics
from kvbench.tasks.base import Example, Task

HUB_DATASET = "THUDM/LongBench"
HUB_FILE = "data.zip"  # the release archive: data/<task>.jsonl and data/<task>_e.jsonl
# The THUDM/LongBench dataset commit whose data.zip the local copies in ../shared/data/longbench match.
REVISION = "5e628be450b7e67fb7ae6e201bd6d8f7056f7672"
CONFIG_DIR = Path(__file__).with_name("longbench_config")
SOURCES = ("auto", "local", "hub")
TASKS = tuple(metrics.METRICS)  # the 21 v1 tasks, in the official order
E_TASKS = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
# pred.py skips the chat template on these ("chat models are better off without build prompts on these tasks").
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# pred.py adds the newline token to the EOS set for samsum only.
STOPS = {"samsum": ["\n"]}


@cache
def _official(name: str) -> dict[str, Any]:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))


def prompt_template(task: str) -> str:
    """The official prompt template of a v1 task (``dataset2prompt.json``)."""
    return _official("dataset2prompt")[task]


def max_gen_tokens(task: str) -> int:
    """The official generation length of a v1 task (``dataset2maxlen.json``)."""
    return _official("dataset2maxlen")[task]


def question_template(task: str) -> str:
    """The template's tail held out of compression under ``query_agnostic``.

    It starts at the line holding the last ``{input}`` (but not before the end of ``{context}``), e.g.
    ``Question: {input}\\nAnswer:``; a template without ``{input}`` gives everything after ``{context}``.
    """
    template = prompt_template(task)
    context_end = template.index("{context}") + len("{context}")
    if "{input}" not in template:
        return template[context_end:]
    at = template.rindex("{input}")
    return template[max(template.rfind("\n", 0, at) + 1, context_end) :]


@dataclass
class LongBenchTask(Task):
    """One LongBench task; ``e`` selects its LongBench-E version, ``source`` where records come from.

    ``source``: ``local`` reads ``<data_dir>/longbench/<subset>[_e].jsonl``; ``hub`` reads the member
    ``data/<subset>[_e].jsonl`` of ``THUDM/LongBench``'s ``data.zip`` at ``revision`` (downloaded once into the hub
    cache); ``auto`` uses the local file when present, else the hub. ``name``, ``revision`` (``REVISION``),
    ``max_new_tokens``, ``chat`` and ``stop`` default (when None) to the official values.
    """

    subset: str = ""
    e: bool = False
    source: str = "auto"
    revision: str | None = REVISION
    name: str = ""
    max_new_tokens: int | None = None
    chat: bool | None = None
    stop: list[str] | None = None
    needs_data: bool = True
    family: str = "longbench"

    def __post_init__(self) -> None:
        if self.subset not in TASKS:
            raise UserError(f"unknown LongBench task '{self.subset}'; valid: {', '.join(TASKS)}")
        if self.e and self.subset not in E_TASKS:
            raise UserError(f"LongBench-E has no '{self.subset}'; valid: {', '.join(E_TASKS)}")
        if self.source not in SOURCES:
            raise UserError(f"unknown LongBench source '{self.source}'; valid: {', '.join(SOURCES)}")
        expected = f"{'longbench_e' if self.e else 'longbench'}/{self.subset}"
        if not self.name:
            self.name = expected
        elif self.name != expected:
            raise UserError(f"task name '{self.name}' does not match subset={self.subset} e={self.e}: use '{expected}'")
        if self.revision is None:
            self.revision = REVISION
        if self.max_new_tokens is None:
            self.max_new_tokens = max_gen_tokens(self.subset)
        if self.chat is None:
            self.chat = self.subset not in NO_CHAT
        self.stop = list(STOPS.get(self.subset, []) if self.stop is None else self.stop)

    @property
    def config_name(self) -> str:
        """The hub config (and local file stem): ``qasper`` or ``qasper_e``."""
        return f"{self.subset}_e" if self.e else self.subset

    def data_path(self, data_dir: Path) -> Path:
        return Path(data_dir) / "longbench" / f"{self.config_name}.jsonl"

    @property
    def member(self) -> str:
        """The task's file inside ``data.zip``."""
        return f"data/{self.config_name}.jsonl"

    @property
    def data_revision(self) -> str | None:
        """The hub revision the records came from (``None`` for a local file); set by ``check_data``."""
        return self.revision if getattr(self, "_zip", None) else None

    def check_data(self, data_dir: Path) -> None:
        """Find the records: the local file (unless ``source=hub``), else the hub's ``data.zip``, downloaded now
        (before any model loads) and checked to hold this task's member."""
        path = self.data_path(data_dir)
        self.__dict__.pop("_zip", None)
        if self.source != "hub" and path.is_file():
            self._zip: Path | None = None
            self._records(data_dir)  # a damaged file is one line now, before any model loads
            return
        if self.source == "local":
            raise UserError(f"task '{self.name}' needs {path} (source=local; source=auto also tries the hub)")
        what = f"task '{self.name}' (no {path})" if self.source == "auto" else f"task '{self.name}'"
        remedy = "run `kvbench download longbench` with network first, or point data_dir at a local copy"
        archive = hub_file(HUB_DATASET, HUB_FILE, repo_type="dataset", revision=self.revision, what=what, remedy=remedy)
        try:
            with zipfile.ZipFile(archive) as members:
                members.getinfo(self.member)
        except (KeyError, zipfile.BadZipFile) as error:
            raise UserError(
                f"task '{self.name}': {HUB_DATASET} {HUB_FILE} at {self.revision[:12]} has no {self.member} "
                f"({type(error).__name__}); pin another task.revision or put the file at {path}"
            ) from error
        self._zip = archive
        self._records(data_dir)

    def _records(self, data_dir: Path) -> list[dict[str, Any]]:
        if not hasattr(self, "_zip"):
            self.check_data(data_dir)
        if self._zip is None:
            source = str(self.data_path(data_dir))
            lines = self.data_path(data_dir).read_bytes().splitlines()
        else:
            source = f"{self._zip}:{self.member}"
            with zipfile.ZipFile(self._zip) as members:
                lines = members.read(self.member).splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(
                    f"task '{self.name}': {source}:{number} is not a JSON record ({error.msg}; a cut or damaged "
                    "file?); restore it, e.g. with `kvbench download longbench`"
                ) from error
        if not records:
            raise UserError(f"task '{self.name}': {source} holds no records; restore it (`kvbench download longbench`)")
        return records

    def example_ids(self, data_dir: Path) -> list[str]:
        return [record["_id"] for record in self._records(data_dir)]

    def examples(self, data_dir: Path, tokenizer: Any) -> Iterator[Example]:
        """The records in file order, each as its official prompt (``template.format(**record)``)."""
        template, question = prompt_template(self.subset), question_template(self.subset)
        for record in self._records(data_dir):
            yield Example(
                id=record["_id"],
                prompt=template.format(**record),
                answers=list(record["answers"]),
                question=question.format(**record),
                meta={
                    "length": record["length"],
                    "all_classes": record["all_classes"],
                    "language": record["language"],
                    "dataset": record["dataset"],
                },
            )

    def score(self, prediction: str, example: Example) -> float:
        return metrics.score(self.subset, prediction, example.answers, example.meta.get("all_classes"))

    def aggregate(self, scores: list[float]) -> float:
        """``round(100 * mean, 2)``, as eval.py reports a task."""
        return metrics.task_score(scores)

    def breakdown(self, scores: list[float], metas: list[dict[str, Any]]) -> dict[str, float]:
        """LongBench-E: the task score per length bucket (0-4k, 4-8k, 8k+ by the ``length`` field); v1: none."""
        return metrics.bucket_scores(scores, [meta["length"] for meta in metas]) if self.e else {}


@dataclass
class LongBenchSuite(Task):
    """Several LongBench tasks run as one config (``task=longbench``): one results row per subset."""

    name: str = "longbench"
    family: str = "longbench"
    subsets: list[str] = field(default_factory=lambda: list(TASKS))
    e: bool = False
    source: str = "auto"
    revision: str = REVISION
    needs_data: bool = True

    def subtasks(self) -> list[Task]:
        return [
            LongBenchTask(subset=s, e=self.e, source=self.source, revision=self.revision, version=self.version)
            for s in self.subsets
        ]
