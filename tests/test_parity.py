"""scripts/parity_kvpress.py's pure parts: arguments, the per-setting comparison, the report, kept-set overlap.

No kvpress install and no model: the two sides' per-row records are a hand-made fixture.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from kvbench.tasks.base import Example

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
_spec = importlib.util.spec_from_file_location("parity_kvpress", SCRIPTS / "parity_kvpress.py")
parity = importlib.util.module_from_spec(_spec)
sys.modules["parity_kvpress"] = parity  # dataclasses look their module up
_spec.loader.exec_module(parity)


def test_default_grid_is_full_plus_six_policies_at_three_ratios() -> None:
    args = parity.parse_args([])
    names = [s.name for s in args.settings]
    assert names[0] == "full" and len(names) == 19
    assert "snapkv@0.7" in names and "knorm@0.9" in names
    assert "adakv@0.5" in names and "expected_attention@0.9" in names
    snap = parity.parse_setting("snapkv@0.7")
    assert snap.budget == 0.3 and snap.equivalent
    assert parity.parse_setting("adakv@0.9").equivalent  # prefill-only on both sides
    assert not parity.parse_setting("tova@0.5").equivalent
    assert not parity.parse_setting("expected_attention@0.5").equivalent  # kvbench evicts while decoding
    assert parity.Setting(None).budget is None


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("adakv@0.7", {"scorer": "snapkv", "scorer_params": {"window": 64, "kernel": 5, "pooling": "avg"}}),
        ("expected_attention@0.5", {"window": 1024, "n_future": 512, "n_sink": 4, "use_covariance": True}),
        ("snapkv@0.9", {"window": 64, "kernel": 5, "pooling": "avg"}),
    ],
)
def test_policy_overrides_reach_kvbench_config(setting: str, expected: dict) -> None:
    from omegaconf import OmegaConf

    from kvbench.api import _config

    parsed = parity.parse_setting(setting)
    cfg = _config(parsed.policy, parsed.budget, "needle", parity.policy_overrides(parsed))
    policy = OmegaConf.to_container(cfg.policy)
    assert {key: policy[key] for key in expected} == expected


@pytest.mark.parametrize("bad", ["h2o@0.5", "snapkv", "tova@1.5"])
def test_bad_setting_is_one_line_naming_the_choices(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parity.parse_args(["--settings", bad])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert bad in err
    if "@" not in bad or bad.startswith("h2o"):
        assert "full" in err and "snapkv" in err


def _records(setting: str, kvbench: list[float], kvpress: list[float]) -> list[dict]:
    rows = []
    for side, scores, seconds in (("kvbench", kvbench, 2.0), ("kvpress", kvpress, 4.0)):
        for i, score in enumerate(scores):
            record = {"setting": setting, "side": side, "id": f"r{i}", "score": score, "prediction": f"p{score}"}
            record.update(seconds=seconds, at=100.0 + i)
            if side == "kvbench":
                record["generate_s"] = 1.5
            rows.append(record)
    return rows


def test_summary_counts_differing_rows_and_the_time_ratio() -> None:
    settings = [parity.Setting(None), parity.parse_setting("snapkv@0.7"), parity.parse_setting("tova@0.5")]
    records = _records("full", [1, 1, 0.5, 0], [1, 1, 0.5, 0]) + _records("snapkv@0.7", [1, 0, 0, 0], [0, 1, 0, 1])
    records += _records("tova@0.5", [1, 0.5], [1, 1])  # unfinished: 2 of 4 rows
    results = parity.collect(records, settings)
    ids = ["r0", "r1", "r2", "r3"]
    full, snap, tova = (r.summary(ids) for r in results)
    assert full["n_differ"] == 0 and full["agree"] and full["accuracy_kvbench"] == 0.625
    assert full["n_text_differ"] == 0 and snap["n_text_differ"] == 3
    assert snap["rows_differ"] == ["r0", "r1", "r3"] and not snap["agree"]
    assert (snap["kvbench_better"], snap["kvpress_better"]) == (1, 2)
    assert snap["accuracy_kvbench"] == 0.25 and snap["accuracy_kvpress"] == 0.5
    assert snap["time_ratio_kvbench_over_kvpress"] == 0.5
    assert snap["differing_rows"][0] == {
        "id": "r0",
        "score_kvbench": 1,
        "score_kvpress": 0,
        "prediction_kvbench": "p1",
        "prediction_kvpress": "p0",
    }
    assert tova["n"] == 2 and not tova["complete"]
    text = parity.verdict([full, snap, tova])
    assert "1 of 2 agree" in text and "outside: snapkv@0.7" in text
    assert "Unfinished settings" in text and "tova@0.5" in text
    ea = parity.parse_setting("expected_attention@0.9")
    beyond = parity.collect(_records(ea.name, [1, 1, 1, 0], [0, 0, 0, 0]), [ea])[0].summary(ids)
    text = parity.verdict([beyond])
    assert "0 of 1 agree" in text and "expected_attention@0.9 (kvbench's decode-time eviction, and prefill" in text


def test_report_has_the_table_the_verdict_and_the_commands() -> None:
    settings = [parity.Setting(None), parity.parse_setting("knorm@0.9"), parity.parse_setting("tova@0.7")]
    records = _records("full", [1, 0], [1, 0]) + _records("knorm@0.9", [0, 0], [1, 1])  # tova@0.7: not run
    summaries = [r.summary(["r0", "r1"]) for r in parity.collect(records, settings)]
    report = {
        "model": "m",
        "rows": {"n": 2, "length": 1024, "depths": [0.5], "needles": 3},
        "settings": summaries,
        "verdict": parity.verdict(summaries),
        "explanations": ["- `knorm@0.9`: because."],
        "timing": parity.timing(summaries, records),
        "versions": {"kvpress": "0.5.5", "kvbench_side": {"torch": "x"}},
        "command": "python scripts/parity_kvpress.py --settings full knorm@0.9",
    }
    text = parity.render_markdown(report)
    assert "| full | full | 2 | 1.000 |" not in text  # accuracy is the mean over rows
    assert (
        "| full | full | 2 | 0.500 | 0.500 | 0 (kvbench better 0, kvpress 0) | 0 | 2.00 | 4.00 | 0.50 | yes |" in text
    )
    assert "| knorm@0.9 | 0.1 | 2 | 0.000 | 1.000 | 2 (kvbench better 0, kvpress 2) | 2 |" in text
    assert "decoding" in text  # the semantic note beside Knorm's row
    assert summaries[2]["agree"] is None and "| tova@0.7 | 0.3 | 0 | – | – |" in text
    assert "| – | kvbench's TOVA" in text  # no verdict for a setting without rows
    assert "tova@0.7" in report["verdict"] and "Unfinished" in report["verdict"]
    assert "- `knorm@0.9`: because." in text and "--settings full knorm@0.9" in text
    assert "only the ratio is meaningful" in text
    assert report["timing"]["kvbench_total_s"] == 8.0 and report["timing"]["wall_s"] == 1.0


def test_kept_overlap_and_needle_share() -> None:
    ours = [[[0, 1, 2], [0, 5]], [[3, 4], [4]]]
    theirs = [[[0, 1, 2], [0, 6]], [[3, 4], [5]]]
    facts = parity.kept_overlap(ours, theirs)
    assert facts["identical"] == 0.5
    assert facts["jaccard"] == pytest.approx((1 + 1 / 3 + 1 + 0) / 4)
    assert parity.span_kept(ours, [4, 6]) == pytest.approx((0 + 0.5 + 0.5 + 0.5) / 4)
    line = parity.describe_difference(
        "tova@0.9",
        "r1",
        (0.0, 1.0),
        {
            **facts,
            "needle_kvbench": 1.0,
            "needle_kvpress": 1.0,
            "needle_kvbench_end": 0.25,
            "tail_evicted": 3.5,
            "tail_seen": 40,
        },
    )
    assert "50% of the (layer, KV head) pairs" in line and "end of decoding: 25%" in line
    assert "evicted 3.5 of the 40 question and answer tokens" in line


def test_kvpress_row_holds_out_the_question_like_query_agnostic() -> None:
    example = Example(
        id="needle-1",
        prompt="Read this.\n\nhay NEEDLE hay\n\nWhat is it? Answer from the document only.",
        answers=["NEEDLE"],
        question="What is it? Answer from the document only.",
        answer_prefix="It is",
    )
    row = parity.kvpress_row(example, 32)
    assert row["context"] + row["question"] == example.prompt
    assert row["context"].endswith("hay\n\n") and row["answer_prefix"] == "It is" and row["max_new_tokens"] == 32


def test_the_worker_never_imports_kvbench() -> None:
    tree = ast.parse((SCRIPTS / "kvpress_worker.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "kvpress" in names and not any(name.startswith("kvbench") for name in names)
