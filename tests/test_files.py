"""No writer deletes what it did not write, every save is atomic, and killed saves leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import dq_kit as dq
from dq_kit import files

WRITERS = ["plan.save", "report.save", "dq.save", "save_adapter", "merge_to_16bit"]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-swap", "move-aside"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_output(tmp_path, exchange):
    """Each writer is killed before each of its file-system calls in turn (tests/kill_writers.py)."""
    command = [sys.executable, str(Path(__file__).with_name("kill_writers.py")), str(tmp_path), *WRITERS]
    if not exchange:
        command.append("--no-exchange")
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "DQ_PROGRESS": "0"}, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for writer in WRITERS:
        result = results[writer]
        assert result["steps"] >= 3, (writer, result)
        assert len(result["states"]) == result["steps"], writer
        assert set(result["states"]) <= {"a", "b"}, f"{writer}: a kill left neither the old nor the new output: {result['states']}"
        assert result["states"][0] == "a", writer
        assert result["strays"] == [], f"{writer}: a later save left {result['strays']}"
    assert "b" in results["dq.save"]["states"], "the kill points reach past the swap"


@pytest.fixture(scope="module")
def peft_model():
    model = dq.quantize(dq.tiny.build_tiny_model("llama"))
    return dq.add_lora(model, r=2, gradient_checkpointing=False)


def _thesis_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    return folder


def test_save_adapter_refuses_a_folder_with_other_files_and_a_file(peft_model, tmp_path):
    folder = _thesis_folder(tmp_path)
    with pytest.raises(dq.DQError, match=r"holds other files \(thesis.txt\) and is not a LoRA adapter.*overwrite=True"):
        dq.save_adapter(peft_model, folder)
    assert (folder / "thesis.txt").read_text() == "years of work"
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(dq.DQError, match="is a file; refusing to replace it"):
        dq.save_adapter(peft_model, file)
    assert file.read_text() == "mine"
    adapter = dq.save_adapter(peft_model, tmp_path / "adapter")
    assert dq.save_adapter(peft_model, adapter) == adapter  # an earlier adapter is replaced
    dq.save_adapter(peft_model, folder, overwrite=True)
    assert (folder / "adapter_config.json").is_file() and not (folder / "thesis.txt").exists()


def test_merge_refuses_before_it_consumes_the_model(peft_model, tmp_path):
    folder = _thesis_folder(tmp_path)
    with pytest.raises(dq.DQError, match="not a model checkpoint"):
        dq.merge_to_16bit(peft_model, path=folder)
    assert (folder / "thesis.txt").is_file()
    assert any("lora_A" in name for name, _ in peft_model.named_parameters()), "the PEFT model is untouched"


def test_json_writers_refuse_other_files_and_folders(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    plan = dq.Plan(keep=("lm_head",))
    report = dq.QuantReport(pd.DataFrame({"module": ["a"], "weight_error": [0.1]}))
    for writer in (plan.save, report.save):
        with pytest.raises(dq.DQError, match="is a file that is not a dq_kit"):
            writer(notes)
        assert notes.read_text() == "mine"
        with pytest.raises(dq.DQError, match="is a folder"):
            writer(tmp_path)
    plan.save(tmp_path / "plan.json")
    plan.save(tmp_path / "plan.json")  # an earlier plan is replaced
    with pytest.raises(dq.DQError, match="not a dq_kit report"):
        report.save(tmp_path / "plan.json")
    report.save(notes, overwrite=True)
    assert dq.QuantReport.load(notes).table["module"].tolist() == ["a"]


def test_report_factors_are_replaced_with_the_report_and_foreign_files_kept(tmp_path):
    table = pd.DataFrame({"module": ["m"], "weight_error": [0.1], "in_features": [4], "out_features": [3]})
    report = dq.QuantReport(table, corrections={"m": (torch.ones(2, 4), torch.ones(3, 2))})
    foreign = tmp_path / "r.corrections.safetensors"
    foreign.write_bytes(b"not ours")
    path = report.save(tmp_path / "r.json")
    report.save(path)
    factor_files = sorted(p.name for p in tmp_path.glob("r.corrections.*.safetensors"))
    assert len(factor_files) == 1 and foreign.read_bytes() == b"not ours"
    assert set(dq.QuantReport.load(path).corrections) == {"m"}


def test_stale_staging_is_removed_and_a_live_one_kept(tmp_path):
    target = tmp_path / "out.json"
    dead = tmp_path / ".out.json.999999999.abcdefgh.tmp"
    legacy = tmp_path / ".out.json.abcdefgh.tmp"
    live = tmp_path / f".out.json.{os.getpid()}.abcdefgh.tmp"
    unrelated = tmp_path / ".other.json.999999999.abcdefgh.tmp"
    for entry in (dead, legacy, live, unrelated):
        entry.mkdir()
        (entry / "big.bin").write_bytes(b"0" * 100)
    dq.Plan().save(target)
    assert not dead.exists() and not legacy.exists()
    assert live.exists() and unrelated.exists()


def test_an_output_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    model_dir = dq.tiny.save_tiny("llama", tmp_path / "model")
    aside = tmp_path / ".model.999999999.abcdefgh.old"
    os.replace(model_dir, aside)
    with pytest.warns(UserWarning, match="previous output was put back"):
        dq.load(model_dir, quant="16bit", processor=False)
    assert model_dir.is_dir() and not aside.exists()


def test_the_swap_falls_back_where_the_os_cannot_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    output = files.Output("demo", marker="a.txt")
    for text in ("old", "new"):
        with files.atomic_directory(tmp_path / "out", output) as staging:
            (staging / "a.txt").write_text(text)
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_save_leaves_the_old_output(tmp_path):
    output = files.Output("demo", marker="a.txt")
    with files.atomic_directory(tmp_path / "out", output) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), files.atomic_directory(tmp_path / "out", output) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_between_the_two_moves_puts_the_old_output_back(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    output = files.Output("demo", marker="a.txt")
    with files.atomic_directory(tmp_path / "out", output) as staging:
        (staging / "a.txt").write_text("old")
    real, calls = os.replace, []

    def second_move_fails(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise OSError("the disk went away")
        return real(source, target)

    monkeypatch.setattr(os, "replace", second_move_fails)
    with pytest.raises(OSError, match="disk went away"), files.atomic_directory(tmp_path / "out", output) as staging:
        (staging / "a.txt").write_text("new")
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
