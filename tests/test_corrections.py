"""Error-correcting low-rank adapters: fit, score, plan, apply, save, reload without dq_kit, fine-tune."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dq_kit as dq
from dq_kit.analysis.corrections import InputMoments, fit_correction, fit_from_moments
from dq_kit.quant.corrections import ADAPTER_NAME, correction_ranks
from dq_kit.quant.memory import report_memory

CALIBRATION = [
    "A red circle on a blue background.",
    "Two blue squares and a green triangle.",
    "The cat sat on the mat next to a yellow star.",
    "Quantization hurts small models more than large ones.",
    "Describe the picture: three small purple circles.",
    "What colour is the square? It is orange.",
]
RANKS = (2, 4, 8)


def kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    ref = torch.log_softmax(reference.float(), -1)
    return float((ref.exp() * (ref - torch.log_softmax(logits.float(), -1))).sum(-1).mean())


@pytest.fixture(scope="module")
def llama(tiny_path):
    path = tiny_path("llama")
    model, tokenizer = dq.load(path, quant="16bit")
    report = dq.analyze(model, tokenizer, CALIBRATION, corrections=True, ranks=RANKS, progress=False)
    inputs = tokenizer("Two red squares and a blue circle on the mat.", return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits
    return path, model, tokenizer, report, inputs, reference


def test_activation_weighted_fit_beats_plain_svd_on_the_inputs():
    torch.manual_seed(0)
    x = torch.randn(2048, 48) * torch.logspace(-1, 0.7, 48)
    delta = torch.randn(32, 48) * 0.01
    a, b = fit_correction(delta, x.T @ x / len(x), rank=6)
    u, s, vh = torch.linalg.svd(delta)
    plain = u[:, :6] * s[:6] @ vh[:6]
    error = lambda d: float((x @ d.T).norm())
    assert error(delta - (b @ a).float()) < 0.9 * error(delta - plain) < error(delta)


def test_shared_inputs_share_one_second_moment(llama):
    _, model, tokenizer, *_ = llama
    attention = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    modules = {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj, "o": attention.o_proj,
               "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    with InputMoments(modules) as moments, torch.no_grad():
        model(**tokenizer("A red circle.", return_tensors="pt"))
    assert moments.owner["k"] == moments.owner["v"] == "q" and moments.owner["up"] == "gate"
    assert set(moments.sums) == {"q", "o", "gate", "down"}
    assert torch.equal(moments.moment("k"), moments.moment("q"))


def test_analysis_records_gains_and_factors(llama):
    *_, report, _, _ = llama
    table = report.table
    assert report.correction_ranks == list(RANKS) and report.meta["correction_ranks"] == list(RANKS)
    assert set(report.corrections) == set(table["module"])
    for row in table.itertuples():
        a, b = report.corrections[row.module]
        assert a.shape == (max(RANKS), row.in_features) and b.shape == (row.out_features, max(RANKS))
        assert a.dtype == b.dtype == torch.bfloat16
        gains = [getattr(row, f"gain_r{r}") for r in RANKS]
        assert all(g <= row.sensitivity_full + 1e-12 for g in gains)  # a gain is the part of the full-Fisher KL removed
    recovered = [table[f"gain_r{r}"].sum() for r in RANKS]
    assert 0 < recovered[0] < recovered[1] < recovered[2] < table["sensitivity_full"].sum()  # more rank, more of the KL back


def test_sequential_analysis_gives_the_same_corrections(llama):
    path, _, tokenizer, report, *_ = llama
    streamed = dq.analyze(path, tokenizer, CALIBRATION, corrections=True, ranks=RANKS, sequential=True, progress=False)
    for rank in RANKS:
        column = f"gain_r{rank}"
        assert torch.allclose(torch.tensor(streamed.table[column].values), torch.tensor(report.table[column].values), rtol=1e-2, atol=1e-9)
    for name, (a, b) in report.corrections.items():
        product = (b.float() @ a.float())
        other = streamed.corrections[name][1].float() @ streamed.corrections[name][0].float()
        assert torch.allclose(product, other, rtol=2e-2, atol=2e-2 * float(product.abs().max()))


def test_ranks_above_the_module_size_are_skipped_with_a_reason(tiny_path):
    model, tokenizer = dq.load(tiny_path("llama"), quant="16bit")
    report = dq.analyze(model, tokenizer, CALIBRATION[:2], corrections=True, ranks=(4, 4096), progress=False)
    assert report.table["gain_r4096"].isna().all()
    assert report.meta["correction_ranks_skipped"] == {"4096": len(report.table)}
    assert not report.table["issues"].astype(bool).any()
    assert all(reason["choice"] == "nf4+r4" for reason in dq.plan(report, budget=0.5, menu="corrections").reasons.values()
               if "choice" in reason)
    assert report.table["gain_r4"].notna().all()


def test_non_finite_factors_fall_back_to_nf4():
    layer = torch.nn.Linear(8, 8)
    with InputMoments({"layer": layer}) as moments:
        layer(torch.randn(16, 8))
    factors, notes = fit_from_moments(moments, lambda name: torch.full((8, 8), float("nan")), [4])
    assert factors == {} and notes["layer"] == ["non-finite correction factors: left at NF4"]


def test_corrections_need_the_fisher_sensitivity(tiny_path):
    model, tokenizer = dq.load(tiny_path("llama"), quant="16bit")
    with pytest.raises(dq.AnalysisError, match="estimator='fisher'"):
        dq.analyze(model, tokenizer, CALIBRATION[:1], metrics=("weight",), corrections=True, progress=False)


def test_report_round_trip_and_bad_factor_files(llama, tmp_path):
    *_, report, _, _ = llama
    path = report.save(tmp_path / "r.json")
    factors = tmp_path / json.loads(path.read_text())["meta"]["corrections_file"]
    assert factors.is_file() and factors.name.startswith("r.corrections.")
    loaded = dq.QuantReport.load(path)
    assert loaded.has_corrections and loaded.correction_ranks == list(RANKS)
    for name, (a, b) in report.corrections.items():
        assert torch.equal(loaded.corrections[name][0], a) and torch.equal(loaded.corrections[name][1], b)

    data = json.loads(path.read_text())
    data["modules"][0]["in_features"] += 1  # the factors no longer fit the report's module
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(dq.AnalysisError, match=f"does not match its report: {data['modules'][0]['module']!r}"):
        dq.QuantReport.load(broken)
    factors.unlink()
    with pytest.raises(dq.AnalysisError, match=f"missing: .*{factors.name}"):
        dq.QuantReport.load(path)


def test_menus_and_budget(llama):
    *_, report, _, _ = llama
    keep_only = dq.plan(report, budget=0.2, menu="keep")
    legacy = dq.plan(dq.QuantReport(report.table.drop(columns=[f"gain_r{r}" for r in RANKS]), meta=report.meta), budget=0.2)
    assert keep_only.corrections == {} and keep_only.keep == legacy.keep
    corrected = dq.plan(report, budget=0.2, menu="corrections")
    assert corrected.keep == () and corrected.corrections
    assert all(r in RANKS for r in corrected.corrections.values())
    full = dq.plan(report, budget=0.2)
    capacity = 0.2 * report.meta["bytes_4bit"]
    uniform = report.meta["kl_uniform"]
    for chosen in (keep_only, corrected, full):
        assert report_memory(report, chosen).bytes_plan - report.meta["bytes_4bit"] <= capacity
        assert dq.predicted_kl(report, chosen) < uniform
    # the full menu contains both others, and the knapsack is exact: it predicts at least as well as either
    assert dq.predicted_kl(report, full) <= min(dq.predicted_kl(report, keep_only), dq.predicted_kl(report, corrected)) + 1e-12
    for name, rank in corrected.corrections.items():
        assert corrected.reasons[name]["choice"] == f"nf4+r{rank}" and corrected.reasons[name]["gain"] >= 0


def test_corrections_menu_needs_a_report_with_corrections(tiny_path):
    model, tokenizer = dq.load(tiny_path("llama"), quant="16bit")
    plain = dq.analyze(model, tokenizer, CALIBRATION[:2], progress=False)
    with pytest.raises(dq.PlanError, match=r"corrections=True"):
        dq.plan(plain, budget=0.1, menu="corrections")
    with pytest.raises(dq.PlanError, match="menu must be one of"):
        dq.plan(plain, budget=0.1, menu="everything")
    with pytest.raises(dq.PlanError, match="budget"):
        dq.plan(plain, top_k=2, menu="full")


def test_plan_format_version_2_and_older_plans(tmp_path, llama):
    *_, report, _, _ = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    path = plan.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["version"] == 2
    assert dq.Plan.load(path) == plan
    old = {"format": "dq_kit.plan", "version": 1, "keep": ["model.layers.0.mlp.down_proj"], "fixed": ["lm_head"]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert dq.Plan.load(tmp_path / "old.json").corrections == {}
    with pytest.raises(dq.PlanError, match="both kept in 16-bit and corrected"):
        dq.Plan(keep=("a",), corrections={"a": 4})
    with pytest.raises(dq.PlanError, match="positive integers"):
        dq.Plan(corrections={"a": 0})


def test_plan_with_corrections_needs_its_factors(llama):
    path, _, _, report, *_ = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    with pytest.raises(dq.PlanError, match="report="):
        dq.load(path, quant="dynamic", plan=plan, processor=False)
    partial = dq.QuantReport(report.table, meta=report.meta, corrections=dict(list(report.corrections.items())[:1]))
    with pytest.raises(dq.PlanError, match="without factors"):
        dq.load(path, quant="dynamic", plan=plan, report=partial, processor=False)


def test_load_with_corrections_is_closer_to_16bit_and_verified(llama):
    path, _, _, report, inputs, reference = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    model, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    uniform, _ = dq.load(path, quant="4bit", processor=False)
    assert ADAPTER_NAME in model.peft_config and correction_ranks(model) == plan.corrections
    assert not any(p.requires_grad for p in model.parameters())
    dq.verify(model, plan)
    table = dq.inspect(model).set_index("name")
    assert table["correction"][table["correction"] > 0].to_dict() == plan.corrections and not table.loc[list(plan.corrections), "quantized"].eq(False).any()
    dropped = next(iter(plan.corrections))
    with pytest.raises(dq.VerificationError, match=f"1 correction\\(s\\) in the dq_correction adapter that the plan does not have: {dropped}"):
        dq.verify(model, plan.with_corrections({dropped: 0}))
    with torch.no_grad():
        corrected, plain = model(**inputs).logits, uniform(**inputs).logits
    assert kl(reference, corrected) < 0.7 * kl(reference, plain)
    assert dq.estimate_memory(model.get_base_model(), plan).correction_bytes == report_memory(report, plan).correction_bytes > 0


def test_quantize_in_memory_attaches_the_adapter(llama, tiny_path):
    path, _, _, report, inputs, _ = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    fresh, _ = dq.load(path, quant="16bit", processor=False)
    with pytest.raises(dq.PlanError, match="report="):
        dq.quantize(fresh, plan)
    fresh, _ = dq.load(path, quant="16bit", processor=False)
    quantized = dq.quantize(fresh, plan, report=report)
    loaded, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    with torch.no_grad():
        assert torch.equal(quantized(**inputs).logits, loaded(**inputs).logits)


def test_save_then_plain_transformers_and_peft_reproduce_the_logits(llama, tmp_path):
    path, _, tokenizer, report, inputs, _ = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    plan = plan.with_modules(keep=[next(iter(plan.corrections))])  # that module becomes a 16-bit keep
    assert plan.corrections and plan.keep
    model, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    checkpoint = dq.save(model, tmp_path / "ckpt", processor=tokenizer)
    assert (checkpoint / ADAPTER_NAME / "adapter_config.json").is_file()
    restored, _ = dq.load(checkpoint, processor=False)
    assert restored.dq_plan == plan and correction_ranks(restored) == plan.corrections
    with torch.no_grad():
        expected = restored(**inputs).logits
    torch.save({"input_ids": inputs["input_ids"], "logits": expected}, tmp_path / "expected.pt")
    script = f"""
