"""Peer parity: kvbench's ``protocol=query_agnostic`` against kvpress 0.5.5's pipeline, on kvbench's needle rows.

Both sides compress the same context (chat-template head, instruction, haystack with the needle) and append the
same held-out part (question, template tail, answer prefix) after compression, then decode greedily. Settings:
the full cache, and SnapKV (kvpress's window 64, kernel 5, average pooling), TOVA, StreamingLLM (4 sinks), Knorm,
AdaKV over that SnapKV (safeguard 0.2) and Expected Attention (512 future positions, 4 sinks, covariance, value
norms) at compression 0.5/0.7/0.9 (kvbench budget 0.5/0.3/0.1). kvpress runs in its own venv (it pins
transformers<5.3), in a persistent worker process (``scripts/kvpress_worker.py``) fed JSON; kvbench runs through
``kvbench.api.evaluate`` in this process. Both use one thread and are run interleaved, one depth cell at a time,
so that their seconds per row share the machine's load.

    python scripts/parity_kvpress.py --setup            # build .venv-kvpress (kvpress==0.5.5 from PyPI)
    OMP_NUM_THREADS=1 python scripts/parity_kvpress.py --rows 2 --out /tmp/parity   # estimate
    OMP_NUM_THREADS=1 python scripts/parity_kvpress.py  # the full grid, resumable (finished rows are cached)

Writes ``<out>/kvpress_parity.json`` and ``<out>/README.md``; per-row results are cached in ``<out>/work/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_VERSION = "0.5.5"
POLICIES = ("snapkv", "tova", "streaming_llm", "knorm", "adakv", "expected_attention")
COMPRESSIONS = (0.5, 0.7, 0.9)
SNAPKV = {"window": 64, "kernel": 5, "pooling": "avg"}
# kvbench parameters matching kvpress's press defaults (SnapKVPress: window_size 64, kernel_size 5, avg_pool1d;
# StreamingLLMPress: n_sink 4; AdaKVPress: alpha_safeguard 0.2 over that SnapKVPress; ExpectedAttentionPress:
# n_future_positions 512, n_sink 4, use_covariance, use_vnorm, epsilon 0, the statistics of all the context's
# queries, which kvbench's window of 1024 queries covers). TOVA and Knorm have none.
KVBENCH_PARAMS: dict[str, dict[str, Any]] = {
    "snapkv": SNAPKV,
    "tova": {},
    "streaming_llm": {"n_sink": 4},
    "knorm": {},
    "adakv": {"scorer": "snapkv", "scorer_params": SNAPKV, "alpha": 0.2},
    "expected_attention": {
        "window": 1024,
        "n_future": 512,
        "n_sink": 4,
        "use_covariance": True,
        "use_vnorm": True,
        "epsilon": 0.0,
    },
}
# Where the two sides' semantics differ by design (kvbench's documented choices), per policy.
SEMANTICS = {
    "full": "",
    "snapkv": "prefill-only on both sides: equivalent",
    "tova": "kvbench's TOVA evicts after every decode step (the paper's rule); kvpress compresses once, after prefill",
    "streaming_llm": "kvbench's StreamingLLM keeps evicting during decoding (sinks + recent); kvpress only at prefill",
    "knorm": "kvbench's Knorm evicts during decoding too (§3 of the paper); kvpress only at prefill",
    "adakv": "prefill-only on both sides; kvbench evicts (memory freed), kvpress masks (fake keys, nothing freed); "
    "kvbench's safeguard comes on top of SnapKV's window, kvpress's includes it",
    "expected_attention": "kvbench's Expected Attention evicts during decoding too (phase both); kvpress only at "
    "prefill",
}
# Why a decode-eviction setting may differ by more than the tolerance, per policy (None: the default).
BEYOND = {
    None: "explained by kvbench's decode-time eviction",
    "expected_attention": "kvbench's decode-time eviction, and prefill selections that differ already, see below: "
    "the two sides' query statistics and softmax key sets are not the same",
}
TOLERANCE = 2  # rows
AGREE = {True: "yes", False: "no", None: "–"}  # None: no row finished


@dataclass(frozen=True)
class Setting:
    """One point of the grid: a policy (None = full cache) at a kvpress compression ratio."""

    policy: str | None
    compression: float = 0.0

    @property
    def name(self) -> str:
        return "full" if self.policy is None else f"{self.policy}@{self.compression}"

    @property
    def budget(self) -> float | None:
        return None if self.policy is None else round(1 - self.compression, 6)

    @property
    def equivalent(self) -> bool:
        """Whether both sides implement the same rule (else a documented semantic choice separates them)."""
        return self.policy in (None, "snapkv", "adakv")


def all_settings() -> list[Setting]:
    return [Setting(None)] + [Setting(policy, ratio) for policy in POLICIES for ratio in COMPRESSIONS]


def parse_setting(text: str) -> Setting:
    """``full`` or ``<policy>@<compression>``, e.g. ``snapkv@0.7``."""
    if text == "full":
        return Setting(None)
    policy, _, ratio = text.partition("@")
    if policy not in POLICIES or not ratio:
        raise ValueError(f"unknown setting '{text}'; valid: full, <{'|'.join(POLICIES)}>@<compression>")
    value = float(ratio)
    if not 0 < value < 1:
        raise ValueError(f"setting '{text}': compression must be in (0, 1)")
    return Setting(policy, value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="build the kvpress venv and exit")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-kvpress", help="kvpress's venv")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "parity")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--length", type=int, default=1024, help="needle prompt length in tokens (one chunk)")
    parser.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=[0.05, 0.14, 0.23, 0.32, 0.5, 0.68, 0.86, 0.95],
        help="needle depths (of the whole input); 3 needles each",
    )
    parser.add_argument("--rows", type=int, default=None, help="the first N rows only (an estimate)")
    parser.add_argument("--settings", nargs="+", default=None, help="e.g. full snapkv@0.7 (default: the grid)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the cache")
    parser.add_argument("--inspect", action="store_true", help="kept positions on rows where the sides differ")
    args = parser.parse_args(argv)
    try:
        args.settings = [parse_setting(s) for s in args.settings] if args.settings else all_settings()
    except ValueError as error:
        parser.error(str(error))
    if args.rows is not None and args.rows < 1:
        parser.error("--rows must be a positive integer")
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error("--depths must be fractions in [0, 1]")
    return args


# ---------------------------------------------------------------- comparison and report (pure)


@dataclass
class SettingResult:
    """Both sides' per-row outcomes for one setting."""

    setting: Setting
    kvbench: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {score, prediction, seconds, ...}
    kvpress: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self, ids: list[str]) -> dict[str, Any]:
        done = [i for i in ids if i in self.kvbench and i in self.kvpress]
        differ = [i for i in done if self.kvbench[i]["score"] != self.kvpress[i]["score"]]
        n = len(done)

        def mean(side: dict[str, dict[str, Any]], key: str) -> float | None:
            return sum(side[i][key] for i in done) / n if n else None

        sec_kb, sec_kp = mean(self.kvbench, "seconds"), mean(self.kvpress, "seconds")
        return {
            "setting": self.setting.name,
            "policy": self.setting.policy or "full",
            "compression": self.setting.compression,
            "kvbench_budget": self.setting.budget,
            "n": n,
            "complete": n == len(ids),
            "accuracy_kvbench": mean(self.kvbench, "score"),
            "accuracy_kvpress": mean(self.kvpress, "score"),
            "rows_differ": differ,
            "n_differ": len(differ),
            "n_text_differ": sum(
                self.kvbench[i]["prediction"].strip() != self.kvpress[i]["prediction"].strip() for i in done
            ),
            "kvbench_better": sum(self.kvbench[i]["score"] > self.kvpress[i]["score"] for i in differ),
            "kvpress_better": sum(self.kvbench[i]["score"] < self.kvpress[i]["score"] for i in differ),
            "sec_per_row_kvbench": sec_kb,
            "sec_per_row_kvbench_generate": mean(self.kvbench, "generate_s"),
            "sec_per_row_kvpress": sec_kp,
            "time_ratio_kvbench_over_kvpress": sec_kb / sec_kp if n and sec_kp else None,
            "equivalent": self.setting.equivalent,
            "agree": len(differ) <= TOLERANCE if n else None,
            "semantics": SEMANTICS[self.setting.policy or "full"],
            "differing_rows": [
                {
                    "id": i,
                    "score_kvbench": self.kvbench[i]["score"],
                    "score_kvpress": self.kvpress[i]["score"],
                    "prediction_kvbench": self.kvbench[i]["prediction"],
                    "prediction_kvpress": self.kvpress[i]["prediction"],
                }
                for i in differ
            ],
        }


