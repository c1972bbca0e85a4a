"""A built wheel, installed outside the checkout, runs ``python -m kvbench`` and the ``kvbench`` script anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = ["+policy=snapkv", "budget=0.3", "model=tiny_random_llama", "limit=1"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip wheel .`` then ``pip install --target`` of that wheel: a site dir holding only the built package."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy of what the wheel is built from, so the build leaves the checkout alone
    shutil.copytree(REPO / "kvbench", source / "kvbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(root / "dist")], check=True
    )
    (wheel,) = (root / "dist").glob("kvbench-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)], check=True)
    return root / "site"


def run_outside(installed: Path, tmp_path: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run from a folder outside the checkout with only the installed copy of kvbench importable."""
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    env.pop("KVBENCH_DATA_DIR", None)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_ships_the_configs(installed):
    configs = installed / "kvbench" / "configs"
    assert (configs / "config.yaml").is_file()
    for group in ("model", "policy", "task", "logger", "hydra", "experiment"):
        assert list((configs / group).rglob("*.yaml")), group


def test_installed_package_is_the_one_imported(installed, tmp_path):
    done = run_outside(installed, tmp_path, [sys.executable, "-c", "import kvbench; print(kvbench.__file__)"])
    assert Path(done.stdout.strip()).is_relative_to(installed), done.stdout + done.stderr


@pytest.mark.parametrize("entry", ["python -m kvbench", "kvbench script"])
def test_installed_wheel_runs_from_another_folder(entry, installed, tmp_path):
    results = tmp_path / "results"
    prefix = [sys.executable, "-m", "kvbench"] if entry.startswith("python") else [str(installed / "bin" / "kvbench")]
    done = run_outside(installed, tmp_path, [*prefix, *RUN, f"results_dir={results}"])
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert (rows[0]["task"], rows[0]["policy"], rows[0]["budget"], rows[0]["n_examples"]) == (
        "passkey",
        "snapkv",
        0.3,
        1,
    )
