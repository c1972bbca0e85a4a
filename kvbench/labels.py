"""Display names of policies in rows, tables and figure legends (torch-free, so results can be read without it).

A name carries a mark wherever kvbench runs something its paper does not: ``corm (capped, kvbench)`` is CORM
under a harness budget (the paper's CORM has none), ``fixed_capacity (<rule>, approximation)`` is a
training-free stand-in for BCT's unpublished update rule, ``duoattention (estimated patterns, approximation)``
DuoAttention with head patterns estimated in one pass instead of learned, ``adakv (h2o, kvbench)`` a wrapper
over a scorer its paper does not pair it with.
"""

from __future__ import annotations

from typing import Any

# Wrappers and the scorers their papers pair them with; any other scorer is a kvbench combination.
PAPER_SCORERS = {"adakv": ("snapkv", "pyramidkv"), "chunkkv": ("snapkv",)}


def display_name(policy: str, params: dict[str, Any] | None, budgeted: bool) -> str:
    """The policy's name as tables and legends show it, marked when it is a kvbench extension or approximation."""
    params = params if isinstance(params, dict) else {}
    scorer = params.get("scorer", PAPER_SCORERS.get(policy, ("",))[0])
    if policy in PAPER_SCORERS and scorer not in PAPER_SCORERS[policy]:
        return f"{policy} ({scorer}, kvbench)"
    if policy == "corm" and budgeted:
        return "corm (capped, kvbench)"
    if policy == "duoattention":
        return "duoattention (estimated patterns, approximation)"
    if policy == "fixed_capacity":
        return f"fixed_capacity ({params.get('rule', 'merge')}, approximation)"
    return policy


def is_extension(policy: str, params: dict[str, Any] | None, budgeted: bool) -> bool:
    """Whether the display name marks a kvbench extension or approximation (drawn dashed in figures)."""
    return display_name(policy, params, budgeted) != policy
