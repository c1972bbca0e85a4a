"""Needle in a haystack over the Paul Graham essays (Kamradt's test): one sentence hidden at a depth.

The haystack is the essays of ``data_dir/haystack/PaulGrahamEssays`` concatenated in file-name order, cut to
the target length in tokens; the needle goes in at the sentence boundary nearest below the depth, as in the
original test. Scoring is deterministic (no LLM judge): the fraction of the needle's key phrases recalled.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.errors import UserError
from kvbench.tasks.base import Example, Task

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
KEY_PHRASES = ("sandwich", "dolores park")
QUESTION = "What is the best thing to do in San Francisco? Answer from the document only."
INSTRUCTION = "Read the document below and answer the question after it.\n\n"


@dataclass
class NeedleTask(Task):
    """One example per (length in tokens, depth as a fraction of the haystack)."""

    name: str = "needle"
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    haystack: str = "haystack/PaulGrahamEssays"
    max_new_tokens: int = 32
    needs_data: bool = True

    def check_data(self, data_dir: Path) -> None:
        folder = Path(data_dir) / self.haystack
        if not folder.is_dir() or not any(folder.glob("*.txt")):
            raise UserError(f"task '{self.name}' needs the essays in {folder} (set data_dir=<path to shared/data>)")

    def examples(self, data_dir: Path, tokenizer: Any) -> Iterator[Example]:
        self.check_data(data_dir)
        essays = "".join(path.read_text() for path in sorted((Path(data_dir) / self.haystack).glob("*.txt")))
        essay_ids = tokenizer.encode(essays[: 8 * max(self.lengths)], add_special_tokens=False)
        overhead = len(tokenizer.encode(INSTRUCTION + NEEDLE + "\n\n" + QUESTION, add_special_tokens=False)) + 32
        for length in self.lengths:
            haystack = tokenizer.decode(essay_ids[: length - overhead])
            for depth in self.depths:
                cut = haystack.rfind(".", 0, int(len(haystack) * depth)) + 1
                text = f"{haystack[:cut]} {NEEDLE}{haystack[cut:]}"
                yield Example(
                    id=f"needle-{length}-{depth}",
                    prompt=f"{INSTRUCTION}{text}\n\n{QUESTION}",
                    answers=[NEEDLE],
                    question=QUESTION,
                    answer_prefix="The best thing to do in San Francisco is",
                    meta={"length": length, "depth": depth},
                )

    def score(self, prediction: str, example: Example) -> float:
        text = prediction.lower()
        return sum(phrase in text for phrase in KEY_PHRASES) / len(KEY_PHRASES)
