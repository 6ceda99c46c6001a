import json

import pytest
import torch
from torch import nn

import dq_kit as dq
from dq_kit.models import registry
from dq_kit.quant.verification import is_quantized

ALL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "mllama", "llava", "llama")


def unquantized(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not is_quantized(m))


def forward(model, processor, family):
    image = None if family == "llama" else dq.tiny.tiny_image(3)
    inputs = dq.tiny.tiny_chat_inputs(processor, family, image=image)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    return logits


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_three_precisions_load_verify_and_run(tiny_path, family):
    path = tiny_path(family)
    m16, processor = dq.load(path, quant="16bit")
    n_linear = len(registry.linear_modules(m16))
    assert m16.dq_plan is None and unquantized(m16) == sorted(i.name for i in registry.linear_modules(m16))
    reference = forward(m16, processor, family)

    m4, _ = dq.load(path, quant="4bit", processor=False)
    assert unquantized(m4) == ["lm_head"]
    table = dq.inspect(m4)
    assert len(table) == n_linear and int(table.quantized.sum()) == n_linear - 1
    logits4 = forward(m4, processor, family)
    assert logits4.shape == reference.shape
    assert not torch.allclose(logits4, reference), "4-bit weights should change the outputs a little"

    md, _ = dq.load(path, quant="dynamic", processor=False)
    assert unquantized(md) == sorted(md.dq_plan.skip_modules)
    assert md.dq_plan.source == "preset"
    forward(md, processor, family)


def test_tiny_mllama_dynamic_keeps_exactly_later_cross_attention_o_proj(tiny_path):
    model, _ = dq.load(tiny_path("mllama"), quant="dynamic", processor=False)
    cross = model.config.text_config.cross_attention_layers
    expected = [f"model.language_model.layers.{i}.cross_attn.o_proj" for i in cross[1:]]
    assert list(model.dq_plan.keep) == expected
    table = dq.inspect(model)
    kept = table[~table.quantized & (table.group != "lm_head")]
    assert kept.name.tolist() == expected
    first = f"model.language_model.layers.{cross[0]}.cross_attn.o_proj"
    assert bool(table.set_index("name").loc[first, "quantized"])


def test_inspect_bytes_match_the_nf4_formula(tiny_path):
    model, _ = dq.load(tiny_path("llama"), quant="4bit", processor=False)
    table = dq.inspect(model).set_index("name")
    from dq_kit.quant.footprint import nf4_weight_bytes

    for name, module in model.named_modules():
        if is_quantized(module):
            bias = module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
            assert table.loc[name, "bytes"] == nf4_weight_bytes(module.in_features * module.out_features) + bias
            assert table.loc[name, "dtype"] == "nf4"


def test_custom_plan_from_file(tiny_path, tmp_path):
    path = tiny_path("qwen2_vl")
    skeleton = dq.tiny.build_tiny_model("qwen2_vl")
    plan = dq.Plan.from_patterns(skeleton, [r"model\.visual\.blocks\.0\."]).save(tmp_path / "plan.json")
    model, _ = dq.load(path, quant="dynamic", plan=plan, processor=False)
    assert unquantized(model) == sorted(["lm_head"] + [n for n in model.dq_plan.keep])
    assert all(n.startswith("model.visual.blocks.0.") for n in model.dq_plan.keep)


def test_verification_lists_every_difference(tiny_path):
    model, _ = dq.load(tiny_path("llava"), quant="4bit", processor=False)
    plan = dq.Plan.preset(model).with_modules(keep=["model.nope.q_proj"])
    with pytest.raises(dq.VerificationError) as err:
        dq.verify(model, plan)
    message = str(err.value)
    assert "absent from the model: model.nope.q_proj" in message
    assert "quantized although the plan keeps them 16-bit" in message
    assert "model.vision_tower.transformer.layers.0.attention.q_proj" in message