import sys, torch, transformers, peft
base = transformers.AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, device_map="cpu")
model = peft.PeftModel.from_pretrained(base, {str(checkpoint / ADAPTER_NAME)!r})
saved = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    logits = model(input_ids=saved["input_ids"]).logits
assert "dq_kit" not in sys.modules
print(float((logits - saved["logits"]).abs().max()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) == 0.0


def test_a_16bit_checkpoint_with_a_corrected_plan_carries_its_report(llama, tmp_path):
    path, model, _, report, inputs, _ = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    with pytest.raises(dq.PlanError, match="report="):
        dq.save(model, tmp_path / "bare", plan=plan)
    checkpoint = dq.save(model, tmp_path / "ckpt16", plan=plan, report=report)
    restored, _ = dq.load(checkpoint, processor=False)
    direct, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    with torch.no_grad():
        assert torch.equal(restored(**inputs).logits, direct(**inputs).logits)


def test_lora_starts_from_the_correction(llama):
    path, _, _, report, inputs, reference = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    corrected, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    peft_model = dq.add_lora(corrected, r=2, mlp=False)
    layers = {name: module for name, module in peft_model.get_base_model().named_modules() if hasattr(module, "lora_A")}
    assert ADAPTER_NAME not in peft_model.peft_config
    for name, rank in plan.corrections.items():
        assert layers[name].r["default"] == max(2, rank)
        trainable = layers[name].lora_A["default"].weight.requires_grad
        assert trainable == (".self_attn." in name)  # MLP corrections are kept, frozen, outside the selection
    peft_model.eval()
    merged_reference = dq.merge_to_16bit(peft_model)
    with torch.no_grad():
        step0 = merged_reference(**inputs).logits
    standard, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    plain_start = dq.merge_to_16bit(dq.add_lora(standard, r=2, mlp=False, init="standard"))
    with torch.no_grad():
        nf4 = plain_start(**inputs).logits
    assert kl(reference, step0) < 0.7 * kl(reference, nf4)


def test_vision_language_model_end_to_end(tiny_path):
    path = tiny_path("qwen2_vl")
    model, processor = dq.load(path, quant="16bit")
    calibration = dq.default_calibration(n=3)
    report = dq.analyze(model, processor, calibration, corrections=True, ranks=(4, 8), progress=False)
    assert set(report.corrections) == set(report.table["module"])
    assert report.table.loc[report.table["tower"] == "vision", "gain_r8"].notna().all()
    plan = dq.plan(report, budget=0.2)
    loaded, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    dq.verify(loaded, plan)
    streamed = dq.analyze(path, processor, calibration, corrections=True, ranks=(4, 8), sequential=True, progress=False)
    assert set(streamed.corrections) == set(report.corrections)


def test_cli_analyze_and_plan_with_corrections(tiny_path, tmp_path):
    from dq_kit.cli import main

    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(CALIBRATION[:3]))
    report_file = tmp_path / "report.json"
    assert main(["analyze", str(tiny_path("llama")), "--calib", str(calib), "--out", str(report_file), "--corrections", "--quiet"]) == 0
    assert len(list(tmp_path.glob("report.corrections.*.safetensors"))) == 1
    assert main(["plan", str(report_file), "--out", str(tmp_path / "plan.json"), "--budget", "0.2", "--menu", "corrections"]) == 0
    assert dq.Plan.load(tmp_path / "plan.json").corrections


