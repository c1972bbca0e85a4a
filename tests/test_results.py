"""``kvbench.analysis`` load, summaries and tables: loading (recursive, de-duplicated), labels, bootstrap CIs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvbench import schema
from kvbench.analysis import cli
from kvbench.analysis.load import MACRO, bootstrap_ci, example_scores, load, summary
from kvbench.analysis.names import policy_label
from kvbench.analysis.tables import notes, score_table, write_summaries
from kvbench.store import append_line, read_lines
from tests.results_fixture import MODEL, SETTINGS, TASKS, _record, row, write_results


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return write_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def df(fixture_dir) -> pd.DataFrame:
    return load(fixture_dir)


@pytest.fixture(scope="module")
def lines(df) -> pd.DataFrame:
    return summary(df)


def test_fixture_has_the_runner_schema(fixture_dir):
    rows = read_lines(fixture_dir / "results.jsonl")
    assert tuple(rows[0]) == schema.OK_COLUMNS
    prediction = read_lines(next((fixture_dir / "predictions").glob("*.jsonl")))[0]
    assert tuple(prediction) == schema.PREDICTION_COLUMNS


def test_load_is_recursive_and_keeps_the_latest_row(fixture_dir, df):
    assert len(df) == len(SETTINGS) * len(TASKS)
    assert df["config_hash"].is_unique
    old = read_lines(fixture_dir / "old" / "results.jsonl")[0]
    kept = df.set_index("config_hash").loc[old["config_hash"]]
    assert kept["score"] != -1.0
    assert kept["results_dir"] == str(fixture_dir)


def test_load_newer_row_in_a_nested_dir_wins(tmp_path):
    root = write_results(tmp_path / "a", n_examples=2)
    first = read_lines(root / "results.jsonl")[0]
    newer = {**first, "score": 12.5, "timestamp": "2027-01-01T00:00:00+00:00"}
    append_line(root / "sub" / "results.jsonl", newer)
    kept = load(root).set_index("config_hash").loc[first["config_hash"]]
    assert kept["score"] == 12.5
    assert kept["results_dir"] == str(root / "sub")


def test_labels_and_budgets(df):
    snapkv = df[df["policy"] == "snapkv"].iloc[0]
    assert snapkv["policy_label"] == "snapkv(window=32,kernel=7)"
    assert (snapkv["budget_kind"], snapkv["budget_label"]) == ("fraction", f"{snapkv['budget']:g}")
    streaming = df[df["policy"] == "streaming_llm"]
    assert set(streaming["budget_kind"]) == {"tokens"}
    assert set(streaming["budget_label"]) == {"64 tok", "128 tok"}
    full = df[df["policy"] == "full"].iloc[0]
    assert (full["policy_label"], full["budget_kind"], full["setting"]) == ("full", "none", "full")
    assert math.isnan(full["budget_x"])


def test_extensions_and_approximations_carry_their_mark_in_rows_and_tables(tmp_path):
    from kvbench.policies.base import Budget
    from kvbench.policies.corm import CORMPolicy
    from kvbench.policies.fixed_capacity import FixedCapacityPolicy

    assert CORMPolicy().display_name(Budget("fraction", 0.3)) == "corm (capped, kvbench)"
    assert CORMPolicy().display_name(Budget()) == "corm"
    rule = FixedCapacityPolicy(rule="replace_lowest")
    assert rule.display_name(Budget("tokens", 256)) == "fixed_capacity (replace_lowest, approximation)"
    records = [_record(np.random.default_rng(0), 0, "passkey", 2048, 0.3, False, True, 0.9)]
    capped = row("c1", "corm", {"w": 256, "r": 256}, "passkey", records, budget=0.3)
    native = row("c2", "corm", {"w": 256, "r": 256}, "passkey", records)
    legacy = row("f1", "fixed_capacity", {"rule": "merge"}, "passkey", records, budget_tokens=256)
    legacy.pop("label")  # rows committed before the label column: the mark is rebuilt from policy and params
    for line in (capped, native, legacy):
        append_line(tmp_path / "results.jsonl", line)
    df = load(tmp_path).set_index("config_hash")
    assert df.loc["c1", "display_name"] == "corm (capped, kvbench)"
    assert df.loc["c1", "setting"] == "corm (capped, kvbench) (w=256,r=256)"
    assert df.loc["c2", "setting"] == "corm(w=256,r=256)"
    assert df.loc["f1", "display_name"] == "fixed_capacity (merge, approximation)"


def test_policy_label_formats_nested_params():
    assert policy_label("full", {}) == "full"
    label = policy_label("adakv", {"alpha": 0.20, "inner": {"name": "snapkv", "window": 32}, "ks": [1, 2]})
    assert label == "adakv(alpha=0.2,inner={name=snapkv,window=32},ks=[1,2])"


def test_variant_goes_into_the_setting(tmp_path):
    root = tmp_path / "r"
    record = {"id": "a", "score": 1.0, "kv_kept_per_head": [[1.0]], "kv_kept_fraction": 1.0, "kv_bytes": 1}
    record.update(
        n_prompt_tokens=10,
        n_new_tokens=1,
        n_decode_tokens=0,
        prefill_s=1,
        decode_s=1,
        ttft_s=1,
        attention_mass_retained=None,
    )
    record.update(kv_payload_bytes=1, kv_bytes_decode=1, prefill_peak_bytes=1, decode_peak_bytes=1)
    line = row("h", "snapkv", {"window": 8}, "passkey", [record], budget=0.5, protocol="query_agnostic")
    append_line(root / "results.jsonl", line)
    assert load(root)["setting"].tolist() == ["snapkv(window=8) [protocol=query_agnostic]"]


def test_summary_scores_and_bootstrap(df, lines):
    assert set(lines["model"]) == {MODEL}
    point = lines[(lines["task"] == TASKS[0]) & (lines["policy"] == "snapkv") & (lines["budget_x"] == 0.3)]
    assert len(point) == 1
    point = point.iloc[0]
    source = df[(df["task"] == TASKS[0]) & (df["policy"] == "snapkv") & (df["budget_x"] == 0.3)].iloc[0]
    assert point["score"] == pytest.approx(source["score"])
    assert point["ci_low"] <= point["score"] <= point["ci_high"]
    # The CI is the 2.5/97.5 percentile of 1000 resampled means x 100, seed 0.
    scores = example_scores(source)
    assert scores.size == source["n_examples"]
    draws = scores[np.random.default_rng(0).integers(0, scores.size, size=(1000, scores.size))].mean(axis=1)
    expected = np.percentile(100 * draws, [2.5, 97.5])
    assert (point["ci_low"], point["ci_high"]) == pytest.approx(tuple(expected))


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    scores = np.asarray([1.0] * 30 + [0.0] * 70)
    lo, hi = bootstrap_ci(scores)
    assert (lo, hi) == bootstrap_ci(scores, seed=0)
    assert lo < 30.0 < hi
    assert 18.0 < lo and hi < 42.0  # about 30 +/- 1.96 * 100 * sqrt(0.3 * 0.7 / 100) = 30 +/- 9
    assert bootstrap_ci(np.ones(5)) == (100.0, 100.0)
    assert all(math.isnan(v) for v in bootstrap_ci(np.asarray([])))


def test_summary_macro_average(lines):
    macro = lines[lines["task"] == MACRO]
    # Every (setting, budget) point has all four tasks, so each gets a macro line.
    assert len(macro) == len(SETTINGS)
    per_task = lines[(lines["task"] != MACRO) & (lines["policy"] == "h2o") & (lines["budget_x"] == 0.1)]
    line = macro[(macro["policy"] == "h2o") & (macro["budget_x"] == 0.1)].iloc[0]
    assert line["score"] == pytest.approx(per_task["score"].mean())
    assert line["ci_low"] <= line["score"] <= line["ci_high"]
    assert line["n_examples"] == per_task["n_examples"].sum()


def test_summary_without_predictions_has_no_ci(tmp_path):
    root = write_results(tmp_path / "r", n_examples=3)
    for path in (root / "predictions").glob("*.jsonl"):
        path.unlink()
    lines = summary(load(root))
    assert lines["score"].notna().all()
    assert lines["ci_low"].isna().all()


def test_empty_dir(tmp_path, capsys):
    df = load(tmp_path / "missing")
    assert df.empty and "policy_label" in df.columns
    assert summary(df).empty
    assert write_summaries(tmp_path) == []
    assert cli.summary_main([str(tmp_path)]) == 0
    assert "no results yet" in capsys.readouterr().out


def test_write_summaries(fixture_dir, tmp_path, capsys):
    assert cli.summary_main([str(fixture_dir), "--out", str(tmp_path / "s")]) == 0
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["efficiency.csv", "efficiency.md", "scores.csv", "scores.md"]
    scores_md = (tmp_path / "s" / "scores.md").read_text()
    assert f"## {MODEL}" in scores_md and "| average |" in scores_md
    assert "snapkv(window=32,kernel=7) @ 0.3" in scores_md
    scores_csv = pd.read_csv(tmp_path / "s" / "scores.csv")
    assert {"task", "setting", "budget_label", "score", "ci_low", "ci_high"} <= set(scores_csv.columns)
    efficiency = pd.read_csv(tmp_path / "s" / "efficiency.csv")
    assert {"kv_kept_fraction", "kv_bytes", "peak_memory_bytes", "decode_tokens_per_s"} <= set(efficiency.columns)
    assert len(efficiency) == len(SETTINGS)
    assert "KV MiB" in (tmp_path / "s" / "efficiency.md").read_text()


def test_fastgen_rows_carry_the_punctuation_note(lines):
    table = score_table(lines[lines["model"] == MODEL])
    assert "punctuation" in notes(table)
    assert notes(table[[c for c in table.columns if "fastgen" not in c]]) == ""
