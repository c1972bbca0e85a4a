"""From examples to a left-padded ``Batch``: truncation, chat template, answer prefix, protocol split."""

from __future__ import annotations

from typing import Any

import torch

from kvbench.errors import UserError
from kvbench.generate import Batch
from kvbench.prompting import truncate_middle
from kvbench.tasks.base import Example

PROTOCOLS = ("official", "query_agnostic")


def encode(example: Example, tokenizer: Any, chat: bool, max_prompt_tokens: int, protocol: str) -> list[list[int]]:
    """Token ids of one model input as [compressed part, held-out part].

    ``official``: the whole input is compressed (the held-out part is empty). ``query_agnostic``: the question
    and everything after it (chat suffix, answer prefix) are held out and appended after compression.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{protocol}'; valid: {', '.join(PROTOCOLS)}")
    prompt = truncate_middle(example.prompt, tokenizer, max_prompt_tokens)
    if chat:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text += example.answer_prefix
        special = False
    else:
        text = prompt + example.answer_prefix
        special = True
    if protocol == "official":
        return [tokenizer.encode(text, add_special_tokens=special), []]
    split = text.rfind(example.question) if example.question else -1
    if split <= 0:
        raise UserError(
            f"protocol=query_agnostic: example {example.id} has no question to hold out"
            if not example.question
            else f"protocol=query_agnostic: the question of example {example.id} is not in its prompt verbatim"
            " (truncated away?); use protocol=official"
        )
    head = tokenizer.encode(text[:split], add_special_tokens=special)
    return [head, tokenizer.encode(text[split:], add_special_tokens=False)]


def collate(encoded: list[list[list[int]]], pad_id: int, device: torch.device | str) -> Batch:
    """Left-pad each part separately: [pad | compressed | pad | held-out]; ``split`` is the first held-out column."""
    widths = [max(len(parts[i]) for parts in encoded) for i in range(2)]
    rows, masks = [], []
    for parts in encoded:
        row, mask = [], []
        for part, width in zip(parts, widths, strict=True):
            row += [pad_id] * (width - len(part)) + part
            mask += [0] * (width - len(part)) + [1] * len(part)
        rows.append(row)
        masks.append(mask)
    return Batch(
        input_ids=torch.tensor(rows, dtype=torch.long, device=device),
        attention_mask=torch.tensor(masks, dtype=torch.long, device=device),
        split=widths[0],
    )