def collect(records: list[dict[str, Any]], settings: list[Setting]) -> list[SettingResult]:
    """Group cached per-row records (``setting``, ``side``, ``id``, ...) by setting, in the grid's order."""
    results = {s.name: SettingResult(s) for s in settings}
    for record in records:
        result = results.get(record["setting"])
        if result is not None:
            getattr(result, record["side"])[record["id"]] = record
    return list(results.values())


def verdict(summaries: list[dict[str, Any]]) -> str:
    """One paragraph: do the equivalent settings agree, and what separates the others."""
    finished = [s for s in summaries if s["n"]]
    equivalent = [s for s in finished if s["equivalent"]]
    off = [s["setting"] for s in equivalent if not s["agree"]]
    lines = [
        f"Equivalent settings (full, SnapKV, AdaKV): {len(equivalent) - len(off)} of {len(equivalent)} agree within "
        f"±{TOLERANCE} rows" + (f"; outside: {', '.join(off)}." if off else ".")
    ]
    others = [s for s in finished if not s["equivalent"]]
    beyond = [s for s in others if not s["agree"]]
    reasons = [f"{s['setting']} ({BEYOND.get(s['policy'], BEYOND[None])})" for s in beyond]
    lines.append(
        "Decode-eviction settings (TOVA, StreamingLLM, Knorm, Expected Attention): "
        f"{len(others) - len(beyond)} of {len(others)} agree within ±{TOLERANCE} rows"
        + (f"; differ by more: {', '.join(reasons)}." if beyond else ".")
    )
    missing = [s["setting"] for s in summaries if not s["complete"]]
    if missing:
        lines.append(f"Unfinished settings (partial or no rows): {', '.join(missing)}.")
    return " ".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The results README: the table, the agreement statement and the command."""
    lines = [
        "# Peer parity: kvbench vs kvpress " + report["versions"].get("kvpress", "?"),
        "",
        f"Needle rows from kvbench's own generator (`kvbench/tasks/needle.py`): {report['rows']['n']} rows, "
        f"length {report['rows']['length']} tokens, depths {report['rows']['depths']}, "
        f"{report['rows']['needles']} needles per depth; model {report['model']}. Protocol: query-agnostic on both "
        "sides (context compressed, then question + template tail + answer prefix appended, greedy decoding). "
        "Accuracy is the needle task's own metric (fraction of the needle's key phrases recalled), mean over rows.",
        "",
        "| setting | kvbench budget | n | acc. kvbench | acc. kvpress | rows differ (score) | answers differ (text) "
        "| kvbench s/row | "
        "kvpress s/row | ratio | agree ±2 | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["settings"]:
        budget = "full" if s["kvbench_budget"] is None else f"{s['kvbench_budget']:g}"
        lines.append(
            f"| {s['setting']} | {budget} | {s['n']} | {_fmt(s['accuracy_kvbench'])} | {_fmt(s['accuracy_kvpress'])} "
            f"| {s['n_differ']} (kvbench better {s['kvbench_better']}, kvpress {s['kvpress_better']}) "
            f"| {s['n_text_differ']} "
            f"| {_fmt(s['sec_per_row_kvbench'], 2)} | {_fmt(s['sec_per_row_kvpress'], 2)} "
            f"| {_fmt(s['time_ratio_kvbench_over_kvpress'], 2)} | {AGREE[s['agree']]} "
            f"| {s['semantics']} |"
        )
    lines += [
        "",
        "## Agreement",
        "",
        report["verdict"],
        "",
        "## What is the same by construction, and what is not",
        "",
        "Same on both sides: the model input (kvpress's pipeline splits the chat-templated prompt at the question; "
        "kvbench's `query_agnostic` splits the same text at the same place, so the compressed part is the template "
        "head, instruction and haystack, and the held-out part the question, template tail and answer prefix, "
        "tokenized separately on both sides); the budget counts the template head on both sides; original RoPE "
        "positions for the held-out part; greedy decoding with the same EOS ids and 32 new tokens at most; fp32, "
        "SDPA, one 1024-token prefill chunk. Rounding: kvpress keeps `int(T * (1 - ratio))` entries, kvbench "
        "`floor(T * budget)`; `1 - 0.9` is 0.0999…, so at ratio 0.9 kvpress keeps one entry fewer when T is a "
        "multiple of 10.",
        "",
        "Different by a documented kvbench choice: kvbench's TOVA, StreamingLLM and Knorm evict during decoding "
        "too (their papers' rule, `phase = both`; the cache is held to `floor(budget * tokens seen)` plus the "
        "held-out part after every step, so about (1 - budget) of an entry goes per generated token, and the "
        "evicted entry may be a question or answer token); kvpress compresses once, after prefill, and appends "
        "everything after. kvbench's Expected Attention evicts during decoding too (`phase = both`, its query "
        "statistics updated by each decode step's query); kvpress's only at prefill. kvbench's SnapKV and AdaKV are "
        "prefill-only, like kvpress's. TOVA: kvpress always keeps the last "
        "context token (its score is padded with the maximum), kvbench scores it by its own attention column; "
        "StreamingLLM and SnapKV keep the same windows (4 sinks + recent; the 64-token observation window). "
        "AdaKV: kvpress's AdaKVPress masks the evicted keys (a fake key per KV head whose attention underflows to "
        "zero, written over them before each attention call after prefill), so no memory is freed; kvbench removes "
        "them. Both share a layer's budget among its heads by a global top-k with a safeguard of alpha = 0.2 of "
        "the per-head budget; kvpress's safeguard is the head's `int(0.2 * n_kept)` best scores, which include "
        "SnapKV's 64-token window (scored above everything), while kvbench's comes on top of the window, so kvbench "
        "holds each head to at least window + 0.2 x capacity (at ratio 0.9 kvpress's safeguard is the window "
        "alone). Expected Attention: the same parameters (512 future positions, 4 sinks, covariance, value "
        "norms, epsilon 0); kvpress takes the query statistics over all context queries after the first 4, "
        "kvbench over its window of recent queries, set to 1024 here so that it holds all the context's queries "
        "(the first 4 included); kvpress's softmax runs over the non-sink keys, kvbench's over all held keys, "
        "which reweights the query heads of a KV head's group when their scores are averaged.",
        "",
        "## Why rows differ",
        "",
        "Rows that differ in score or in text, inspected (first such row per setting; `--inspect`): the positions "
        "each side keeps after prefill (kvpress's compressed keys matched back to the full prefill's keys), and "
        "what kvbench evicts while decoding.",
        "",
        *report.get("explanations", []),
        "",
        "## Timing",
        "",
        "Seconds per row under shared load (a 2-core machine shared with other jobs), 1 thread per side, measured "
        "interleaved one depth cell at a time: only the ratio is meaningful, not the absolute seconds. kvbench: the "
        "whole `kvbench.api.evaluate` call per row (config, example build, warm-up, generation, scoring); kvpress: "
        "one `pipeline(...)` call per row (template, tokenization, prefill, decoding). kvbench's generation alone "
        f"(prefill + decode) averages {_fmt(report['timing'].get('kvbench_generate_s'), 2)} s/row over all settings, "
        f"kvpress {_fmt(report['timing'].get('kvpress_s'), 2)} s/row. Compute seconds: kvbench "
        f"{_fmt(report['timing'].get('kvbench_total_s'), 0)}, "
        f"kvpress {_fmt(report['timing'].get('kvpress_total_s'), 0)}; "
        f"elapsed from the first row to the last: {_fmt(report['timing'].get('wall_s'), 0)} s (the grid split over "
        "parallel invocations of the script, each interleaving both sides, see the commands below).",
        "",
        "## Versions and command",
        "",
        "kvbench: " + ", ".join(f"{k} {v}" for k, v in report["versions"].get("kvbench_side", {}).items()),
        "",
        "kvpress: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "kvbench_side"),
        "",
        "Commands (run from the repository root; each adds its settings' rows to the cache, the last writes this "
        "report):",
        "",
        "```",
        report["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the two sides


def setup_venv(venv: Path) -> None:
    """Build kvpress's own venv: torch (this machine's CPU wheel), then kvpress==0.5.5 and its pins."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, f"kvpress=={KVPRESS_VERSION}"], check=True)


