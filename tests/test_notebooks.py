"""Notebooks 01-03 run headless (nbclient) against local tiny / demo models; every notebook is committed clean.

Each notebook's ``parameters`` cell reads ``DQ_NOTEBOOK_*`` environment variables (see
``notebooks/README.md``); the kernel inherits them from this process, so the tests point the notebooks
at local models and shrink every size (calibration samples, training steps, generated tokens).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import dq_kit as dq

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
DEMO_MODEL = Path(dq.__file__).resolve().parent / "assets" / "demo_model"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
COLAB_BADGE = "https://colab.research.google.com/github/dq-kit/dq_kit/blob/main/notebooks/{}"
CELL_TIMEOUT = 300

# Tiny sizes shared by the fine-tuning notebooks: a few rows, two optimizer steps, short answers
# (bitsandbytes' 4-bit matmuls are slow on a CPU: every row counts).
TINY_TRAINING = {
    "DQ_NOTEBOOK_TRAIN_SAMPLES": "4",
    "DQ_NOTEBOOK_TEST_SAMPLES": "2",
    "DQ_NOTEBOOK_STEPS": "2",
    "DQ_NOTEBOOK_BATCH_SIZE": "2",
    "DQ_NOTEBOOK_MAX_NEW_TOKENS": "6",
    "DQ_NOTEBOOK_OUTPUT": "out",
}


def qwen2_vl_model(tiny_path) -> Path:
    """The trained demo model when it ships with the kit (meaningful answers), else the random tiny Qwen2-VL."""
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    return Path(tiny_path("qwen2_vl"))


def execute(name: str, tmp_path: Path, monkeypatch, env: dict[str, str]) -> tuple[dict[str, list], str]:
    """Run notebook ``name`` with ``env`` set, in ``tmp_path``; return the outputs by cell id and everything printed."""
    for key in [key for key in os.environ if key.startswith("DQ_NOTEBOOK_")]:
        monkeypatch.delenv(key)  # only the settings below, whatever the shell exported
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    by_cell = {cell.id: cell.outputs for cell in notebook.cells if cell.cell_type == "code"}
    outputs = [output for cell_outputs in by_cell.values() for output in cell_outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    return by_cell, printed


def rich(outputs: list, mime: str) -> list:
    """The ``mime`` parts of the values a cell displayed (progress bars are widgets too: pick the cell)."""
    return [o.data[mime] for o in outputs if o.output_type in ("execute_result", "display_data") and mime in o.data]


def value(outputs: list) -> dict:
    """The data of the cell's value (its last expression), the one output that is an ``execute_result``."""
    (result,) = [o for o in outputs if o.output_type == "execute_result"]
    return result.data


def percentages(printed: str, label: str) -> tuple[float, float]:
    """(exact match, token F1) as printed after ``label`` ("before training", ...)."""
    match = re.search(rf"{re.escape(label)}: exact match ([\d.]+)%.*?token F1 ([\d.]+)%", printed)
    assert match, f"no {label!r} accuracy line in:\n{printed}"
    return float(match.group(1)), float(match.group(2))


# ---- committed form (fast) ----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.stem)
def test_notebook_is_committed_clean_with_colab_install_and_parameters(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit the notebook without outputs"
    assert 'if "google.colab" in sys.modules' in code[0].source and "pip install" in code[0].source
    parameters = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and parameters[0] is code[1], "the second code cell, and only it, is tagged 'parameters'"
    assert 'os.environ.get("DQ_NOTEBOOK_MODEL"' in parameters[0].source
    assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_every_notebook_is_in_the_readme_with_its_colab_badge():
    names = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
    assert {"01_quickstart.ipynb", "02_finetune_qwen2_vl.ipynb", "03_finetune_llama32_vision.ipynb"} <= set(names)
    readme = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert COLAB_BADGE.format(name) in readme, name
    used = "".join(path.read_text(encoding="utf-8") for path in NOTEBOOKS.glob("*.ipynb"))
    variables, documented = set(re.findall(r"DQ_NOTEBOOK_[A-Z_]+", used)), set(re.findall(r"DQ_NOTEBOOK_[A-Z_]+", readme))
    assert variables and variables <= documented, f"undocumented: {variables - documented}"


def test_default_parameters_are_the_hub_models():
    def parameters(name):
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        return next(cell.source for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))

    assert '"Qwen/Qwen2-VL-2B-Instruct"' in parameters("01_quickstart.ipynb")
    assert '"Qwen/Qwen2-VL-2B-Instruct"' in parameters("02_finetune_qwen2_vl.ipynb")
    assert '"unsloth/Llama-3.2-11B-Vision-Instruct"' in parameters("03_finetune_llama32_vision.ipynb")


# ---- headless runs ------------------------------------------------------------------------------


