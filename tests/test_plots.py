"""``kvbench.analysis`` figures and the paper scripts: every figure and table from a fixture results dir, no model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from kvbench.analysis.cli import all_outputs, figures_main, script
from kvbench.analysis.figures import policy_color, save, score_vs_budget, short_labels
from kvbench.analysis.load import MACRO, load, predictions, summary
from kvbench.analysis.names import safe
from kvbench.analysis.papers import PAPER
from kvbench.analysis.papers.corm import corm_compression_vs_length, corm_longbench_table
from kvbench.analysis.papers.fastgen import fastgen_tradeoff
from kvbench.analysis.papers.less import less_gap_recovered, less_gap_table
from kvbench.analysis.papers.needle import needle_heatmaps, scores_by_length
from kvbench.analysis.papers.snapkv import snapkv_longbench_table
from kvbench.store import append_line, read_lines
from tests.results_fixture import MODEL, TASKS, write_results

REPO = Path(__file__).resolve().parents[1]
PAPER_SCRIPTS = sorted(PAPER)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return write_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def written(fixture_dir) -> Path:
    """``python -m kvbench.plots`` (in process) over the fixture: the figures folder (PNG only, for speed; the
    script tests check the PDFs)."""
    assert figures_main([str(fixture_dir), "--formats", "png"]) == 0
    return fixture_dir / "figures"


def _check_png(path: Path) -> None:
    assert path.stat().st_size > 1000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path


def test_every_figure_is_written(written):
    model = safe(MODEL)
    expected = {
        f"{name}__{model}"
        for name in (
            "score_vs_budget",
            "score_vs_budget_average",
            "score_vs_budget_tokens",
            "score_vs_budget_average_tokens",
            "memory_vs_budget",
            "memory_vs_budget_tokens",
            "throughput_vs_budget",
            "throughput_vs_budget_tokens",
            "attention_mass_vs_budget",
            "fig_corm_compression_vs_length",
            "fig_fastgen_tradeoff",
            "fig_less_gap_recovered",
        )
    }
    # Heat maps only for the policies whose heads keep different fractions (not SnapKV or StreamingLLM).
    for setting in ("h2o(recent_fraction=0.5)", "less(base=h2o,recent_fraction=0.5,rank=8)", "corm(w=128,r=256)"):
        expected.add(f"kept_heads__{model}__{safe(setting)}")
    pngs = {path.stem for path in written.glob("*.png")}
    assert expected <= pngs, expected - pngs
    assert not any("snapkv" in stem or "streaming" in stem for stem in pngs if stem.startswith("kept_heads"))
    for stem in pngs:
        _check_png(written / f"{stem}.png")
    tables = {path.stem for path in written.glob("*.md")}
    assert {f"table_corm_longbench__{model}", f"table_snapkv_longbench__{model}"} <= tables
    assert {path.stem for path in written.glob("*.csv")} == tables


def test_no_results_yet(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kvbench.plots", str(tmp_path), "--out", str(tmp_path / "figs")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "no results yet" in done.stdout
    assert not (tmp_path / "figs").exists()


@pytest.mark.parametrize("name", PAPER_SCRIPTS)
def test_paper_script_runs(name, fixture_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{name}.py"), str(fixture_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    stems = {path.stem for path in out.iterdir()}
    assert any(stem.startswith(f"{name}__{safe(MODEL)}") for stem in stems), stems
    for png in out.glob("*.png"):
        _check_png(png)
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("name", PAPER_SCRIPTS)
def test_paper_script_without_inputs(name, tmp_path, capsys):
    assert script(name, [str(tmp_path)]) == 0
    assert f"no results for {PAPER[name][1]} yet" in capsys.readouterr().out


def test_paper_script_without_its_policy(tmp_path, capsys):
    """Rows exist, but none of the policy a paper figure needs: it says so and writes nothing."""
    root = write_results(tmp_path / "r", n_examples=2)
    df = load(root)
    kept = df[~df["policy"].isin(["corm", "fastgen", "less"])]
    assert corm_compression_vs_length(kept) == {}
    assert fastgen_tradeoff(kept) == {}
    assert less_gap_recovered(kept) == {}


def test_less_gap_recovered_values(fixture_dir):
    lines = summary(load(fixture_dir))
    table = less_gap_table(lines)
    assert set(table["task"]) == {*TASKS, MACRO}
    row = table[(table["task"] == TASKS[0]) & (table["budget"] == "0.1")].iloc[0]

    def score(policy: str, budget: float | None) -> float:
        line = lines[(lines["task"] == TASKS[0]) & (lines["policy"] == policy)]
        line = line if budget is None else line[line["budget_x"] == budget]
        return float(line["score"].iloc[0])

    full, h2o, less = score("full", None), score("h2o", 0.1), score("less", 0.1)
    assert row["gap_recovered_pct"] == pytest.approx(100 * (less - h2o) / (full - h2o))
    assert row["less_minus_base"] == pytest.approx(less - h2o)


def test_less_gap_compares_on_the_examples_less_was_run_on(fixture_dir, tmp_path):
    """With the rows, a LESS row that has only the 2k passkey examples is compared with full and base on those
    (not with their 2k + 4k means), and the average is the mean of the per-task values."""
    root = tmp_path / "results"
    shutil.copytree(fixture_dir, root)
    df = load(root)
    less_row = df[(df["policy"] == "less") & (df["task"] == "passkey") & (df["budget_x"] == 0.1)].iloc[0]
    path = Path(less_row["results_dir"]) / "predictions" / f"{less_row['config_hash']}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    kept = [r for r in records if r["meta"]["length"] == 2048]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    df = load(root)
    table = less_gap_table(summary(df), df)
    ids = {r["id"] for r in kept}

    def mean_on_kept(policy: str, budget: float | None) -> float:
        rows = df[(df["task"] == "passkey") & (df["policy"] == policy)]
        row = rows[rows["budget_x"] == budget].iloc[0] if budget else rows.iloc[0]
        return 100 * float(np.mean([r["score"] for r in predictions(row) if r["id"] in ids]))

    row = table[(table["task"] == "passkey") & (table["budget"] == "0.1")].iloc[0]
    assert 0 < len(ids) < len(records)
    assert row["full"] == pytest.approx(mean_on_kept("full", None))
    assert row["base_score"] == pytest.approx(mean_on_kept("h2o", 0.1))
    assert row["less_score"] == pytest.approx(mean_on_kept("less", 0.1))
    per_setting = table[(table["budget"] == "0.1") & (table["task"] != MACRO)]
    macro = table[(table["budget"] == "0.1") & (table["task"] == MACRO)].iloc[0]
    assert macro["full"] == pytest.approx(per_setting["full"].mean())
    assert macro["gap_recovered_pct"] == pytest.approx(
        100 * (macro["less_score"] - macro["base_score"]) / (macro["full"] - macro["base_score"])
    )


def test_less_gap_table_does_not_depend_on_the_hash_seed(tmp_path):
    """The paired means sum the shared examples in id order: before, a set's order (PYTHONHASHSEED) decided the
    summation order, so ``make figures`` changed the last digits of the committed LESS table from run to run."""
    root = write_results(tmp_path / "r", n_examples=15)
    code = (
        "import sys\n"
        "from kvbench.analysis.load import load, summary\n"
        "from kvbench.analysis.papers.less import less_gap_table\n"
        "df = load(sys.argv[1])\n"
        "print(less_gap_table(summary(df, n=10), df).to_csv())"
    )
    tables = set()
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        tables.add(done.stdout)
    assert len(tables) == 1


def test_paper_tables_show_no_paths_in_settings(tmp_path):
    """A LESS row whose ``kernels`` parameter is a local folder: every setting (so every table and legend) names
    it by its last part only (before, ``/home/someone/...`` went into the committed tables)."""
    root = write_results(tmp_path / "r", n_examples=4)
    rows = read_lines(root / "results.jsonl")
    (root / "results.jsonl").unlink()
    for row in rows:
        if row["policy"] == "less":
            row["policy_params"] = {**row["policy_params"], "kernels": "/home/someone/.cache/kvbench/less/h2o_0.1"}
        append_line(root / "results.jsonl", row)
    df = load(root)
    assert any("/home/someone" in str(params) for params in df["policy_params"])  # the rows keep the full path
    assert not any("/" in setting for setting in df["setting"])  # every table and legend names its last part
    gap = less_gap_table(summary(df), df)
    (by_length,) = scores_by_length(df).values()
    settings = [*gap["less"], *gap["base"], *by_length.index]
    assert not [setting for setting in settings if "/" in setting]
    assert any("kernels=h2o_0.1" in setting for setting in gap["less"])
    assert any("kernels=h2o_0.1" in setting for setting in by_length.index)


def test_less_gap_is_undefined_when_the_base_is_not_below_full(fixture_dir):
    """A base that scores at or above the full cache leaves no gap: NaN, not a huge or negative percentage."""
    lines = summary(load(fixture_dir))
    full = lines["policy"] == "full"
    lines.loc[full, "score"] = lines.loc[lines["policy"] == "h2o", "score"].min() - 1.0
    table = less_gap_table(lines)
    assert len(table) > 0 and table["gap_recovered_pct"].isna().all()
    assert table["less_minus_base"].notna().all()


def test_less_lambda_base_is_compared_with_streaming_llm(fixture_dir):
    """The fixture's H2O lines relabelled as StreamingLLM: a Lambda-base LESS finds them, an H2O-base one not."""
    lines = summary(load(fixture_dir))
    lines["policy"] = lines["policy"].replace({"h2o": "streaming_llm"})
    less = lines[lines["policy"] == "less"].copy()
    assert less_gap_table(lines).empty
    less["policy_params"] = [{**params, "base": "lambda"} for params in less["policy_params"]]
    table = less_gap_table(pd.concat([lines[lines["policy"] != "less"], less]))
    assert len(table) == len(less) > 0