class KvpressWorker:
    """``scripts/kvpress_worker.py`` in kvpress's venv, one JSON request per line."""

    def __init__(self, venv: Path, model_dir: Path, threads: int, log: Path) -> None:
        python = venv / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"no kvpress venv at {venv}: run `python scripts/parity_kvpress.py --setup` first")
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
        env["HF_HUB_OFFLINE"] = "1"
        self.log = open(log, "a")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [str(python), str(ROOT / "scripts" / "kvpress_worker.py"), "--model", str(model_dir)]
            + ["--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.versions = self._read()["versions"]

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the kvpress worker stopped; see {self.log.name}")
        return json.loads(line)

    def run(self, setting: Setting, rows: list[dict[str, Any]], kept: bool = False) -> list[dict[str, Any]]:
        request = {"press": setting.policy, "ratio": setting.compression, "rows": rows, "kept": kept}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()["rows"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self.log.close()


def needle_rows(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, list[Any]]:
    """kvbench's needle task with this run's length and depths, and its examples (the first ``--rows``)."""
    from kvbench.tasks.needle import NeedleTask

    task = NeedleTask(lengths=[args.length], depths=list(args.depths))
    examples = list(task.examples(args.data_dir, tokenizer))
    return task, examples[: args.rows] if args.rows else examples


def kvpress_row(example: Any, max_new_tokens: int) -> dict[str, Any]:
    """The kvpress pipeline's inputs for a kvbench example: the context is the prompt up to its question."""
    split = example.prompt.rfind(example.question)
    return {
        "id": example.id,
        "context": example.prompt[:split],
        "question": example.question,
        "answer_prefix": example.answer_prefix,
        "max_new_tokens": max_new_tokens,
    }


def policy_overrides(setting: Setting) -> dict[str, Any]:
    """kvbench config overrides for the setting's parameters (``KVBENCH_PARAMS``); a wrapper's ``scorer_params``
    become one forced key each, as its YAML's dict is empty."""
    overrides: dict[str, Any] = {}
    for key, value in KVBENCH_PARAMS.get(setting.policy, {}).items():
        if isinstance(value, dict):
            overrides.update({f"++policy.{key}.{inner}": item for inner, item in value.items()})
        else:
            overrides[f"policy.{key}"] = value
    return overrides


def run_kvbench(model: Any, tokenizer: Any, setting: Setting, args: argparse.Namespace, depth: float, limit: int):
    """One depth cell through ``kvbench.api.evaluate``; returns its prediction records and the call's wall time."""
    from kvbench.api import evaluate

    overrides: dict[str, Any] = {
        "protocol": "query_agnostic",
        "limit": limit,
        "data_dir": str(args.data_dir),
        "task.lengths": [args.length],
        "task.depths": [depth],
        "task.n_per_cell": 3,
    }
    overrides.update(policy_overrides(setting))
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        evaluate(
            model,
            tokenizer,
            policy=setting.policy,
            budget=setting.budget,
            task="needle",
            results_dir=scratch,
            model_config="smollm2_135m",
            **overrides,
        )
        wall = time.perf_counter() - start
        (path,) = Path(scratch, "predictions").glob("*.jsonl")
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records, wall


def command_line(argv: list[str] | None) -> str:
    """The shell command of this invocation, as run from the repository root."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return (
        f"OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python scripts/parity_kvpress.py {args}".strip()
    )


def read_cache(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_cache(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.setup:
        setup_venv(args.venv)
        return
    import torch

    torch.set_num_threads(args.threads)
    from kvbench import models, runner
    from kvbench.models import model_spec

    spec = model_spec("smollm2_135m")
    model_dir = models.converted_dir(spec)
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tokenizer = runner.loaded_model(spec, torch.device("cpu"), torch.float32)
    task, examples = needle_rows(args, tokenizer)
    ids = [e.id for e in examples]
    if not args.report_only:  # every invocation that adds rows is part of how the results were made
        append_cache(work / "commands.jsonl", [{"command": command_line(argv), "at": time.time()}])
    wanted = args.inspect or not args.report_only
    worker = KvpressWorker(args.venv, model_dir, args.threads, work / "kvpress.log") if wanted else None
    versions = {"kvbench_side": runner.versions()}
    try:
        if worker is not None:
            versions.update(worker.versions)
        if not args.report_only:
            for setting in args.settings:
                cache_path = work / f"rows-{setting.name}.jsonl"  # one file per setting: parallel runs may split
                done = {(r["side"], r["id"]) for r in read_cache(cache_path)}
                for depth in args.depths:
                    cell = [e for e in examples if e.meta["depth"] == depth]
                    if not cell:
                        continue
                    if any(("kvbench", e.id) not in done for e in cell):
                        records, wall = run_kvbench(model, tokenizer, setting, args, depth, len(cell))
                        append_cache(
                            cache_path,
                            [
                                {
                                    "setting": setting.name,
                                    "side": "kvbench",
                                    "id": r["id"],
                                    "score": r["score"],
                                    "prediction": r["prediction"],
                                    "seconds": wall / len(records),
                                    "generate_s": r["prefill_s"] + r["decode_s"],
                                    "at": time.time(),
                                    "kv_kept_fraction": r["kv_kept_fraction"],
                                    "needle_span": r["meta"].get("needle_span"),
                                    "needle_in_window": r["meta"].get("needle_in_window"),
                                }
                                for r in records
                            ],
                        )
                    todo = [e for e in cell if ("kvpress", e.id) not in done]
                    if todo:
                        replies = worker.run(setting, [kvpress_row(e, task.max_new_tokens) for e in todo])
                        by_id = {e.id: e for e in todo}
                        append_cache(
                            cache_path,
                            [
                                {
                                    "setting": setting.name,
                                    "side": "kvpress",
                                    "id": r["id"],
                                    "score": task.score(r["prediction"], by_id[r["id"]]),
                                    "prediction": r["prediction"],
                                    "seconds": r["seconds"],
                                    "at": time.time(),
                                }
                                for r in replies
                            ],
                        )
                    print(f"[parity] {setting.name} depth {depth}: done ({time.perf_counter() - started:.0f} s)")
            (work / "versions.json").write_text(json.dumps(versions, indent=1))
        elif (work / "versions.json").exists():
            versions = json.loads((work / "versions.json").read_text())
        grid = all_settings() + [s for s in args.settings if s not in all_settings()]
        records = [r for path in sorted(work.glob("rows-*.jsonl")) for r in read_cache(path)]
        results = collect(records, grid)
        summaries = [r.summary(ids) for r in results]
        path = work / "explanations.json"  # setting -> {"row", "line"}, kept across runs
        known = json.loads(path.read_text()) if path.exists() else {}
        known = known if isinstance(known, dict) else {}  # an older run's list of lines
        if args.inspect and worker is not None:
            known = explain(results, examples, model, tokenizer, worker, known, path)
        explanations = [known[r.setting.name]["line"] for r in results if r.setting.name in known]
    finally:
        if worker is not None:
            worker.close()
    write_report(args, summaries, examples, versions, explanations, records, argv)


def timing(summaries: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean seconds per row over the finished settings, the compute seconds per side, and the elapsed span."""
    kb = [s["sec_per_row_kvbench_generate"] for s in summaries if s["n"]]
    kp = [s["sec_per_row_kvpress"] for s in summaries if s["n"]]
    stamps = [r["at"] for r in records if "at" in r]
    return {
        "kvbench_generate_s": sum(kb) / len(kb) if kb else None,
        "kvpress_s": sum(kp) / len(kp) if kp else None,
        "kvbench_total_s": sum(r["seconds"] for r in records if r["side"] == "kvbench"),
        "kvpress_total_s": sum(r["seconds"] for r in records if r["side"] == "kvpress"),
        "wall_s": max(stamps) - min(stamps) if stamps else None,
        "note": "shared load, 1 thread per side, interleaved per depth cell: only the ratio is meaningful",
    }


def write_report(args, summaries, examples, versions, explanations, records, argv) -> None:
    """``kvpress_parity.json`` and ``README.md`` under ``args.out``."""
    commands = [c["command"] for c in read_cache(args.out / "work" / "commands.jsonl")]
    commands = list(dict.fromkeys(commands + [command_line(argv)]))  # in order, once each; the report's last
    report = {
        "model": "smollm2_135m (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32, converted once)",
        "rows": {
            "n": len(examples),
            "length": args.length,
            "depths": list(args.depths),
            "needles": 3,
            "ids": [e.id for e in examples],
        },
        "tolerance_rows": TOLERANCE,
        "settings": summaries,
        "verdict": verdict(summaries),
        "explanations": explanations,
        "timing": timing(summaries, records),
        "versions": versions,
        "command": "\n".join(commands),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kvpress_parity.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "README.md").write_text(render_markdown(report))
    print(report["verdict"])


def kept_overlap(a: list[list[list[int]]], b: list[list[list[int]]]) -> dict[str, float]:
    """How alike two kept sets are: per (layer, KV head) position lists -> mean Jaccard and the identical share."""
    pairs = [(set(x), set(y)) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True)]
    jaccard = [len(x & y) / len(x | y) if x | y else 1.0 for x, y in pairs]
    return {"jaccard": sum(jaccard) / len(jaccard), "identical": sum(x == y for x, y in pairs) / len(pairs)}


def span_kept(kept: list[list[list[int]]], span: list[int]) -> float:
    """Mean share of the needle's tokens [start, end) held, over layers and KV heads."""
    inside = set(range(span[0], span[1]))
    heads = [len(inside & set(head)) / len(inside) for layer in kept for head in layer]
    return sum(heads) / len(heads)


def describe_difference(name: str, row: str, scores: tuple[float, float], facts: dict[str, Any]) -> str:
    """One README line on a differing row, from the kept-position facts ``explain`` measured."""
    text = (
        f"- `{name}`, `{row}` (kvbench {scores[0]:g}, kvpress {scores[1]:g}): after prefill the sides keep the same "
        f"positions in {facts['identical']:.0%} of the (layer, KV head) pairs (mean Jaccard {facts['jaccard']:.3f}); "
        f"needle tokens kept after prefill: kvbench {facts['needle_kvbench']:.0%}, "
        f"kvpress {facts['needle_kvpress']:.0%}"
    )
    if facts.get("needle_kvbench_end") is not None:
        text += f"; still held by kvbench at the end of decoding: {facts['needle_kvbench_end']:.0%}"
    if facts.get("tail_seen"):
        text += (
            f"; while decoding, kvbench evicted {facts['tail_evicted']:.1f} of the {facts['tail_seen']} question and "
            "answer tokens per (layer, KV head), kvpress none"
        )
    return text + "."


def kvbench_kept(model: Any, tokenizer: Any, setting: Setting, example: Any, max_new_tokens: int):
    """What kvbench holds per (layer, KV head) after generating ``max_new_tokens`` (1: right after prefill) for
    one example under ``setting`` (query-agnostic): the context positions kept, and how many of the tokens
    after the context (held-out question, answer) it has evicted, mean per (layer, head), of how many."""
    from kvbench.batching import collate, encode
    from kvbench.cache import EMPTY
    from kvbench.engine import make_engine
    from kvbench.engine.generate import generate
    from kvbench.models import model_spec
    from kvbench.policies import build
    from kvbench.policies.base import Budget
    from kvbench.runner import _eos_ids

    policy = build(setting.policy, **KVBENCH_PARAMS[setting.policy])
    policy.bind(tokenizer)
    parts = encode(example, tokenizer, True, model_spec("smollm2_135m").max_prompt_tokens, "query_agnostic")
    batch = collate([parts], tokenizer.pad_token_id, "cpu")
    engine = make_engine(model, policy, Budget.from_config(setting.budget, None))
    out = generate(model, engine, batch, max_new_tokens, _eos_ids(model, tokenizer))
    context = len(parts[0])
    heads = [head.tolist() for layer in engine.cache.layers for head in layer.positions[0]]
    tail_seen = len(parts[1]) + out.n_decode_tokens[0]  # each decode step feeds one generated token in
    tail_held = sum(sum(context <= p < EMPTY for p in head) for head in heads) / len(heads)
    kept = [
        [sorted(p for p in head.tolist() if 0 <= p < context) for head in layer.positions[0]]
        for layer in engine.cache.layers
    ]
    return kept, {"tail_evicted": tail_seen - tail_held, "tail_seen": tail_seen}


def explain(results, examples, model, tokenizer, worker, known: dict[str, Any], path: Path) -> dict[str, Any]:
    """For each setting whose sides differ (in score, else in text), the first such row: which positions each
    side keeps after prefill, and what kvbench evicts while decoding. ``known`` (saved to ``path`` after each
    setting) holds settings already explained; one is redone only when its first differing row changed."""
    by_id = {e.id: e for e in examples}
    for result in results:
        setting = result.setting
        summary = result.summary(list(by_id))
        text = [i for i in by_id if i in result.kvbench and i in result.kvpress]
        text = [i for i in text if result.kvbench[i]["prediction"].strip() != result.kvpress[i]["prediction"].strip()]
        differ = summary["rows_differ"] or text
        if setting.policy is None or not differ:
            continue
        row = differ[0]
        if known.get(setting.name, {}).get("row") == row:
            continue
        example = by_id[row]
        reply = worker.run(setting, [kvpress_row(example, 1)], kept=True)[0]
        ours, _ = kvbench_kept(model, tokenizer, setting, example, 1)
        span = result.kvbench[row]["needle_span"]
        facts = kept_overlap(ours, reply["kept"])
        facts["needle_kvbench"] = span_kept(ours, span)
        facts["needle_kvpress"] = span_kept(reply["kept"], span)
        if not setting.equivalent:  # decode-time eviction: what kvbench still holds once the answer is written
            end, tail = kvbench_kept(model, tokenizer, setting, example, 32)
            facts["needle_kvbench_end"] = span_kept(end, span)
            facts.update(tail)
        scores = (result.kvbench[row]["score"], result.kvpress[row]["score"])
        known[setting.name] = {"row": row, "line": describe_difference(setting.name, row, scores, facts)}
        path.write_text(json.dumps(known, indent=1))
        print(known[setting.name]["line"])
    return known


if __name__ == "__main__":
    main()
