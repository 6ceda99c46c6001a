"""Notebook 04 runs headless (nbclient) against a tiny local model, and is committed clean."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

import dq_kit as dq

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_layer_selection.ipynb"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
TINY_SAMPLES = "2"

def notebook_for_tests() -> nbformat.NotebookNode:
    """Notebook 04 as committed (the parameters cell reads DQ_NOTEBOOK_MODEL / DQ_NOTEBOOK_SAMPLES)."""
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_committed_without_outputs_and_has_parameters():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert 'if "google.colab" in sys.modules' in code[0].source
    parameters = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and '"Qwen/Qwen2-VL-2B-Instruct"' in parameters[0].source
    assert "DQ_NOTEBOOK_MODEL" in parameters[0].source


def test_notebook_runs_headless_on_a_tiny_model(tiny_path, tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_NOTEBOOK_MODEL", str(tiny_path("qwen2_vl")))
    monkeypatch.setenv("DQ_NOTEBOOK_SAMPLES", TINY_SAMPLES)
    notebook = notebook_for_tests()
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    panels = [o for o in outputs if o.output_type == "execute_result" and WIDGET_MIME in o.data]
    assert len(panels) == 2  # the LayerSelector and the CompareView
    plan = dq.Plan.load(tmp_path / "dq_plan.json")
    assert plan.model_type == "qwen2_vl" and plan.source == "budget" and plan.keep
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "module(s) kept in 16-bit" in printed and "predicted KL" in printed
