"""Passkey retrieval: a random number hidden in repeated filler text, over a grid of lengths and depths.

The prompt puts the instruction before the text and starts the reply with "The secret passkey is": with this
format SmolLM2-135M finds the key with the full cache at 1k-6k tokens (../shared/docs/environment.md), so a
miss under a policy is the policy's doing.

Depth is measured over the whole model input (chat template, instruction, question and answer prefix included):
the needle starts about ``depth x length`` tokens in. Each example records the needle text in ``meta`` (the
runner turns it into the needle's token span), and the default grid is 2 lengths x 11 depths x 3 passkeys.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.tasks.base import DEPTHS, Example, Task, template_overhead

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = "There is a secret passkey hidden in the text below. Find it and remember it.\n\n"
QUESTION = "What is the secret passkey? Reply with the number only."
ANSWER_PREFIX = "The secret passkey is"


@dataclass
class PasskeyTask(Task):
    """``n_per_cell`` examples (each its own passkey) for every (length in tokens, depth as a fraction of the
    whole input) cell."""

    name: str = "passkey"
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    depths: list[float] = field(default_factory=lambda: list(DEPTHS))
    n_per_cell: int = 3
    seed: int = 0
    max_new_tokens: int = 8

    def examples(self, data_dir: Path, tokenizer: Any) -> Iterator[Example]:
        rng = random.Random(self.seed)
        one, two = (len(tokenizer.encode(FILLER * k, add_special_tokens=False)) for k in (1, 2))
        filler_tokens = two - one  # a repeat inside the text (the first may tokenize differently)
        head, tail = template_overhead(tokenizer, self.chat, ANSWER_PREFIX)
        head += len(tokenizer.encode(INSTRUCTION, add_special_tokens=False))
        tail += len(tokenizer.encode("\n\n" + QUESTION, add_special_tokens=False))
        for length in self.lengths:
            for depth in self.depths:
                for index in range(self.n_per_cell):
                    passkey = str(rng.randint(10000, 99999))
                    needle = f"The passkey is {passkey}. Remember it. {passkey} is the passkey. "
                    needle_tokens = len(tokenizer.encode(needle, add_special_tokens=False))
                    repeats = max(1, (length - head - tail - needle_tokens - 8) // filler_tokens)
                    before = min(repeats, max(0, round((depth * length - head) / filler_tokens)))
                    text = FILLER * before + needle + FILLER * (repeats - before)
                    yield Example(
                        id=f"passkey-{length}-{depth}-{index}",
                        prompt=f"{INSTRUCTION}{text}\n\n{QUESTION}",
                        answers=[passkey],
                        question=QUESTION,
                        answer_prefix=ANSWER_PREFIX,
                        meta={"length": length, "depth": depth, "needle": needle.strip()},
                    )

    def score(self, prediction: str, example: Example) -> float:
        return float(example.answers[0] in prediction)