def test_corm_longbench_table_layout(fixture_dir):
    table = next(iter(corm_longbench_table(load(fixture_dir)).values()))
    assert list(table.columns)[0] == "full"
    assert {"qasper", "hotpotqa", "trec", "dureader"} <= set(table.index)
    assert {"Single-doc QA (avg)", "Multi-doc QA (avg)", "Few-shot (avg)"} <= set(table.index)
    assert list(table.index[-3:]) == ["Overall EN", "Overall ZH", "Overall"]
    full = table["full"]
    categories = full[[name for name in table.index if name.endswith("(avg)")]]
    assert full["Overall"] == pytest.approx(categories.mean(), abs=0.01)
    assert full["Overall ZH"] == pytest.approx(full["dureader"], abs=0.01)


def test_snapkv_table_layout(fixture_dir):
    table = next(iter(snapkv_longbench_table(load(fixture_dir)).values()))
    assert table.index[0] == "All KV"
    assert list(table.columns) == ["Qsp", "HQA", "TREC", "Avg", "KV kept"]  # no Chinese task (dureader)
    assert "snapkv(window=32,kernel=7) @ 0.3" in table.index
    assert table.loc["All KV", "Avg"] == pytest.approx(table.loc["All KV", ["Qsp", "HQA", "TREC"]].mean())


