"""experiments/delays.ipynb: stored clean, and it runs top to bottom on a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_plots import tiny_run

NOTEBOOK = Path(__file__).resolve().parent.parent / "experiments" / "delays.ipynb"
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")


def test_notebook_is_stored_without_outputs_with_a_checkpoint_parameter():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the outputs"
    assert "CHECKPOINT =" in code[0].source and "SNN_DELAYS_CHECKPOINT" in code[0].source
    assert "parameters" in code[0].metadata.get("tags", [])


@pytest.mark.parametrize(
    ("model", "checkpoint", "n_images"),
    [
        # curves, histogram, positions, weight-delay, 2 kernel figures, raster
        ("delays", "checkpoints/best.pt", 7),
        # curves and raster; its positions.npz holds no layer (there are no delays to trace)
        ("no_delays", "checkpoints/last.pt", 2),
    ],
)
def test_notebook_runs_on_a_tiny_checkpoint(tmp_path_factory, monkeypatch, model, checkpoint, n_images):
    pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")
    from nbclient import NotebookClient

    run = tiny_run(tmp_path_factory, model)
    monkeypatch.setenv("SNN_DELAYS_CHECKPOINT", str(run / checkpoint))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == n_images, [out.get("text", "") for out in outputs]
    text = "".join(out.get("text", "") for out in outputs)
    assert "synthetic: 8 inputs, 4 classes" in text and str(run / checkpoint) in text