def test_merge_and_requantize_after_training_from_the_correction(llama):
    path, _, _, report, inputs, _ = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    model, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    peft_model = dq.add_lora(model, r=2)
    assert peft_model.get_base_model().dq_plan.corrections == {}  # the corrections live in the trainable adapter now
    merged = dq.merge_to_16bit(peft_model)
    assert merged.dq_plan.corrections == {}
    requantized = dq.requantize(merged)
    assert not hasattr(requantized, "peft_config")
    with torch.no_grad():
        assert torch.isfinite(requantized(**inputs).logits).all()


def test_corrected_model_dtype_and_saved_adapter_config(llama, tmp_path):
    path, _, _, report, inputs, _ = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    model, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False, dtype=torch.bfloat16)
    factors = [p for n, p in model.named_parameters() if ADAPTER_NAME in n]
    assert factors and all(p.dtype == torch.bfloat16 for p in factors)  # 2 bytes per parameter, as planned
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    checkpoint = dq.save(model, tmp_path / "ckpt")
    config = json.loads((checkpoint / ADAPTER_NAME / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(checkpoint.resolve())
    assert set(config["rank_pattern"].values()) <= set(RANKS)


def test_bad_report_arguments_and_foreign_adapters(llama):
    path, _, _, report, *_ = llama
    plan = dq.plan(report, budget=0.2, menu="corrections")
    with pytest.raises(dq.DQError, match="dq.QuantReport.load"):
        dq.load(path, quant="dynamic", plan=plan, report="report.json", processor=False)
    model, _ = dq.load(path, quant="dynamic", plan=plan, report=report, processor=False)
    model.add_adapter("mine", dq.training.lora.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(dq.DQError, match="besides dq_correction"):
        dq.add_lora(model, r=2)
    assert ADAPTER_NAME in model.peft_config  # refused before anything changed
    assert json.loads(json.dumps(dq.plan(report, budget=0.2, menu="keep").to_dict()))["version"] == 1
