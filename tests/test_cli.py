"""The dq-kit command line: analyze a saved tiny model from a calibration file."""

from __future__ import annotations

import json

import dq_kit as dq
from dq_kit.analysis import QuantReport
from dq_kit.cli import build_parser, main


def test_analyze_command_with_calibration_file(tiny_path, tmp_path, capsys):
    dq.tiny.tiny_image(seed=1).save(tmp_path / "shape.png")
    sample = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red square on a blue background."}]},
        ],
        "images": ["shape.png"],  # relative to the calibration file
    }
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps(sample) + "\n" + json.dumps(sample) + "\n")
    out = tmp_path / "report.json"
    status = main(["analyze", str(tiny_path("qwen2_vl")), "--calib", str(calib), "--out", str(out), "--quiet",
                   "--metrics", "weight", "activation", "--plots", str(tmp_path / "figures")])
    assert status == 0
    report = QuantReport.load(out)
    assert report.meta["calibration_samples"] == 2 and "act_accum_error" in report.table
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["analysis_0.png", "analysis_1.png"]
    assert "Report written to" in capsys.readouterr().out


def test_analyze_command_sequential_default_calibration(tiny_path, tmp_path):
    out = tmp_path / "report.json"
    assert main(["analyze", str(tiny_path("llama")), "--n-calib", "3", "--sequential", "--out", str(out), "--quiet"]) == 0
    report = QuantReport.load(out)
    assert report.meta["sequential"] and report.meta["calibration_samples"] == 3


def test_bad_input_exits_with_a_message(tiny_path, tmp_path, capsys):
    status = main(["analyze", str(tiny_path("llama")), "--calib", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r.json")])
    assert status == 2
    assert "Calibration file not found" in capsys.readouterr().err
    assert build_parser().parse_args(["analyze", "m", "--out", "r.json"]).estimator == "fisher"


def test_plan_and_memory_commands(tiny_path, tmp_path, capsys):
    report_file = tmp_path / "report.json"
    assert main(["analyze", str(tiny_path("llama")), "--n-calib", "3", "--out", str(report_file), "--quiet"]) == 0
    plan_file = tmp_path / "plan.json"
    assert main(["plan", str(report_file), "--budget", "0.3", "--out", str(plan_file)]) == 0
    plan = dq.Plan.load(plan_file)
    assert plan.source == "budget" and plan.keep
    assert "predicted KL" in capsys.readouterr().out
    assert main(["memory", str(tiny_path("llama")), "--plan", str(plan_file)]) == 0
    assert f"{len(plan.keep)} module(s) in 16-bit" in capsys.readouterr().out
    assert main(["plan", str(report_file), "--budget", "-1", "--out", str(plan_file)]) == 2
    assert "budget must be >= 0" in capsys.readouterr().err
