"""Passkey retrieval: a random number hidden in repeated filler text, over a grid of lengths and depths.

The prompt puts the instruction before the text and starts the reply with "The secret passkey is": with this
format SmolLM2-135M finds the key with the full cache at 1k-6k tokens (../shared/docs/environment.md), so a
miss under a policy is the policy's doing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.tasks.base import Example, Task

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = "There is a secret passkey hidden in the text below. Find it and remember it.\n\n"
QUESTION = "What is the secret passkey? Reply with the number only."


@dataclass
class PasskeyTask(Task):
    """``n_per_cell`` examples for every (length in tokens, depth as a fraction of the text) cell."""

    name: str = "passkey"
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    n_per_cell: int = 1
    seed: int = 0
    max_new_tokens: int = 8

    def examples(self, data_dir: Path, tokenizer: Any) -> Iterator[Example]:
        rng = random.Random(self.seed)
        filler_tokens = len(tokenizer.encode(FILLER, add_special_tokens=False))
        for length in self.lengths:
            for depth in self.depths:
                for index in range(self.n_per_cell):
                    passkey = str(rng.randint(10000, 99999))
                    needle = f"The passkey is {passkey}. Remember it. {passkey} is the passkey. "
                    overhead = len(tokenizer.encode(INSTRUCTION + needle + "\n\n" + QUESTION, add_special_tokens=False))
                    repeats = max(1, (length - overhead - 32) // filler_tokens)
                    before = round(repeats * depth)
                    text = FILLER * before + needle + FILLER * (repeats - before)
                    yield Example(
                        id=f"passkey-{length}-{depth}-{index}",
                        prompt=f"{INSTRUCTION}{text}\n\n{QUESTION}",
                        answers=[passkey],
                        question=QUESTION,
                        answer_prefix="The secret passkey is",
                        meta={"length": length, "depth": depth},
                    )

    def score(self, prediction: str, example: Example) -> float:
        return float(example.answers[0] in prediction)