def test_scores_by_length_table(fixture_dir):
    df = load(fixture_dir)
    table = scores_by_length(df)[f"table_scores_by_length__{safe(MODEL)}"]
    assert list(table.columns) == ["passkey 2k", "passkey 4k"]
    assert table.index[0] == "full" and "snapkv(window=32,kernel=7) @ 0.3" in table.index
    row = df[(df["task"] == "passkey") & (df["policy"] == "snapkv") & (df["budget_x"] == 0.3)].iloc[0]
    at_4k = [r for r in predictions(row) if r["meta"]["length"] == 4096]
    score = 100 * sum(r["score"] for r in at_4k) / len(at_4k)
    kept = sum(r["kv_kept_fraction"] for r in at_4k) / len(at_4k)
    assert table.loc["snapkv(window=32,kernel=7) @ 0.3", "passkey 4k"] == f"{score:.0f} ({kept:.2f})"


def test_figures_from_one_task_and_from_one_row(tmp_path):
    root = write_results(tmp_path / "r", n_examples=2)
    df = load(root)
    one_task = all_outputs(df[df["task"] == TASKS[0]])  # no macro average
    assert f"score_vs_budget__{safe(MODEL)}" in one_task
    assert not any(name.startswith("score_vs_budget_average") for name in one_task)
    one = df[(df["policy"] == "full") & (df["task"] == TASKS[0])]
    outputs = all_outputs(one)
    assert f"score_vs_budget__{safe(MODEL)}" in outputs
    assert not any(name.startswith(("kept_heads", "fig_")) for name in outputs)
    assert isinstance(next(iter(snapkv_longbench_table(one).values())), pd.DataFrame)


