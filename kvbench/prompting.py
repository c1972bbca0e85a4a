"""Prompt preparation shared by the tasks: fitting a prompt into the model's context."""

from __future__ import annotations

from typing import Any


def truncate_middle(text: str, tokenizer: Any, max_tokens: int) -> str:
    """Cut the middle out of a prompt longer than ``max_tokens`` tokens (LongBench ``pred.py``).

    The text is tokenized without special tokens; when it is too long, the first and the last
    ``int(max_tokens / 2)`` tokens are each decoded with ``skip_special_tokens`` and joined.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    half = int(max_tokens / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - half :], skip_special_tokens=True)
    return head + tail
