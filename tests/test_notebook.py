"""``notebooks/analysis.ipynb`` runs top to bottom against a fixture results dir and draws the main figure."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.results_fixture import write_results

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def test_analysis_notebook_runs(tmp_path, monkeypatch):
    root = write_results(tmp_path / "results", n_examples=4)
    monkeypatch.setenv("KVBENCH_RESULTS", str(root))  # the kernel inherits the environment
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is the kernel of the interpreter running the tests (jupyter_client swaps in sys.executable).
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert f"rows from {root}" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert images, "the main figure (score vs budget) was not drawn"