def test_plots_never_import_a_model_stack():
    modules = "{'torch', 'transformers', 'wandb'}"
    imports = "kvbench.plots, kvbench.results, kvbench.analysis.cli, kvbench.analysis.papers"
    code = f"import sys, {imports}; print(sorted({modules} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "[]", done.stderr


def test_loggers_and_summaries_import_no_matplotlib():
    """``kvbench.loggers`` takes ``safe`` from ``kvbench.analysis.names`` (stdlib only), and the summary tables
    (``python -m kvbench.results``) draw nothing, so neither pulls in matplotlib (names: not even pandas)."""
    code = (
        "import sys, kvbench.loggers, kvbench.analysis.names; heavy = {'matplotlib', 'pandas'} & set(sys.modules)\n"
        "import kvbench.results, kvbench.analysis.tables; print(sorted(heavy), 'matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "[] False", done.stderr


def test_regenerated_figures_are_byte_identical(fixture_dir, tmp_path):
    """``make figures`` over unchanged results leaves git clean: no timestamps in the PDFs or PNGs."""
    outputs = score_vs_budget(load(fixture_dir))
    first = save(outputs, tmp_path / "a")
    second = save(score_vs_budget(load(fixture_dir)), tmp_path / "b")
    assert {path.suffix for path in first} == {".png", ".pdf"}
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def _hashes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_make_figures_reads_only_committed_sweeps(tmp_path):
    """A scratch row under results/runs (where ``make demo`` writes) changes no committed file."""
    recipe = (REPO / "Makefile").read_text().split("\nfigures:")[1].split("\n\n")[0]
    assert "kvbench.plots results/sweeps --out results/figures" in recipe
    assert "kvbench.plots results\n" not in recipe + "\n"
    root = tmp_path / "results"
    write_results(root / "sweeps" / "one", n_examples=2)
    args = [str(root / "sweeps"), "--out", str(root / "figures"), "--formats", "png"]
    assert figures_main(args) == 0
    before = _hashes(root / "figures")
    scratch = write_results(root / "runs" / "demo", n_examples=3)
    rows = read_lines(scratch / "results.jsonl")
    append_line(scratch / "results.jsonl", {**rows[1], "score": 0.0, "timestamp": "2030-01-01T00:00:00+00:00"})
    assert figures_main(args) == 0
    assert _hashes(root / "figures") == before and before


def test_needle_heatmap_has_a_panel_per_policy_and_budget(fixture_dir):
    df = load(fixture_dir)
    (stem, fig), *_ = needle_heatmaps(df).items()
    assert stem == f"fig_needle_heatmap__{safe(MODEL)}__passkey"
    points = df[df["task"] == "passkey"][["setting", "budget_label"]].drop_duplicates()
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(points)
    image = panels[0].images[0].get_array()
    assert image.shape == (3, 2)  # 3 depths x 2 lengths
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["2k", "4k"]


def test_legend_labels_show_only_what_varies_and_no_paths(fixture_dir):
    df = load(fixture_dir)
    extra = df[df["policy"] == "less"].iloc[[0]].copy()
    extra["policy_params"] = [{**extra["policy_params"].iloc[0], "kernels": "/home/someone/.cache/k/h2o_0.1"}]
    extra["setting"] = extra["setting"] + " with kernels"
    labels = short_labels(pd.concat([df, extra]))
    assert labels["snapkv(window=32,kernel=7)"] == "snapkv"
    assert labels["full"] == "full cache"
    assert labels["corm(w=128,r=256)"] == "corm (w=128)"
    assert not any("/" in label for label in labels.values())
    assert "kernels=h2o_0.1" in labels[extra["setting"].iloc[0]]


def test_each_policy_has_one_colour_and_extensions_are_dashed(fixture_dir, tmp_path):
    df = load(fixture_dir)
    capped = df[df["policy"] == "snapkv"].copy()
    capped["policy"], capped["display_name"] = "corm", "corm (capped, kvbench)"
    capped["setting"] = "corm (capped, kvbench) (w=256)"
    fig = score_vs_budget(pd.concat([df, capped]))[f"score_vs_budget__{safe(MODEL)}"]
    for line in fig.axes[0].get_lines():
        label = line.get_label()
        if label.startswith("snapkv"):
            assert line.get_color() == policy_color("snapkv") and line.get_linestyle() == "-"
        if label.startswith("corm (capped"):
            assert line.get_color() == policy_color("corm") and line.get_linestyle() == "--"
