"""Today's families as first-class families: the whole pipeline on each tiny model.

Load in 16-bit / NF4 / dynamic with verification, analyse whole and layer by layer, plan, LoRA with
the attention / MLP toggles, answer-only SFT under the family's own chat template, generate, save,
and reload the saved checkpoint with plain transformers.
"""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

import dq_kit as dq
from dq_kit.models import registry

TEXT_FAMILIES = ("qwen3", "gemma3_text")
VLM_FAMILIES = ("qwen3_vl", "gemma3", "smolvlm", "lfm2_vl")
CALIBRATION = ["A red circle on a blue background.", "What colour is the shape? The shape is green."]
CHATS = Dataset.from_list([
    {"messages": [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": answer}]}
    for answer in ("Red.", "Blue.", "Green.", "Red.")
])


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_family_has_its_own_registry_entry_and_preset(family):
    model = dq.tiny.build_tiny_model(family)
    entry = registry.family_of(model.config)
    assert entry.name == family and entry.kind == "causal_lm"
    keep = dq.Plan.preset(model).keep
    rule = ("mlp.down_proj", "self_attn.v_proj") if family == "gemma3_text" else ("mlp.down_proj",)
    assert keep and all(name.endswith(rule) for name in keep)
    groups = {info.group for info in registry.linear_modules(model)}
    assert {"language_attention", "language_mlp"} <= groups
    assert {info.layer for info in registry.linear_modules(model) if info.tower == "language"} == {0, 1}


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_full_pipeline(family, tiny_path, tmp_path):
    path = tiny_path(family)
    m16, tokenizer = dq.load(path, quant="16bit")
    for quant in ("4bit", "dynamic"):
        model, _ = dq.load(path, quant=quant, processor=False)  # verified against its plan on load
        assert model.dq_plan is not None

    whole = dq.analyze(m16, tokenizer, CALIBRATION, progress=False)
    sequential = dq.analyze(path, tokenizer, CALIBRATION, sequential=True, progress=False)
    columns = ["weight_rel_error", "act_local_error", "sensitivity"]
    assert (whole.table[columns] - sequential.table[columns]).abs().max().max() < 1e-4
    plan = dq.plan(whole, budget=0.2)
    assert plan.keep

    model, _ = dq.load(path, quant="dynamic", plan=plan)
    attention_only = dq.add_lora(model, r=4, mlp=False)
    targeted = {name.rsplit(".", 1)[-1] for name, module in attention_only.named_modules() if hasattr(module, "lora_A")}
    assert targeted and targeted <= {"q_proj", "k_proj", "v_proj", "o_proj"}

    model, _ = dq.load(path, quant="dynamic", plan=plan)
    peft_model = dq.add_lora(model, r=4, attention=False)
    trainer = dq.sft_trainer(peft_model, tokenizer, CHATS, output_dir=str(tmp_path / "run"), max_steps=2,
                             per_device_train_batch_size=2, disable_tqdm=True, activation_checkpointing=False)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trained = batch["labels"][0] != -100
    assert tokenizer.decode(batch["input_ids"][0][trained]) == "Red." + tokenizer.eos_token  # the answer under the family's template
    assert trainer.train().global_step == 2
    assert isinstance(dq.generate(peft_model, tokenizer, None, "What colour is the circle?", max_new_tokens=3), str)

    final = dq.requantize(dq.merge_to_16bit(peft_model))
    saved = dq.save(final, tmp_path / "checkpoint", processor=tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(saved)  # no dq_kit involved in the reload
    ids = tokenizer("A red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, final(ids).logits, atol=1e-5)


def test_a_chat_template_without_generation_markers_is_a_clear_error(tiny_path, tmp_path):
    model, tokenizer = dq.load(tiny_path("qwen3"), quant="dynamic")
    tokenizer.chat_template = ("{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                               "+ '<|im_end|>\\n' -}}{%- endfor -%}")
    with pytest.raises(dq.DataError, match=r"no such marker.*responses_only=False"):
        dq.sft_trainer(dq.add_lora(model, r=2), tokenizer, CHATS, output_dir=str(tmp_path), max_steps=1)


def test_shipped_configs_of_the_text_families_plan_offline():
    for hub_id, family, kept in (("Qwen/Qwen3-4B", "qwen3", 3), ("google/gemma-3-270m-it", "gemma3_text", 18 + 1)):
        assert registry.family_of(dq.modeling.resolve_config(hub_id)).name == family
        estimate = dq.estimate_memory(hub_id)
        assert estimate.plan_source == "preset" and estimate.kept_modules == kept
        assert estimate.bytes_16bit > estimate.bytes_plan > estimate.bytes_4bit


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_family_has_its_own_registry_entry_and_groups(family):
    model = dq.tiny.build_tiny_model(family)
    assert registry.family_of(model.config).name == family
    infos = registry.linear_modules(model)
    towers = {info.tower for info in infos}
    assert {"vision", "language", "head"} <= towers
    keep = dq.Plan.preset(model).keep
    assert keep and all(registry.classify(name)[0] in ("language", "projector") for name in keep)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_full_pipeline(family, tiny_path, tmp_path):
    path = tiny_path(family)
    shapes = dq.data.shapes_dataset(6, seed=2, task="colour", test_size=None)
    calibration = [{"messages": row["messages"], "images": row["images"]} for row in shapes.select(range(3))]
    m16, processor = dq.load(path, quant="16bit")
    for quant in ("4bit", "dynamic"):
        model, _ = dq.load(path, quant=quant, processor=False)
        assert model.dq_plan is not None

    whole = dq.analyze(m16, processor, calibration, progress=False)
    sequential = dq.analyze(path, processor, calibration, sequential=True, progress=False)
    columns = ["weight_rel_error", "act_local_error", "sensitivity"]
    assert (whole.table[columns] - sequential.table[columns]).abs().max().max() < 1e-4
    assert (whole.table.loc[whole.table["tower"] == "vision", "sensitivity"] > 0).any()  # images reached the vision tower
    plan = dq.plan(whole, budget=0.2)

    model, _ = dq.load(path, quant="dynamic", plan=plan)
    language_only = dq.add_lora(model, r=4, vision=False)
    adapted = [name for name, module in language_only.named_modules() if hasattr(module, "lora_A")]
    assert adapted and all(registry.classify(name.removeprefix("base_model.model."))[0] == "language" for name in adapted)

    model, _ = dq.load(path, quant="dynamic", plan=plan)
    peft_model = dq.add_lora(model, r=4, vision=True)
    trainer = dq.sft_trainer(peft_model, processor, shapes, output_dir=str(tmp_path / "run"), max_steps=2,
                             per_device_train_batch_size=2, disable_tqdm=True, activation_checkpointing=False)
    batch = trainer.data_collator([shapes[0]])
    trained = batch["labels"][0] != -100
    tokenizer = processor.tokenizer
    # the answer and its end-of-turn token (SmolVLM's template puts the space after "Assistant:" inside the answer)
    assert tokenizer.decode(batch["input_ids"][0][trained]).lstrip() == shapes[0]["answer"] + tokenizer.eos_token
    assert trainer.train().global_step == 2
    assert isinstance(dq.generate(peft_model, processor, shapes[1]["images"][0], "What colour is the shape?", max_new_tokens=3), str)

    final = dq.requantize(dq.merge_to_16bit(peft_model))
    saved = dq.save(final, tmp_path / "checkpoint", processor=processor)
    plain = AutoModelForImageTextToText.from_pretrained(saved)  # no dq_kit involved in the reload
    inputs = dq.tiny.tiny_chat_inputs(AutoProcessor.from_pretrained(saved), family)
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, final(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in dq.tiny.FAMILIES if f not in dq.tiny.TEXT_FAMILIES])
def test_a_skip_list_in_checkpoint_names_keeps_exactly_the_intended_modules(family, tiny_path):
    """Published dynamic uploads list modules as their checkpoints name them (`language_model.model.layers.3...`)."""
    from safetensors import safe_open

    from dq_kit.models.resolution import checkpoint_renamer, meta_model, resolve_config
    from dq_kit.quant.checkpoint import plan_from_checkpoint

    path = tiny_path(family)
    config = resolve_config(path)
    skeleton = meta_model(config)
    intended = set(dq.Plan.preset(skeleton).keep)
    rename = checkpoint_renamer(skeleton)
    with safe_open(f"{path}/model.safetensors", "pt") as stored:
        keys = list(stored.keys())
    live_to_stored = {rename(key)[0].removesuffix(".weight"): key.removesuffix(".weight") for key in keys}
    skip_list = sorted(live_to_stored[name] for name in intended) + ["lm_head"]
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": skip_list}
    assert set(plan_from_checkpoint(config, skeleton).keep) == intended
    renamed = [name for name in skip_list if name not in intended and name != "lm_head"]
    assert renamed or family in ("qwen3_vl", "smolvlm", "lfm2_vl")  # the others store other names than the live model uses


def test_a_linear_patch_embedding_is_never_quantized(tiny_path):
    """SigLIP2's NaFlex patch embedding casts the pixels to its weight dtype: 4-bit (uint8) weights would make them integers."""
    model, processor = dq.load(tiny_path("lfm2_vl"), quant="4bit")
    assert type(model.model.vision_tower.embeddings.patch_embedding) is torch.nn.Linear
    assert "model.vision_tower.embeddings.patch_embedding" in model.dq_plan.fixed
    reference, _ = dq.load(tiny_path("lfm2_vl"), quant="16bit", processor=False)
    inputs = dq.tiny.tiny_chat_inputs(processor, "lfm2_vl")
    with torch.no_grad():
        expected = reference.model.get_image_features(inputs["pixel_values"], inputs["spatial_shapes"], inputs["pixel_attention_mask"])
        got = model.model.get_image_features(inputs["pixel_values"], inputs["spatial_shapes"], inputs["pixel_attention_mask"])
    expected, got = expected.pooler_output[0].flatten(), got.pooler_output[0].flatten()  # the projected image tokens
    assert torch.nn.functional.cosine_similarity(expected, got, dim=0) > 0.9  # 4-bit noise only, not integer pixels


def test_a_hand_made_plan_still_keeps_the_patch_embedding_16bit(tiny_path):
    skeleton = dq.tiny.build_tiny_model("lfm2_vl")
    hand_made = dq.Plan(keep=("model.language_model.layers.0.feed_forward.w2",), model_type="lfm2_vl")  # fixed: nothing
    model, _ = dq.load(tiny_path("lfm2_vl"), quant="dynamic", plan=hand_made, processor=False)
    assert type(model.model.vision_tower.embeddings.patch_embedding) is torch.nn.Linear
    assert set(registry.always_16bit(skeleton)) <= set(model.dq_plan.fixed)
