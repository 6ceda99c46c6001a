"""dq_kit.planning.refine: measured plans are never worse than the report-only plan on calibration KL."""

from __future__ import annotations

import pytest
import torch

import dq_kit as dq
from dq_kit.analysis import analyze
from dq_kit.data.calibration import default_calibration
from dq_kit.planning.refine import Refiner, refine_plan


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tokenizer = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
    calibration = default_calibration(n=4, seed=3, images=False)
    report = analyze(model, tokenizer, calibration, metrics=("weight", "sensitivity"), progress=False)
    report.meta.setdefault("bytes_4bit", dq.estimate_memory(model, dq.Plan.uniform(model)).bytes_4bit)
    report.meta.setdefault("output_heads", dq.registry.output_head_names(model))
    refiner = Refiner(model, report, calibration, tokenizer, progress=False)
    return model, tokenizer, calibration, report, refiner


def test_refined_plan_not_worse_on_calibration(setup):
    model, _, _, report, refiner = setup
    uniform_bytes = dq.estimate_memory(model, dq.Plan.uniform(model)).bytes_plan
    for budget in (0.10, 0.30):
        base = dq.plan(report, budget)
        refined = refiner.plan(budget)
        assert refined.source == "refined"
        assert refiner.kl(refined.keep) <= refiner.kl(base.keep) + 1e-12
        assert dq.estimate_memory(model, refined).bytes_plan - uniform_bytes <= budget * report.meta["bytes_4bit"]
        assert all("rule" in reason for reason in refined.reasons.values())


def test_kl_is_measured_exactly(setup):
    """Block replay gives the same KL as a plain forward; keeping everything gives KL 0."""
    model, tokenizer, calibration, report, refiner = setup
    plain = Refiner(model, report, calibration, tokenizer, cache_blocks=False, progress=False)
    names = list(report.table["module"])
    keep = [n for n in names if n.startswith("model.layers.1.")]
    assert refiner.kl(keep) == pytest.approx(plain.kl(keep), rel=1e-5)
    assert refiner.kl([]) == pytest.approx(report.meta["kl_uniform"], rel=1e-5)
    assert refiner.kl(names) == pytest.approx(0.0, abs=1e-9)


def test_refine_plan_respects_forced_modules(setup):
    model, tokenizer, calibration, report, _ = setup
    forced = "model.layers.0.mlp.down_proj"
    plan = refine_plan(model, report, 0.30, calibration, tokenizer, keep=[forced], progress=False)
    assert forced in plan.keep
    assert not model.training
    dq.quantize(dq.tiny.build_tiny_model("llama"), plan)  # the plan applies to the architecture


def test_refined_planning_leaves_the_report_untouched():
    model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
    texts = ["A red circle on a blue background.", "Two green squares."]
    report = dq.analyze(model, tok, texts, progress=False)
    heads = report.meta.pop("output_heads")
    del report.meta["bytes_4bit"]
    before = dict(report.meta)
    plan = dq.Refiner(model, report, texts, tok, progress=False).plan(0.5)
    assert plan.source == "refined"
    assert report.meta == before
    assert set(plan.fixed) == set(heads) == set(dq.registry.output_head_names(model))
