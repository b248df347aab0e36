"""docs/quickstart.ipynb, executed headless in a real Jupyter kernel (nbclient + ipykernel), as a user runs it."""

import nbformat
from nbclient import NotebookClient

from conftest import ROOT, SHARED

NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"


def test_quickstart_runs_in_a_kernel_and_prints_only_for_people(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILETUNE_DATA", str(SHARED / "data" / "flowers_mini"))  # the kernel inherits it
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any cell's error
    outputs = [(i, o) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" for o in cell.outputs]
    stderr = [(i, o["text"][:300]) for i, o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert stderr == []  # no library warnings or C++ log lines reach the notebook
    html = "".join(o["data"]["text/html"] for _, o in outputs if "text/html" in o.get("data", {}))
    assert "phase 2 epoch 20/20" in html and "after fine-tuning" in html  # rich renders progress and the table
    printed = "".join(o.get("text", "") for _, o in outputs)
    assert "test accuracy after fine-tuning:" in printed and "WARNING" not in printed
    assert (tmp_path / "runs" / "quickstart" / "model_card.md").is_file()
    assert (tmp_path / "runs" / "quickstart" / "export" / "model.tflite").is_file()
    assert (tmp_path / "runs" / "quickstart-sweep" / "best" / "metrics.json").is_file()
