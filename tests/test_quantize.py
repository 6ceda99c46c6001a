import pytest
import torch
from torch import nn

import dq_kit as dq
from dq_kit.quant.quantization import quantize
from dq_kit.quant.verification import is_quantized


def unquantized(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not is_quantized(m))


def logits(model, processor, family="qwen2_vl"):
    inputs = dq.tiny.tiny_chat_inputs(processor, family, image=None if family == "llama" else dq.tiny.tiny_image(5))
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def qwen_plan():
    skeleton = dq.tiny.build_tiny_model("qwen2_vl")
    return dq.Plan.from_patterns(skeleton, [r"model\.visual\.merger\..*", r"model\.language_model\.layers\.1\.mlp\.down_proj"])


def test_quantize_equals_dynamic_load(tiny_path, qwen_plan):
    path = tiny_path("qwen2_vl")
    model, processor = dq.load(path, quant="16bit")
    assert quantize(model, qwen_plan) is model
    loaded, _ = dq.load(path, quant="dynamic", plan=qwen_plan, processor=False)

    assert unquantized(model) == unquantized(loaded) == qwen_plan.skip_modules
    assert model.dq_plan is qwen_plan
    assert model.is_loaded_in_4bit and model.is_quantized and model.config._is_quantized
    assert model.config.quantization_config.llm_int8_skip_modules == qwen_plan.skip_modules
    assert model.config.quantization_config.to_dict() == loaded.config.quantization_config.to_dict()
    assert model.get_memory_footprint() == loaded.get_memory_footprint()
    qkv, qkv_loaded = model.model.visual.blocks[0].attn.qkv, loaded.model.visual.blocks[0].attn.qkv
    assert torch.equal(qkv.weight.data, qkv_loaded.weight.data)
    assert qkv.weight.quant_state.quant_type == "nf4" and qkv.weight.quant_state.nested
    assert torch.equal(logits(model, processor), logits(loaded, processor))
    dq.verify(model, qwen_plan)


def test_quantize_defaults_to_the_preset_and_stays_in_eval_mode():
    model = dq.tiny.build_tiny_model("mllama")
    quantize(model)
    assert list(model.dq_plan.keep) == dq.registry.preset_modules(model)
    assert not any(m.training for m in model.modules())


def test_quantized_model_works_with_peft(tiny_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    path = tiny_path("llama")
    model, tokenizer = dq.load(path, quant="16bit")
    model = prepare_model_for_kbit_training(quantize(model, dq.Plan.uniform(model)))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inputs = dq.tiny.tiny_chat_inputs(tokenizer, "llama")
    loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


# ---- bad input ------------------------------------------------------------------------------


def test_refuses_an_already_quantized_model(tiny_path):
    model, _ = dq.load(tiny_path("llama"), quant="4bit", processor=False)
    with pytest.raises(dq.DQError, match="already quantized"):
        quantize(model, dq.Plan.uniform(model))


def test_refuses_quantizing_twice():
    model = quantize(dq.tiny.build_tiny_model("llama"))
    with pytest.raises(dq.DQError, match="already quantized"):
        quantize(model)


def test_refuses_a_plan_for_another_model():
    plan = dq.Plan.preset(dq.tiny.build_tiny_model("llama"))
    model = dq.tiny.build_tiny_model("qwen2_vl")
    with pytest.raises(dq.PlanError, match="made for a 'llama' model but the model is 'qwen2_vl'"):
        quantize(model, plan)
    assert not any(is_quantized(m) for m in model.modules()), "a refused plan must leave the model untouched"


def test_refuses_overrides_naming_absent_modules():
    model = dq.tiny.build_tiny_model("qwen2_vl")
    plan = dq.Plan.preset(model).with_modules(keep=["model.language_model.layers.9.mlp.down_proj"])
    with pytest.raises(dq.PlanError, match=r"layers\.9\.mlp\.down_proj"):
        quantize(model, plan)


def test_refuses_meta_device_models():
    from dq_kit.models.resolution import meta_model

    model = meta_model(dq.tiny.tiny_config("llama"))
    with pytest.raises(dq.DQError, match="meta device"):
        quantize(model, dq.Plan.uniform(model))


def test_refuses_non_transformers_modules():
    with pytest.raises(dq.DQError, match="needs a transformers model"):
        quantize(nn.Sequential(nn.Linear(64, 64)), dq.Plan())
