import pytest
import torch

import dq_kit as dq
from dq_kit.quant.footprint import nf4_weight_bytes
from dq_kit.units import GIB

# Published sizes (GiB) of the 16-bit and all-Linear NF4 uploads (Unsloth dynamic 4-bit, Dec 2024).
PUBLISHED = {
    "Qwen/Qwen2-VL-2B-Instruct": (4.11, 1.36),
    "meta-llama/Llama-3.2-11B-Vision-Instruct": (19.87, 6.54),
    "mistral-community/pixtral-12b": (26.32, 7.83),
}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_estimates_match_published_sizes(hub_id):
    est = dq.estimate_memory(hub_id)
    published_16, published_4 = PUBLISHED[hub_id]
    assert est.gib("4bit") == pytest.approx(published_4, rel=0.05)
    if hub_id == "mistral-community/pixtral-12b":
        # 26.32 GiB would need ~14.1 B parameters at 2 bytes each; Pixtral-12B has 12.68 B (vision
        # 0.4 B + text 12.25 B, untied head), i.e. 23.62 GiB in bf16. The published 16-bit upload
        # evidently holds more than bf16 weights (e.g. fp32 tensors), so we check the bf16 size.
        assert est.params == pytest.approx(12.68e9, rel=0.005)
        assert est.gib("16bit") == pytest.approx(est.params * 2 / GIB)
    else:
        assert est.gib("16bit") == pytest.approx(published_16, rel=0.05)
    assert est.bytes_4bit <= est.bytes_plan < est.bytes_16bit


def test_estimate_prints_three_sizes_offline():
    text = str(dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct"))
    assert "16-bit" in text and "NF4" in text and "dynamic (preset)" in text
    frame = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct").to_frame()
    gib = frame["GiB"].tolist()
    assert gib[0] > gib[2] > gib[1]  # 16-bit > dynamic > NF4


def test_mirror_ids_resolve_to_shipped_configs():
    assert dq.estimate_memory("unsloth/Llama-3.2-11B-Vision-Instruct").params == dq.estimate_memory(
        "meta-llama/Llama-3.2-11B-Vision-Instruct"
    ).params


def test_estimate_with_a_plan():
    plan = dq.Plan.from_patterns("Qwen/Qwen2-VL-2B-Instruct", [r"model\.visual\.merger\..*"])
    est = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", plan)
    merger_params = 5120 * 5120 + 5120 * 1536
    expected_extra = 2 * merger_params - nf4_weight_bytes(5120 * 5120) - nf4_weight_bytes(5120 * 1536)
    assert est.bytes_plan - est.bytes_4bit == expected_extra
    assert est.kept_modules == 2


def test_estimate_of_a_local_tiny_model_matches_the_loaded_model(tiny_path):
    path = tiny_path("qwen2_vl")
    est = dq.estimate_memory(path)
    model, _ = dq.load(path, quant="4bit", processor=False, dtype=__import__("torch").bfloat16)
    table = dq.inspect(model)
    quantized_bytes = int(table[table.quantized].bytes.sum())
    skeleton = dq.modeling.meta_model(dq.modeling.resolve_config(path))
    from dq_kit.quant.footprint import footprint_bytes

    names = set(table[table.quantized].name)
    predicted_quantized = footprint_bytes(skeleton, names) - footprint_bytes(skeleton, set()) + 2 * int(
        table[table.quantized].params.sum()
    )
    assert quantized_bytes == predicted_quantized
    assert est.bytes_16bit == 2 * sum(p.numel() for p in skeleton.parameters())


def test_bits_per_parameter_of_nf4_with_double_quant():
    bits = nf4_weight_bytes(4096 * 4096) * 8 / (4096 * 4096)
    assert 4.12 < bits < 4.13


def test_bad_reference():
    with pytest.raises(dq.ModelNotFoundError):
        dq.estimate_memory("./not/a/folder")


def test_task_estimates_and_their_bad_input():
    import dq_kit as dq

    whole = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="analyze", device="cuda")
    sequential = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="analyze", sequential=True, device="cuda")
    assert whole.resident_bytes == whole.bytes_16bit and sequential.resident_bytes == 0
    assert 0 < sequential.peak_bytes and sequential.resident_bytes + sequential.peak_bytes < whole.resident_bytes + whole.peak_bytes
    assert set(whole.fits()) == {"T4 16 GB", "L4 24 GB", "A100 40 GB", "A100 80 GB", "H100 80 GB"}
    checkpointed = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="train", seq_len=2048, device="cuda")
    full = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="train", seq_len=2048, gradient_checkpointing=False, device="cuda")
    assert checkpointed.peak_bytes < full.peak_bytes and checkpointed.resident_bytes == checkpointed.bytes_plan
    assert dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="train", quant="16bit", device="cuda").resident_bytes == whole.bytes_16bit
    cpu = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="analyze", device="cpu")
    assert cpu.bytes_16bit == whole.bytes_16bit and cpu.resident_bytes == 2 * whole.resident_bytes, "fp32 on the CPU"
    assert "fits: T4 16 GB" in str(whole) and "analyze: model 4.11 GiB + peak" in str(whole)
    with pytest.raises(dq.DQError, match="task must be one of"):
        dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="serve")
    for bad in ({"batch_size": 0}, {"seq_len": -5}, {"samples": 2.5}, {"tokens": True}, {"vision_tokens": -1}):
        with pytest.raises(dq.DQError, match="must be"):
            dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="train", **bad)
    with pytest.raises(dq.DQError, match="device must be"):
        dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", device="tpu")


def test_sequential_auto_streams_when_the_whole_model_would_not_fit(tiny_path, monkeypatch, tmp_path):
    import dq_kit as dq
    import dq_kit.analysis.run as run

    path = tiny_path("llama")
    calibration = ["A red circle on a blue background."]
    assert dq.analyze(path, calibration=calibration, progress=False).meta["sequential"] is False  # plenty of memory here
    monkeypatch.setattr(run, "available_bytes", lambda device=None: 1024)
    with pytest.warns(UserWarning, match="needs about .* but 1.0 KiB is free: analysing it layer by layer"):
        report = dq.analyze(path, calibration=calibration, progress=False)
    assert report.meta["sequential"] is True
    model, tokenizer = dq.load(path, quant="16bit")
    assert dq.analyze(model, tokenizer, calibration, progress=False).meta["sequential"] is False  # a loaded model: whole
    bin_folder = tmp_path / "bin"  # weights in PyTorch's own format only: nothing to stream
    model.save_pretrained(bin_folder)
    tokenizer.save_pretrained(bin_folder)
    torch.save(model.state_dict(), bin_folder / "pytorch_model.bin")
    (bin_folder / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match="no safetensors files to stream layer by layer: analysing it whole"):
        assert dq.analyze(bin_folder, calibration=calibration, progress=False).meta["sequential"] is False
    with pytest.raises(dq.AnalysisError, match="sequential must be True, False or 'auto'"):
        dq.analyze(path, calibration=calibration, sequential="yes", progress=False)
