"""The default task is solvable: SmolLM2 with the full cache finds the passkey at 2k tokens, every depth."""

from __future__ import annotations

from kvbench.runner import run


def test_smollm2_full_cache_solves_passkey_at_2k(make_config):
    cfg = make_config("task.lengths=[2048]", "task.depths=[0.25,0.5,0.75]", "task.n_per_cell=1", "diagnostics=false")
    (row,) = run(cfg)
    assert row["n_examples"] == 3
    assert row["score"] == 100.0