def test_verification_catches_modules_left_16bit(tiny_path):
    model, _ = dq.load(tiny_path("llama"), quant="16bit", processor=False)
    with pytest.raises(dq.VerificationError, match="left 16-bit although the plan quantizes them"):
        dq.verify(model, dq.Plan.uniform(model))


def test_verification_catches_4bit_weights_without_their_quantization_state(tiny_path):
    model, _ = dq.load(tiny_path("llama"), quant="4bit", processor=False)
    model.model.layers[1].mlp.up_proj.weight.quant_state = None  # what a checkpoint missing its scales leaves
    with pytest.raises(dq.VerificationError, match=r"1 4-bit module\(s\) without a quantization state.*: model.layers.1.mlp.up_proj"):
        dq.verify(model, dq.Plan.uniform(model))


# ---- bad input ------------------------------------------------------------------------------


def test_missing_local_path(tmp_path):
    with pytest.raises(dq.ModelNotFoundError, match="No model folder"):
        dq.load(tmp_path / "does-not-exist")


def test_folder_without_config(tmp_path):
    with pytest.raises(dq.ModelNotFoundError, match="no config.json"):
        dq.load(tmp_path)


def test_unknown_hub_id_offline():
    with pytest.raises(dq.ModelNotFoundError, match="Could not get the config"):
        dq.load("nobody/no-such-model-xyz")


def test_unsupported_architecture(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(dq.UnsupportedModelError, match="neither an image-text-to-text model nor a causal language model"):
        dq.load(tmp_path)


def test_unknown_model_type_in_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "definitely_not_a_model"}))
    with pytest.raises(dq.UnsupportedModelError, match="definitely_not_a_model"):
        dq.load(tmp_path)


def test_plan_for_another_architecture_is_refused_before_loading(tiny_path):
    plan = dq.Plan.preset(dq.tiny.build_tiny_model("llama"))
    with pytest.raises(dq.PlanError, match="made for a 'llama' model but the model is 'qwen2_vl'"):
        dq.load(tiny_path("qwen2_vl"), quant="dynamic", plan=plan)


def test_plan_naming_a_missing_module_is_refused(tiny_path):
    plan = dq.Plan(keep=("model.language_model.layers.7.mlp.down_proj",), fixed=("lm_head",), model_type="qwen2_vl")
    with pytest.raises(dq.PlanError, match="layers.7.mlp.down_proj"):
        dq.load(tiny_path("qwen2_vl"), quant="dynamic", plan=plan)


def test_corrupt_plan_path_is_refused(tiny_path, tmp_path):
    (tmp_path / "plan.json").write_text("{ not json")
    with pytest.raises(dq.PlanError, match="not valid JSON"):
        dq.load(tiny_path("llama"), quant="dynamic", plan=tmp_path / "plan.json")


def test_bad_quant_and_plan_combination(tiny_path):
    with pytest.raises(ValueError, match="quant must be one of"):
        dq.load(tiny_path("llama"), quant="3bit")
    with pytest.raises(dq.PlanError, match="only to quant='dynamic'"):
        dq.load(tiny_path("llama"), quant="4bit", plan=dq.Plan())


def test_trust_remote_code_is_off_by_default(tiny_path, monkeypatch):
    seen = {}
    original = dq.quant.loading.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(dq.quant.loading.AutoTokenizer, "from_pretrained", spy)
    _, tokenizer = dq.load(tiny_path("llama"), quant="16bit")
    assert seen["trust_remote_code"] is False and tokenizer is not None


def test_quant_storage_makes_every_parameter_one_dtype_for_fsdp(tiny_path):
    """FSDP flattens parameters of one dtype: with quant_storage=bf16 and dtype=bf16, 4-bit and 16-bit parameters share it."""
    path = tiny_path("llama")
    model, tokenizer = dq.load(path, quant="dynamic", dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    packed, _ = dq.load(path, quant="dynamic", dtype=torch.bfloat16)
    inputs = tokenizer("A red circle.", return_tensors="pt")
    assert torch.equal(model(**inputs).logits, packed(**inputs).logits), "the storage dtype changes nothing computed"
