"""examples/quickstart.ipynb runs end to end in a Jupyter kernel (nbclient), so the example cannot rot."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, require_demo_gguf

pytestmark = pytest.mark.e2e

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def _text(output: dict) -> str:
    """What a cell output shows: a stream's text, or a result's / display's plain text, without colours."""
    text = output["text"] if output.get("output_type") == "stream" else output.get("data", {}).get("text/plain", "")
    return re.sub(r"\x1b\[[0-9;]*m", "", str(text))


def test_the_committed_notebook_has_no_outputs() -> None:
    """Outputs in the repository would be stale, and carry the paths of whoever ran it."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")


@pytest.mark.slow
def test_the_quickstart_notebook_runs(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    require_demo_gguf()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    check_outputs(notebook, tmp_path)


def check_outputs(notebook: Any, workdir: Path) -> None:
    """What each code cell of the executed notebook shows."""
    shown = ["\n".join(_text(o) for o in cell.get("outputs", [])) for cell in notebook.cells
             if cell.cell_type == "code"]
    setup, train, error, export, generate = shown
    assert "'role': 'assistant'" in setup
    assert "step 8  loss" in train and "step 8: eval loss" in train  # the log lines render in the notebook
    assert "'step': 8" in train and str(workdir / "quickstart" / "run") in train
    assert error.startswith("ConfigError (exit code 2): --set train.max_step=3: unknown key")
    assert "\nfix: " in error
    assert "verification" in export and "('passed'," in export and "'greedy_total': 8" in export
    assert len([line for line in generate.splitlines() if "(reference " in line]) == 3
    assert (workdir / "quickstart" / "merged" / "config.json").is_file()
