"""docs/quickstart.ipynb runs from top to bottom (with a few training steps): it cannot rot."""

import nbformat
from nbclient import NotebookClient

from conftest import REPO


def test_quickstart_notebook_runs_and_shows_its_pictures(tmp_path, monkeypatch):
  # The kernel, and the training it starts, inherit this environment: one CPU device.
  for name, value in {"MLSEG_NOTEBOOK_STEPS": "4", "MLSEG_NOTEBOOK_WORKDIR": str(tmp_path / "run"),
                      "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}.items():
    monkeypatch.setenv(name, value)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # The kernel draws figures inline.
  notebook = nbformat.read(REPO / "docs" / "quickstart.ipynb", as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO / "docs")}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  pictures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert "step 4/4" in text and "step_4_ss: mIoU" in text, text[-2000:]
  assert "mIoU" in text and "Summary:" in text and "selected:" in text
  # The confusion matrix, the IoU bars and the API's image / truth / prediction figure.
  assert len(pictures) == 3, text[-2000:]
  assert all(len(p["data"]["image/png"]) > 5000 for p in pictures)
  assert (tmp_path / "run" / "eval").is_dir()
