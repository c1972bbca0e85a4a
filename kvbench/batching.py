"""From examples to a left-padded ``Batch``: truncation, chat template, answer prefix, protocol split."""

from __future__ import annotations

from typing import Any

import torch

from kvbench.engine.generate import Batch
from kvbench.errors import UserError
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
    text, special = render(example, tokenizer, chat, max_prompt_tokens)
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


def render(example: Example, tokenizer: Any, chat: bool, max_prompt_tokens: int) -> tuple[str, bool]:
    """The model input as text (truncated prompt, chat template, answer prefix), and whether tokenizing it
    adds the special tokens (only without a template)."""
    prompt = truncate_middle(example.prompt, tokenizer, max_prompt_tokens)
    if not chat:
        return prompt + example.answer_prefix, True
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + example.answer_prefix, False


def needle_span(example: Example, tokenizer: Any, chat: bool, max_prompt_tokens: int) -> tuple[int, int] | None:
    """Token span [start, end) of the example's needle (``meta["needle"]``) in the model input; None when the
    example has no needle or the input lost it (truncation)."""
    needle = example.meta.get("needle")
    text, special = render(example, tokenizer, chat, max_prompt_tokens)
    first = text.rfind(needle) if needle else -1
    if first < 0:
        return None
    last = first + len(needle)
    offsets = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > first and a < last and b > a]
    return (inside[0], inside[-1] + 1) if inside else None


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


def length_grouped(examples: list[Example], size: int, window: int = 16) -> list[list[Example]]:
    """Batches of ``size`` examples of similar length, so that left padding stays small: within each window
    of ``window`` batches the examples are sorted by prompt length (characters, a proxy of tokens). Rows are
    keyed by example id, so a task's results keep the task's order whatever the batch order."""
    batches = []
    span = size * window
    for start in range(0, len(examples), span):
        ordered = sorted(examples[start : start + span], key=lambda example: len(example.prompt))
        batches += [ordered[i : i + size] for i in range(0, len(ordered), size)]
    return batches
