"""add_lora on every family, and saving / merging / re-quantizing the adapters."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

import dq_kit as dq
from dq_kit.evaluation.generation import generate
from dq_kit.quant.verification import is_quantized
from dq_kit.training.export import merge_to_16bit, requantize, save_adapter
from dq_kit.training.lora import add_lora, lora_targets

ALL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "mllama", "llava", "llama")


def _inputs(processor, family):
    return dq.tiny.tiny_chat_inputs(processor, family, image=None if family == "llama" else dq.tiny.tiny_image(1))


def _nudge_lora_b(peft_model, seed=0):
    """LoRA B starts at zero (a no-op adapter); give it values so merges are really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_add_lora_on_dynamic_model_trains_4bit_and_16bit_layers(tiny_path, family, capsys):
    model, processor = dq.load(tiny_path(family), quant="dynamic")
    kept = set(model.dq_plan.keep)
    targets = set(lora_targets(model))
    assert targets and not any(name.endswith("lm_head") for name in targets)
    peft_model = add_lora(model, r=4)
    assert "trainable params" in capsys.readouterr().out
    base_of = {name: module.get_base_layer() for name, module in peft_model.get_base_model().named_modules() if hasattr(module, "lora_A")}
    assert set(base_of) == targets
    assert any(is_quantized(layer) for layer in base_of.values())
    if kept & targets:  # the preset keeps some adapted layers in 16-bit: they get LoRA too
        assert any(not is_quantized(base_of[name]) for name in kept & targets)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    peft_model.train()
    inputs = _inputs(processor, family)
    loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_tower_and_kind_selection(tiny_path):
    model = dq.tiny.build_tiny_model("mllama")
    groups = {info.name: info.group for info in dq.registry.linear_modules(model)}
    vision_only = lora_targets(model, language=False)
    assert vision_only and {groups[n] for n in vision_only} <= {"vision_attention", "vision_mlp", "projector"}
    language_attention = lora_targets(model, vision=False, mlp=False)
    assert {groups[n] for n in language_attention} == {"language_attention", "cross_attention"}
    mlp_only = lora_targets(model, attention=False)
    assert {groups[n] for n in mlp_only} == {"vision_mlp", "projector", "language_mlp"}
    assert all(n.endswith("q_proj") for n in lora_targets(model, target_modules=["q_proj"]))
    assert lora_targets(model, target_modules=r"model\.language_model\.layers\.0\.self_attn\.v_proj") == ["model.language_model.layers.0.self_attn.v_proj"]


def test_16bit_model_and_empty_selection(tiny_path):
    model, _ = dq.load(tiny_path("llama"), quant="16bit", processor=False)
    with pytest.raises(dq.DQError, match="selected no module"):
        add_lora(model, vision=True, language=False)  # a text model has no vision tower
    with pytest.raises(dq.DQError, match="selected no module"):
        add_lora(model, attention=False, mlp=False)
    peft_model = add_lora(model, r=2, mlp=False)
    assert peft_model.get_base_model().is_activation_checkpointing
    with pytest.raises(dq.DQError, match="already has LoRA"):
        add_lora(peft_model)


def test_generate_before_lora_does_not_break_4bit_training(tiny_path):
    """bitsandbytes repacks 4-bit weights for CPU inference on first eval use; add_lora must undo it."""
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="4bit")
    generate(model, processor, dq.tiny.tiny_image(0), "What colour?", max_new_tokens=2)
    peft_model = add_lora(model, r=2)
    peft_model.train()
    inputs = _inputs(processor, "qwen2_vl")
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_save_merge_requantize(tiny_path, tmp_path, family):
    model, processor = dq.load(tiny_path(family), quant="dynamic")
    plan = model.dq_plan
    peft_model = add_lora(model, r=4)
    _nudge_lora_b(peft_model)
    peft_model.eval()
    inputs = _inputs(processor, family)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            base_only = peft_model(**inputs).logits
    assert (expected - base_only).abs().max() > 1e-3  # the adapter changes the outputs

    adapter_dir = save_adapter(peft_model, tmp_path / "adapter", processor=processor)
    files = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert all("lora_" in key for key in load_file(adapter_dir / "adapter_model.safetensors"))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind

    merged = merge_to_16bit(peft_model, tmp_path / "merged", processor=processor)
    assert not any(is_quantized(m) for m in merged.modules())
    assert not any("lora" in name for name, _ in merged.named_modules())
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    torch.testing.assert_close(merged_logits, expected, atol=1e-4, rtol=1e-4)

    reloaded, reloaded_processor = dq.load(tmp_path / "merged", quant="16bit")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_inputs(reloaded_processor, family)).logits, expected, atol=1e-4, rtol=1e-4)

    requantized = requantize(merged)
    assert requantized.dq_plan == plan
    quantized = {name for name, m in requantized.named_modules() if isinstance(m, nn.Linear) and is_quantized(m)}
    assert quantized and not quantized & set(plan.skip_modules)
    with torch.no_grad():
        logits4 = requantized(**inputs).logits
    # 4-bit rounding moves the logits a little, the adapter's effect survives
    assert (logits4 - expected).abs().mean() < (base_only - expected).abs().mean() + 0.5


def test_save_adapter_replaces_atomically_and_reloads(tiny_path, tmp_path):
    model, _ = dq.load(tiny_path("llama"), quant="4bit", processor=False)
    peft_model = add_lora(model, r=2)
    target = tmp_path / "adapter"
    save_adapter(peft_model, target)
    (target / "stale.txt").write_text("old")
    save_adapter(peft_model, target)
    assert not (target / "stale.txt").exists()
    base, _ = dq.load(tiny_path("llama"), quant="4bit", processor=False)
    assert isinstance(PeftModel.from_pretrained(base, target), PeftModel)
    with pytest.raises(dq.DQError, match="add_lora"):
        save_adapter(base, tmp_path / "x")
