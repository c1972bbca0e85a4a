"""``kvbench.schema``: the runner writes exactly its columns, decode tokens/s counts decode tokens only, and
``docs/results.md`` is generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbench import runner, schema
from kvbench.batching import collate
from kvbench.engine import make_engine
from kvbench.engine.generate import generate
from kvbench.policies.base import Budget
from kvbench.policies.full import FullCache
from kvbench.store import ResultStore, read_lines

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random_llama", "+policy=full", "budget=1.0", "progress=false", "limit=2", "task.max_new_tokens=6"]


def test_docs_results_md_is_generated_from_the_schema():
    assert (REPO / "docs" / "results.md").read_text() == schema.markdown(), "run: python -m kvbench.schema"


def test_a_failed_row_has_its_configuration_and_reason_but_no_numbers():
    assert schema.FAILED_COLUMNS[:3] == ("config_hash", "status", "reason") and "reason" not in schema.OK_COLUMNS
    assert set(schema.FAILED_COLUMNS) - {"reason"} < set(schema.OK_COLUMNS)
    assert set(schema.FAILED_COLUMNS).isdisjoint({"score", "n_examples", *schema.EFFICIENCY})
    assert set(schema.ROW_DEFAULTS) <= set(schema.OK_COLUMNS) and set(schema.WANDB_METRICS) <= set(schema.OK_COLUMNS)


def _batch(tokenizer, texts):
    ids = [[tokenizer.encode(text, add_special_tokens=False), []] for text in texts]
    return collate(ids, tokenizer.pad_token_id, "cpu")


def _engine(model):
    return make_engine(model, FullCache(), Budget())


def test_generate_counts_the_tokens_of_decode_steps_per_example(smollm2):
    model, tokenizer = smollm2
    batch = _batch(tokenizer, ["The grass is green and the sky is", "Count on: one, two, three,"])
    out = generate(model, _engine(model), batch, 5, set())
    assert [len(tokens) for tokens in out.tokens] == [5, 5]
    assert out.n_decode_tokens == [4, 4]  # the first token of each comes from prefill
    # A stop token that a decode step produced counts (the step ran), though it is not kept.
    first = out.tokens[0]
    index = next(i for i in range(1, 5) if first[i] not in first[:i])
    stopped = generate(model, _engine(model), batch, 5, {first[index]})
    assert stopped.tokens[0] == first[:index] and stopped.n_decode_tokens[0] == index
    # Stopped by prefill's token: no decode step produced anything for that example.
    assert generate(model, _engine(model), batch, 5, {first[0]}).n_decode_tokens[0] == 0


def test_runner_writes_the_schema_and_decode_speed_counts_decode_tokens(make_config, monkeypatch):
    (row,) = runner.run(make_config(*TINY, "seed=0"))
    results_dir = Path(make_config().results_dir)
    store = ResultStore(results_dir)
    assert tuple(read_lines(store.rows_path)[0]) == schema.OK_COLUMNS == tuple(row)
    records = list(store.predictions(row["config_hash"]).values())
    assert len(records) == 2 and all(tuple(record) == schema.PREDICTION_COLUMNS for record in records)
    assert all(r["n_decode_tokens"] == r["n_new_tokens"] - 1 for r in records if r["n_new_tokens"] == 6)
    decode_s = sum(r["decode_s"] for r in records)
    assert row["decode_tokens_per_s"] == pytest.approx(sum(r["n_decode_tokens"] for r in records) / decode_s)
    assert row["decode_tokens_per_s"] != pytest.approx(sum(r["n_new_tokens"] for r in records) / decode_s)

    monkeypatch.setenv(runner.FAULT_ENV, "1")
    (failed,) = runner.run(make_config(*TINY, "seed=1"))
    assert failed["status"] == "failed" and tuple(failed) == schema.FAILED_COLUMNS
    assert tuple(read_lines(store.rows_path)[-1]) == schema.FAILED_COLUMNS


def test_decode_tokens_of_a_record_written_before_the_column():
    assert runner._decode_tokens({"n_new_tokens": 6}) == 5
    assert runner._decode_tokens({"n_new_tokens": 0}) == 0
    assert runner._decode_tokens({"n_new_tokens": 6, "n_decode_tokens": 6}) == 6


def test_committed_results_are_in_the_schema_order():
    """Committed rows and predictions (written by earlier versions) hold a subset of today's columns, in order."""
    paths = sorted((REPO / "results").rglob("results.jsonl"))
    assert paths
    for path in paths:
        for line in read_lines(path)[:3]:
            assert tuple(line) == tuple(c for c in schema.OK_COLUMNS if c in line), path
        for predictions in sorted((path.parent / "predictions").glob("*.jsonl"))[:3]:
            record = read_lines(predictions)[0]
            assert tuple(record) == tuple(c for c in schema.PREDICTION_COLUMNS if c in record), predictions