def test_quickstart_runs_headless(tiny_path, tmp_path, monkeypatch):
    model = qwen2_vl_model(tiny_path)
    env = {
        "DQ_NOTEBOOK_MODEL": str(model),
        "DQ_NOTEBOOK_DATA": "shapes" if model == DEMO_MODEL else "default",
        "DQ_NOTEBOOK_SAMPLES": "2",
        "DQ_NOTEBOOK_EVAL_SAMPLES": "2",
        "DQ_NOTEBOOK_MAX_NEW_TOKENS": "6",
        "DQ_NOTEBOOK_OUTPUT": "out",
    }
    outputs, printed = execute("01_quickstart.ipynb", tmp_path, monkeypatch, env)

    assert "uniform 4-bit vs 16-bit: KL" in printed and "predicted KL" in printed
    assert len(rich(outputs["plot"], "image/png")) >= 2  # report.plot(): weight and activation panels at least
    assert "sensitivity" in value(outputs["worst"])["text/html"]  # report.worst(10)
    assert WIDGET_MIME in value(outputs["compare"])  # the CompareView
    summary = value(outputs["summary"])["text/html"]  # result.summary
    assert "gap closed %" in summary and all(variant in summary for variant in ("16bit", "4bit", "dynamic"))
    plan = dq.Plan.load(tmp_path / "out" / "dq_plan.json")
    assert plan.source == "budget" and plan.keep
    assert "same plan: True" in printed


def test_finetune_qwen2_vl_runs_headless(tiny_path, tmp_path, monkeypatch):
    env = {"DQ_NOTEBOOK_MODEL": str(qwen2_vl_model(tiny_path)), **TINY_TRAINING}
    outputs, printed = execute("02_finetune_qwen2_vl.ipynb", tmp_path, monkeypatch, env)

    for label in ("before training", "after training", "merged + re-quantized"):
        exact, f1 = percentages(printed, label)
        assert 0 <= exact <= f1 <= 100
    assert "2 steps, mean training loss" in printed
    assert "answer:" in printed and "expected:" in printed and rich(outputs["generate"], "image/png")  # the image asked about
    assert rich(outputs["train"], WIDGET_MIME)  # the LiveLossCallback panel
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "merged-dynamic" / "dq_plan.json").is_file()


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3", "smolvlm", "lfm2_vl"])
def test_finetune_notebook_runs_on_todays_families(tiny_path, tmp_path, monkeypatch, family):
    env = {"DQ_NOTEBOOK_MODEL": str(tiny_path(family)), **TINY_TRAINING}
    outputs, printed = execute("02_finetune_qwen2_vl.ipynb", tmp_path, monkeypatch, env)
    assert "2 steps, mean training loss" in printed
    for label in ("before training", "after training", "merged + re-quantized"):
        percentages(printed, label)
    assert (tmp_path / "out" / "merged-dynamic" / "dq_plan.json").is_file()


def test_finetune_llama32_vision_runs_headless_on_a_hub_style_dataset(tiny_path, tmp_path, monkeypatch):
    """Tiny Mllama, trained on a local parquet dataset with its own column names (the DATASET + COLUMNS path)."""
    from datasets import Dataset, Image

    rows = dq.data.shapes_dataset(12, seed=3, task="colour", test_size=None)
    raw = Dataset.from_dict(
        {
            "picture": [row["images"][0] for row in rows],
            "query": [row["messages"][0]["content"][1]["text"] for row in rows],
            "label": [row["answer"] for row in rows],
        }
    ).cast_column("picture", Image())
    data_dir = tmp_path / "my_dataset"
    data_dir.mkdir()
    raw.to_parquet(data_dir / "train.parquet")
    env = {
        "DQ_NOTEBOOK_MODEL": str(tiny_path("mllama")),
        "DQ_NOTEBOOK_DATASET": str(data_dir),
        "DQ_NOTEBOOK_COLUMNS": json.dumps({"image": "picture", "question": "query", "answer": "label"}),
        "DQ_NOTEBOOK_ANALYZE": "1",
        "DQ_NOTEBOOK_SAMPLES": "3",
        **TINY_TRAINING,
    }
    outputs, printed = execute("03_finetune_llama32_vision.ipynb", tmp_path, monkeypatch, env)

    assert "4 training rows, 2 held-out rows" in printed and "What colour is the shape?" in printed
    measured = dq.Plan.load(tmp_path / "out" / "dq_plan.json")  # sequential analysis on 3 training rows, +10%, preset kept
    assert "QuantReport: mllama" in printed and "sensitivity" in rich(outputs["analyze"], "text/html")[0]
    assert "model.language_model.layers.3.cross_attn.o_proj" in measured.keep and len(measured.keep) > 1
    cross_attention = value(outputs["load"])["text/html"]
    assert "model.language_model.layers.3.cross_attn.o_proj" in cross_attention  # kept: not the first cross-attention layer
    for label in ("before training", "after training", "merged + re-quantized"):
        percentages(printed, label)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    merged_plan = dq.Plan.load(tmp_path / "out" / "merged-dynamic" / "dq_plan.json")
    assert set(merged_plan.keep) == set(measured.keep)  # trained and re-quantized with the measured plan
