"""Each prediction record carries its own example's policy diagnostics, not the whole batch's."""

from __future__ import annotations

from kvbench.runner import run
from kvbench.store import ResultStore


def test_batch_of_two_gives_each_record_its_own_diagnostics(make_config, tmp_path):
    cfg = make_config(
        "model=tiny_random_llama", "task=passkey", "+policy=fastgen", "limit=2", "task.max_new_tokens=2",
        "batch_size=2", "task.lengths=[600,1200]", "task.depths=[0.5]", "task.n_per_cell=1",
    )  # fmt: skip
    (row,) = run(cfg)
    records = list(ResultStore(cfg.results_dir).predictions(row["config_hash"]).values())
    assert len(records) == 2 and {r["batch_size"] for r in records} == {2}
    for record in records:
        diagnostics = record["policy_diagnostics"]
        counts = diagnostics["fastgen_choice_counts"]
        assert isinstance(counts, dict) and sum(counts.values()) == 4 * 2  # this example's layers x KV heads
        assert len(diagnostics["fastgen_choice"]) == 4 and all(len(h) == 2 for h in diagnostics["fastgen_choice"])
    for record in records:  # the same example run alone reports the same choices
        alone = make_config(
            "model=tiny_random_llama", "task=passkey", "+policy=fastgen", "task.max_new_tokens=2", "batch_size=1",
            f"task.lengths=[{record['meta']['length']}]", "task.depths=[0.5]", "task.n_per_cell=1", "limit=1",
            f"results_dir={tmp_path / record['id']}",
        )  # fmt: skip
        (single,) = run(alone)
        (solo,) = ResultStore(alone.results_dir).predictions(single["config_hash"]).values()
        assert solo["policy_diagnostics"]["fastgen_choice"] == record["policy_diagnostics"]["fastgen_choice"]
