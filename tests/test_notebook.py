"""notebooks/show_attend_tell.ipynb: stored without outputs, and run top to bottom on a small Flickr8k subset."""

from __future__ import annotations

import json

import nbformat
import pytest
from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "show_attend_tell.ipynb"


def test_notebook_is_stored_without_outputs_for_the_default_kernel():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"outputs committed in cell {cell.id}: clear them"
    # "python3" is the kernel of the Python that runs Jupyter (the project's .venv); a kernel named after one
    # machine's environment would not exist on another
    assert notebook.metadata.kernelspec.name == "python3"


def test_notebook_drives_the_package_and_copies_none_of_it():
    source = "\n".join(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code")
    for entry_point in ("from show_attend_tell.cli import main", "show_attend_tell.cli", "Captioner.load("):
        assert entry_point in source
    assert "import torch" not in source and "nn.Module" not in source


@pytest.mark.slow  # the notebook's 2-epoch training
@pytest.mark.flickr8k
def test_notebook_runs_top_to_bottom_on_a_small_subset(flickr8k, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("SAT_FLICKR8K_DIR", str(flickr8k))
    monkeypatch.setenv("SAT_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("SAT_NOTEBOOK_LIMIT", "30")
    monkeypatch.setenv("SAT_NOTEBOOK_EPOCHS", "2")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 3  # the loss curves, and one attention figure for each model
    texts = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("the shipped model, all 1,000 test photos" in text for text in texts)
    records = [json.loads(line) for line in (tmp_path / "run-30" / "log.jsonl").read_text().splitlines()]
    assert {"train", "val"} <= {record["kind"] for record in records}
    for name in ("mine", "shipped"):
        scores = next(iter(json.loads((tmp_path / name / "metrics.json").read_text())["results"].values()))
        assert scores["n_images"] == 30 and 0 <= scores["CIDEr"] < 400
