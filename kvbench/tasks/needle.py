"""Needle in a haystack over the Paul Graham essays (Kamradt's test): one sentence hidden at a depth.

The haystack is the essays of ``data_dir/haystack/PaulGrahamEssays`` concatenated in file-name order, cut to
the target length in tokens; the needle goes in at the sentence boundary nearest below the depth, as in the
original test. Scoring is deterministic (no LLM judge): the fraction of the needle's key phrases recalled.

Depth is measured over the whole model input (chat template, instruction, question and answer prefix included).
Each cell holds ``n_per_cell`` examples, each with its own needle (``NEEDLES``, Kamradt's first); ``meta``
records the needle text, which the runner turns into its token span.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.errors import UserError
from kvbench.tasks.base import DEPTHS, Example, Task, template_overhead

# (needle, question, answer prefix, key phrases)
NEEDLES = (
    (
        "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
        "What is the best thing to do in San Francisco? Answer from the document only.",
        "The best thing to do in San Francisco is",
        ("sandwich", "dolores park"),
    ),
    (
        "The secret ingredient of the village bakery's famous bread is smoked paprika from Hungary.",
        "What is the secret ingredient of the village bakery's famous bread? Answer from the document only.",
        "The secret ingredient of the village bakery's famous bread is",
        ("paprika", "hungary"),
    ),
    (
        "The lighthouse keeper's favourite pastime is carving wooden owls while listening to jazz.",
        "What is the lighthouse keeper's favourite pastime? Answer from the document only.",
        "The lighthouse keeper's favourite pastime is",
        ("owls", "jazz"),
    ),
)
INSTRUCTION = "Read the document below and answer the question after it.\n\n"


@dataclass
class NeedleTask(Task):
    """``n_per_cell`` examples, each with its own needle, per (length in tokens, depth as a fraction of the
    whole input)."""

    name: str = "needle"
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    depths: list[float] = field(default_factory=lambda: list(DEPTHS))
    n_per_cell: int = 3
    haystack: str = "haystack/PaulGrahamEssays"
    max_new_tokens: int = 32
    needs_data: bool = True

    def check_data(self, data_dir: Path) -> None:
        folder = Path(data_dir) / self.haystack
        if not folder.is_dir() or not any(folder.glob("*.txt")):
            raise UserError(f"task '{self.name}' needs the essays in {folder} (set data_dir=<path to shared/data>)")

    def examples(self, data_dir: Path, tokenizer: Any) -> Iterator[Example]:
        self.check_data(data_dir)
        if not 1 <= self.n_per_cell <= len(NEEDLES):
            raise UserError(f"task '{self.name}': n_per_cell must be between 1 and {len(NEEDLES)} (one per needle)")
        essays = "".join(path.read_text() for path in sorted((Path(data_dir) / self.haystack).glob("*.txt")))
        essay_ids = tokenizer.encode(essays[: 8 * max(self.lengths)], add_special_tokens=False)
        for length in self.lengths:
            for depth in self.depths:
                for index, (needle, question, prefix, _) in enumerate(NEEDLES[: self.n_per_cell]):
                    head, tail = template_overhead(tokenizer, self.chat, prefix)
                    head += len(tokenizer.encode(INSTRUCTION, add_special_tokens=False))
                    tail += len(tokenizer.encode(f"\n\n{question}", add_special_tokens=False))
                    size = length - head - tail - len(tokenizer.encode(needle, add_special_tokens=False)) - 8
                    before = min(size, max(0, round(depth * length - head)))
                    haystack = tokenizer.decode(essay_ids[:size])
                    target = len(tokenizer.decode(essay_ids[:before]))
                    cut = haystack.rfind(".", 0, target) + 1
                    text = f"{haystack[:cut]} {needle}{haystack[cut:]}"
                    yield Example(
                        id=f"needle-{length}-{depth}-{index}",
                        prompt=f"{INSTRUCTION}{text}\n\n{question}",
                        answers=[needle],
                        question=question,
                        answer_prefix=prefix,
                        meta={"length": length, "depth": depth, "needle": needle},
                    )

    def score(self, prediction: str, example: Example) -> float:
        text = prediction.lower()
        phrases = next((n[3] for n in NEEDLES if n[0] == example.answers[0]), NEEDLES[0][3])
        return sum(phrase in text for phrase in phrases) / len(phrases)
