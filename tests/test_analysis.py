"""dq.analyze on tiny models of every family: complete reports, planted outliers, sequential mode, bad input."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import torch
from torch import nn

import dq_kit as dq
from dq_kit.analysis import AnalysisError, QuantReport, analyze, quantizable_modules
from dq_kit.analysis.sequential import _Layout
from dq_kit.data.calibration import default_calibration
from dq_kit.models.resolution import meta_model, resolve_config, shipped_hub_ids

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "mllama", "llava", "llama")
COLUMNS = {"module", "tower", "group", "layer", "numel", "bytes_16bit", "bytes_nf4", "weight_error", "weight_rel_error",
           "weight_max_abs_error", "weight_outlier_ratio", "weight_kurtosis", "act_local_error", "act_accum_error",
           "sensitivity", "issues"}


def _calibration(family: str, n: int = 4):
    return default_calibration(n=n, images=family != "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_complete_report_for_every_family(family, tiny_path, tmp_path):
    model, processor = dq.load(tiny_path(family), quant="16bit")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = analyze(model, processor, _calibration(family), progress=False)

    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # not modified
    assert all(p.grad is None for p in model.parameters())
    assert COLUMNS <= set(report.table.columns)
    names = {info.name for info in quantizable_modules(model)}
    assert set(report.table["module"]) == names and "lm_head" not in names
    assert report.table[["weight_error", "weight_rel_error", "act_local_error", "act_accum_error", "sensitivity"]].notna().all().all()
    assert report.table["weight_rel_error"].between(0.05, 0.15).all()  # NF4 on Gaussian weights: ~9%
    assert (report.table["bytes_nf4"] < report.table["bytes_16bit"]).all()
    towers = set(report.table["tower"])
    assert towers == ({"language"} if family == "llama" else {"vision", "projector", "language"})
    assert len(report.blocks) >= 2 and report.blocks["act_accum_error"].notna().all()
    meta = report.meta
    assert meta["model_type"] == model.config.model_type and meta["calibration_samples"] == 4
    assert meta["kl_uniform"] > 0 and 0 <= meta["top1_agreement"] <= 1
    assert meta["sensitivity_sum"] == pytest.approx(meta["kl_uniform"], rel=0.7)  # second order, interactions ignored

    loaded = QuantReport.load(report.save(tmp_path / "report.json"))
    assert loaded.table["module"].tolist() == report.table["module"].tolist()
    assert loaded.table["sensitivity"].tolist() == pytest.approx(report.table["sensitivity"].tolist())
    assert loaded.meta["kl_uniform"] == pytest.approx(meta["kl_uniform"])
    assert len(loaded.blocks) == len(report.blocks)
    assert report.worst(3)["sensitivity"].is_monotonic_decreasing
    figures = report.plot()
    assert len(figures) == 3
    assert {ax.get_title() for ax in figures[0].axes} == ({"Language model"} if family == "llama" else {"Vision tower", "Language model"})
    matplotlib.pyplot.close("all")


@pytest.mark.parametrize(
    ("family", "target"),
    [("llama", "model.layers.0.mlp.gate_proj"), ("qwen2_vl", "model.language_model.layers.0.mlp.gate_proj")],
)
def test_planted_outliers_rank_first(family, target):
    """One input channel of one module made 100x larger: that module ranks first by weight error and sensitivity."""
    model = dq.tiny.build_tiny_model(family)
    with torch.no_grad():
        model.get_submodule(target).weight[:, 5] *= 100
    report = analyze(model, dq.tiny.tiny_processor(family), _calibration(family), estimator="both", progress=False)
    assert report.worst(1, by="weight_error")["module"][0] == target
    assert report.worst(1, by="sensitivity")["module"][0] == target
    assert report.worst(1, by="sensitivity_loo")["module"][0] == target
    assert report.meta["spearman_fisher_loo"] > 0.7


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_matches_whole_model(family, tiny_path):
    path = tiny_path(family)
    # a text-only sample too: Mllama then skips its cross-attention layers, and so must the sequential run
    calibration = _calibration(family, n=3) + ["A text-only line about a small green triangle."]
    sequential = analyze(path, calibration=calibration, sequential=True, progress=False)
    whole = analyze(path, calibration=calibration, progress=False)
    assert sequential.meta["sequential"] and not whole.meta["sequential"]
    assert sequential.table["module"].tolist() == whole.table["module"].tolist()
    for column in ("weight_error", "act_local_error", "act_accum_error", "sensitivity"):
        assert sequential.table[column].notna().all(), column
        assert sequential.table[column].tolist() == pytest.approx(whole.table[column].tolist(), rel=1e-4, abs=1e-9), column
    assert sequential.blocks["block"].tolist() == whole.blocks["block"].tolist()
    for column in ("act_local_error", "act_accum_error"):
        assert sequential.blocks[column].tolist() == pytest.approx(whole.blocks[column].tolist(), rel=1e-4), column
    assert sequential.meta["kl_uniform"] == pytest.approx(whole.meta["kl_uniform"], rel=1e-4)
    assert sequential.meta["scored_tokens"] == whole.meta["scored_tokens"]


def test_sequential_mllama_vision_gradients_from_a_sharded_checkpoint(tmp_path):
    """Open cross-attention gates (trained Llama 3.2 Vision has them open; the tiny model starts closed)
    let the loss gradient reach the vision tower through the cross-attention states."""
    model = dq.tiny.build_tiny_model("mllama")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.8)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    dq.tiny.tiny_processor("mllama").save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    calibration = _calibration("mllama", n=2)
    sequential = analyze(tmp_path, calibration=calibration, sequential=True, progress=False)
    whole = analyze(tmp_path, calibration=calibration, progress=False)
    vision = sequential.table["tower"] == "vision"
    assert (sequential.table.loc[vision, "sensitivity"] > 0).all()
    assert sequential.table["sensitivity"].tolist() == pytest.approx(whole.table["sensitivity"].tolist(), rel=1e-4, abs=1e-12)
    assert sequential.table["act_accum_error"].tolist() == pytest.approx(whole.table["act_accum_error"].tolist(), rel=1e-4)


@pytest.mark.parametrize("hub_id", shipped_hub_ids())
def test_sequential_layout_of_real_models(hub_id):
    """The front / layers / head split on the real configs: the vision tower and projector (of a VLM) stay in
    memory, every language layer streams."""
    skeleton = meta_model(resolve_config(hub_id))
    layout = _Layout.of(skeleton)
    assert len(layout.layer_names) == skeleton.config.get_text_config().num_hidden_layers
    towers = {info.name: info.tower for info in quantizable_modules(skeleton)}
    vlm = {"vision", "projector"} & set(towers.values())  # Gemma 3's projector is a weight matrix, not a Linear
    assert {tower for name, tower in towers.items() if layout.in_front(name)} == vlm
    assert all(layout.in_trunk(name) for name, tower in towers.items() if tower == "language")


def test_metric_subsets_and_options():
    model, tokenizer = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
    weights_only = analyze(model, tokenizer, None, metrics=("weight",), progress=False)
    assert "weight_error" in weights_only.table and "sensitivity" not in weights_only.table
    assert "kl_uniform" not in weights_only.meta
    fp4 = analyze(model, tokenizer, ["A red circle."], metrics="activation", quant_type="fp4", progress=False)
    assert "weight_error" not in fp4.table and fp4.table["act_accum_error"].notna().all()
    for bad in ({"metrics": ("speed",)}, {"quant_type": "int4"}, {"blocksize": 60}, {"estimator": "magic"}):
        with pytest.raises(AnalysisError):
            analyze(model, tokenizer, ["x"], progress=False, **bad)


def test_non_finite_weights_are_refused_naming_the_modules(tiny_path, tmp_path):
    model, tokenizer = dq.load(tiny_path("llama"), quant="16bit")
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").weight[0, :3] = float("nan")
        model.get_submodule("model.layers.0.self_attn.q_proj").weight[1, 1] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    with pytest.raises(AnalysisError, match=r"2 module\(s\) have NaN/inf weights: .*q_proj \(1 value.*up_proj \(3 value"):
        analyze(tmp_path / "broken", tokenizer, ["A red circle on a blue background."], progress=False)
    with pytest.raises(AnalysisError, match=r"NaN/inf weights: model.layers.0.self_attn.q_proj \(1 value"):  # the first streamed
        analyze(tmp_path / "broken", tokenizer, ["A red circle on a blue background."], sequential=True, progress=False)


def test_clear_errors(tiny_path, tmp_path):
    with pytest.raises(AnalysisError, match="no quantizable Linear"):
        analyze(nn.Sequential(nn.ReLU()), calibration=["x"], progress=False)
    llama = dq.tiny.build_tiny_model("llama")
    with pytest.raises(AnalysisError, match="text-only: the processor does not belong"):
        analyze(llama, dq.tiny.tiny_processor("qwen2_vl"), default_calibration(n=1), progress=False)
    with pytest.raises(AnalysisError, match="image token is not the model's"):
        analyze(dq.tiny.build_tiny_model("qwen2_vl"), dq.tiny.tiny_processor("llava"), default_calibration(n=1), progress=False)
    quantized, tokenizer = dq.load(tiny_path("llama"), quant="4bit")
    with pytest.raises(AnalysisError, match="quant='16bit'"):
        analyze(quantized, tokenizer, ["x"], progress=False)
    with pytest.raises(AnalysisError, match="Download it first"):
        analyze("no-such-org/no-such-model", calibration=["x"], sequential=True, progress=False)  # offline in the tests
    with pytest.raises(AnalysisError, match="neither"):
        analyze(tmp_path / "missing", calibration=["x"], sequential=True, progress=False)
    with pytest.raises(AnalysisError, match="folder path"):
        analyze(llama, calibration=["x"], sequential=True, progress=False)
    with pytest.raises(AnalysisError, match="estimator='fisher'"):
        analyze(tiny_path("llama"), calibration=["x"], sequential=True, estimator="loo", progress=False)
    corrupt = tmp_path / "report.json"
    corrupt.write_text('{"format": "dq_kit.quant_report", "modules": [')
    with pytest.raises(AnalysisError, match="not valid JSON"):
        QuantReport.load(corrupt)
    corrupt.write_text('{"format": "something else"}')
    with pytest.raises(AnalysisError, match="Not a dq_kit report"):
        QuantReport.load(corrupt)
    with pytest.raises(AnalysisError, match="not found"):
        QuantReport.load(tmp_path / "missing.json")


def test_packed_weights_and_gradient_hooks_change_no_number(monkeypatch):
    """The memory-saving path (4-bit weights kept packed, gradients scored and freed as backward
    produces them) gives the numbers of the plain path (every round trip and gradient held) bit for bit."""
    import contextlib

    import dq_kit.analysis.run as run
    from dq_kit.analysis.sensitivity import FisherAccumulator
    from dq_kit.analysis.weights import quantize_roundtrip

    model, tokenizer = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
    calibration = ["A red circle on a blue background.", "Two green squares and a yellow triangle."]
    packed = analyze(model, tokenizer, calibration, corrections=True, progress=False)

    class HeldRoundTrips(dict):
        def __init__(self, *settings):
            super().__init__()
            self.settings = settings

        def add(self, name, weight):
            self[name] = quantize_roundtrip(weight, *self.settings)
            return self[name]

    monkeypatch.setattr(run, "QuantizedWeights", HeldRoundTrips)
    monkeypatch.setattr(FisherAccumulator, "consuming_gradients", lambda self: contextlib.nullcontext())
    held = analyze(model, tokenizer, calibration, corrections=True, progress=False)
    columns = [c for c in packed.table.columns if c != "issues"]
    pd.testing.assert_frame_equal(packed.table[columns], held.table[columns])
    assert packed.meta["kl_uniform"] == held.meta["kl_uniform"]
