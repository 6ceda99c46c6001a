"""Tests for dq_kit.synthetic.tiny: tiny offline models and processors round-trip through the Auto classes."""

from __future__ import annotations

import pytest
import torch
import transformers

from dq_kit.synthetic.tiny import (
    FAMILIES,
    TEXT_FAMILIES,
    build_tiny_model,
    save_tiny,
    tiny_chat_inputs,
    tiny_config,
    tiny_image,
    tiny_processor,
)

VLMS = tuple(family for family in FAMILIES if family not in TEXT_FAMILIES)
MODEL_CLASS = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "lfm2_vl": "Lfm2VlForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
PROCESSOR_CLASS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "gemma3": "Gemma3Processor",
    "smolvlm": "SmolVLMProcessor",
    "lfm2_vl": "Lfm2VlProcessor",
    "mllama": "MllamaProcessor",
    "llava": "PixtralProcessor",
}
IMAGE_TOKEN = {
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "qwen3_vl": "<|image_pad|>",
    "gemma3": "<image_soft_token>",
    "smolvlm": "<image>",
    "lfm2_vl": "<image>",
    "mllama": "<|image|>",
    "llava": "[IMG]",
}


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    """(family, model, processor) loaded back from a save_tiny folder through the Auto classes."""
    family = request.param
    path = save_tiny(family, tmp_path_factory.mktemp(family))
    if family in TEXT_FAMILIES:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        processor = transformers.AutoTokenizer.from_pretrained(path)
    else:
        model = transformers.AutoModelForImageTextToText.from_pretrained(path)
        processor = transformers.AutoProcessor.from_pretrained(path)
    return family, model.eval(), processor


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _image_token_count(processor, family, inputs):
    return int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])).sum())


def _expected_image_tokens(family, inputs):
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return int(inputs["image_grid_thw"].prod()) // 4  # 2x2 spatial merge
    if family in ("gemma3", "smolvlm", "lfm2_vl"):
        return 4  # the vision tower's 4x4 patches pooled (Gemma 3) or pixel-shuffled (SmolVLM, LFM2-VL) to 4 tokens
    if family == "llava":
        height, width = inputs["image_sizes"][0].tolist()
        return (height // 16) * (width // 16)  # [IMG] per 16 px patch, plus break/end tokens
    return 1  # mllama: one placeholder, the image enters through cross-attention


def test_auto_classes_load_the_real_architectures(loaded):
    family, model, processor = loaded
    assert type(model).__name__ == MODEL_CLASS[family]
    assert model.dtype == torch.float32
    if family in TEXT_FAMILIES:
        assert isinstance(processor, transformers.PreTrainedTokenizerFast)
    else:
        assert type(processor).__name__ == PROCESSOR_CLASS[family]


def test_forward_has_finite_logits_and_expanded_image_tokens(loaded):
    family, model, processor = loaded
    inputs = tiny_chat_inputs(processor, family)
    with torch.no_grad():
        logits = model(**inputs).logits
    batch, seq = inputs["input_ids"].shape
    assert logits.shape == (batch, seq, model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    if family not in TEXT_FAMILIES:
        assert _image_token_count(processor, family, inputs) == _expected_image_tokens(family, inputs) > 0


def test_generate_runs(loaded):
    family, model, processor = loaded
    inputs = tiny_chat_inputs(processor, family)
    prompt_length = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert prompt_length < output.shape[1] <= prompt_length + 3
    assert torch.equal(output[:, :prompt_length], inputs["input_ids"])


def test_assistant_mask_covers_exactly_the_answer(loaded):
    family, _, processor = loaded
    tokenizer = _tokenizer(processor)
    answer = "A red circle on a blue background."
    if family in TEXT_FAMILIES:
        conversation = [
            {"role": "user", "content": "What shape is it?"},
            {"role": "assistant", "content": answer},
        ]
    else:
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image", "image": tiny_image()}, {"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0].tolist()
    # The answer and its end-of-turn token are trained on, nothing else.
    spoken = " " + answer if family == "smolvlm" else answer  # SmolVLM's "Assistant:" is followed by a space inside the answer
    expected = tokenizer.encode(spoken, add_special_tokens=False) + [tokenizer.eos_token_id]
    masked = [token for token, flag in zip(ids, mask, strict=True) if flag]
    assert masked == expected
    start = mask.index(1)
    assert mask[start : start + len(expected)] == [1] * len(expected)  # one contiguous span


@pytest.mark.parametrize("family", FAMILIES)
def test_template_accepts_plain_strings_and_generation_prompt(family):
    template_owner = tiny_processor(family)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What shape?"}]
    bare = template_owner.apply_chat_template(messages, tokenize=False)
    prompt = template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Answer briefly." in bare and "What shape?" in bare
    assert prompt.startswith(bare)
    if family != "llava":  # Pixtral's [/INST] already hands over to the assistant
        assert len(prompt) > len(bare)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_ids_match_the_tokenizer(family):
    config, tokenizer = tiny_config(family), _tokenizer(tiny_processor(family))
    text_config = config.get_text_config()
    assert len(tokenizer) <= text_config.vocab_size
    assert text_config.eos_token_id == tokenizer.eos_token_id
    assert text_config.pad_token_id == tokenizer.pad_token_id
    if tokenizer.bos_token is not None:
        assert text_config.bos_token_id == tokenizer.bos_token_id
    if family in VLMS:
        assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_is_nf4_block_aligned(family):
    model = build_tiny_model(family)
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert linears
    assert all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for m in linears)


def test_mllama_has_two_cross_attention_layers():
    assert tiny_config("mllama").text_config.cross_attention_layers == [1, 3]


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, again, other = (build_tiny_model("llama", seed=s).state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_tiny_image_is_deterministic():
    image = tiny_image(seed=4, size=40)
    assert image.mode == "RGB" and image.size == (40, 40)
    assert image.tobytes() == tiny_image(seed=4, size=40).tobytes()
    assert image.tobytes() != tiny_image(seed=5, size=40).tobytes()
    assert len(image.getcolors()) >= 2  # a shape on a background


def test_llama_is_text_only():
    with pytest.raises(ValueError, match="text-only"):
        tiny_chat_inputs(tiny_processor("llama"), "llama", image=tiny_image())


@pytest.mark.parametrize(
    "call",
    [
        tiny_config,
        tiny_processor,
        build_tiny_model,
        lambda family: save_tiny(family, "/nonexistent/never-written"),
        lambda family: tiny_chat_inputs(None, family),
    ],
    ids=["tiny_config", "tiny_processor", "build_tiny_model", "save_tiny", "tiny_chat_inputs"],
)
def test_unknown_family_names_the_valid_ones(call):
    with pytest.raises(ValueError, match="gpt2") as error:
        call("gpt2")
    assert all(family in str(error.value) for family in FAMILIES)
