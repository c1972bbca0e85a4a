"""LESS kernels' held-out attention-output MSE by context length, against the plain base policy and the base
at the same memory ("plus": R/2 more tokens per head).

    python scripts/table_less_mse_by_length.py KERNELS [KERNELS ...] --lengths 512 2048 4096 --out results/less

For every kernels directory and length, ``train_less.py --evaluate`` runs on held-out windows (the corpus's last
tenth, which training never reads) and its JSON is kept as ``<out>/<kernels name>/eval_<length>.json``; an
existing file is reused, so a rerun only adds what is missing. Then ``<out>/mse_by_length.{md,csv}`` gets one row
per evaluation found under ``<out>``: the mean over layers of each MSE, and LESS's change against base and plus.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from kvbench.analysis.tables import markdown
from kvbench.training import less as train_less


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernels", nargs="+", help="directories written by train_less.py")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--windows", type=int, default=20, help="as train_less.py: a tenth are the held-out ones")
    parser.add_argument("--out", default="results/less")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def evaluate(kernels: Path, length: int, args: argparse.Namespace) -> None:
    """The held-out evaluation of ``kernels`` at ``length`` tokens, run when its JSON is missing."""
    path = Path(args.out) / kernels.name / f"eval_{length}.json"
    if not path.is_file():
        model = json.loads((kernels / "manifest.json").read_text())["model"]
        train_less.main(
            ["--evaluate", str(kernels), "--model", model, "--window-tokens", str(length)]
            + ["--windows", str(args.windows), "--threads", str(args.threads), "--out", str(path)]
        )


def table(out: Path) -> pd.DataFrame:
    """One row per evaluation under ``out``: the mean over layers of each MSE, and LESS against base and plus."""
    rows = []
    for path in sorted(out.glob("*/eval_*.json")):
        report = json.loads(path.read_text())
        trained, mse = report["trained"], report["val_mse_mean"]
        rows.append(
            {
                "kernels": path.parent.name,
                "base": trained["base"],
                "budget": trained["budget"],
                "trained_on": "{windows} x {window_tokens} tokens, {epochs} epochs".format(**trained),
                "eval_tokens": report["window_tokens"],
                "eval_windows": report["windows"],
                "mse_base": mse["base"],
                "mse_plus": mse["plus"],
                "mse_less": mse["less"],
                "less_vs_base_pct": 100 * (mse["less"] / mse["base"] - 1),
                "less_vs_plus_pct": 100 * (mse["less"] / mse["plus"] - 1),
            }
        )
    return pd.DataFrame(rows).sort_values(["base", "budget", "kernels", "eval_tokens"], kind="stable")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    out = Path(args.out)
    for directory in args.kernels:
        for length in args.lengths:
            evaluate(Path(directory).expanduser(), length, args)
    result = table(out)
    result.to_csv(out / "mse_by_length.csv", index=False)
    header = "# LESS: held-out attention-output MSE (mean over layers) by context length\n\n"
    note = (
        "Every evaluation under this folder; each `<kernels>/eval_<tokens>.json` was made by "
        "`python scripts/table_less_mse_by_length.py <kernels dir> --lengths <tokens>` (see scripts/sweep_smollm2.sh "
        "step less_mse). base = the sparse policy alone, plus = base with R/2 more tokens per head (LESS's memory), "
        "less = base + the learned state; negative percentages mean LESS has the lower error.\n\n"
    )
    (out / "mse_by_length.md").write_text(header + note + markdown(result.reset_index(drop=True), "{:.4g}"))
    print(result.to_string(index=False))
    return result


if __name__ == "__main__":
    main()
