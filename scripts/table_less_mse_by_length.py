"""LESS kernels' held-out attention-output MSE by context length, against the plain base policy and the base
at the same memory ("plus": R/2 more tokens per head).

    python scripts/table_less_mse_by_length.py KERNELS [KERNELS ...] --lengths 512 2048 4096 --out results/less

For every kernels directory and length, ``train_less.py --evaluate`` runs on held-out windows (the corpus's last
tenth, which training never reads) and its JSON is kept as ``<out>/<kernels name>/eval_<length>.json``; an
existing file is reused, so a rerun only adds what is missing. Then ``<out>/mse_by_length.{md,csv}`` gets one row
per (kernels, length): the mean over layers of each MSE, and LESS's change against base and plus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from kvbench.results import markdown

sys.path.insert(0, str(Path(__file__).parent))
import train_less  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernels", nargs="+", help="directories written by train_less.py")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--windows", type=int, default=20, help="as train_less.py: a tenth are the held-out ones")
    parser.add_argument("--out", default="results/less")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def evaluation(kernels: Path, length: int, args: argparse.Namespace) -> dict:
    path = Path(args.out) / kernels.name / f"eval_{length}.json"
    if not path.is_file():
        manifest = json.loads((kernels / "manifest.json").read_text())
        train_less.main(
            ["--evaluate", str(kernels), "--model", manifest["model"], "--window-tokens", str(length)]
            + ["--windows", str(args.windows), "--threads", str(args.threads), "--out", str(path)]
        )
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    rows = []
    for directory in args.kernels:
        kernels = Path(directory).expanduser()
        manifest = json.loads((kernels / "manifest.json").read_text())
        for length in args.lengths:
            mse = evaluation(kernels, length, args)["val_mse_mean"]
            rows.append(
                {
                    "kernels": kernels.name,
                    "base": manifest["base"],
                    "budget": manifest["budget"],
                    "trained_on": "{windows} x {window_tokens} tokens, {epochs} epochs".format(**manifest),
                    "eval_tokens": length,
                    "mse_base": mse["base"],
                    "mse_plus": mse["plus"],
                    "mse_less": mse["less"],
                    "less_vs_base_pct": 100 * (mse["less"] / mse["base"] - 1),
                    "less_vs_plus_pct": 100 * (mse["less"] / mse["plus"] - 1),
                }
            )
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "mse_by_length.csv", index=False)
    command = "python scripts/table_less_mse_by_length.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = "# LESS: held-out attention-output MSE (mean over layers) by context length\n\n"
    (out / "mse_by_length.md").write_text(header + f"Made by `{command}`.\n\n" + markdown(table, "{:.4g}"))
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
