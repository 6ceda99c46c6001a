"""Tiny, offline, real-architecture models and processors for tests and demos.

Nothing here touches the network: every model is built from the real transformers
config class with random weights, and every processor wraps a byte-level BPE
tokenizer trained on the spot on a few dozen captions. A folder written by
:func:`save_tiny` loads back with the Auto classes exactly like a hub id::

    >>> import tempfile, transformers
    >>> from dq_kit.synthetic.tiny import save_tiny, tiny_chat_inputs
    >>> path = save_tiny("qwen2_vl", tempfile.mkdtemp())
    >>> model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    >>> processor = transformers.AutoProcessor.from_pretrained(path)
    >>> logits = model(**tiny_chat_inputs(processor, "qwen2_vl")).logits

Sizes are chosen so that every ``nn.Linear`` dimension is a multiple of 64 (the
bitsandbytes NF4 block size): hidden 64, intermediate 128, 4 heads of 16 (no GQA,
so k/v projections stay 64 wide), vocabulary 384.
"""

from __future__ import annotations

import json
import os
import pathlib
import random

import PIL.Image
import PIL.ImageDraw
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .drawing import PALETTE, draw_shape

FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "smolvlm", "lfm2_vl", "mllama", "llava", "llama", "qwen3", "gemma3_text")
TEXT_FAMILIES: tuple[str, ...] = ("llama", "qwen3", "gemma3_text")  # language models: a tokenizer, no images

_VOCAB = 384
_HIDDEN = 64
_INTERMEDIATE = 128
_HEADS = 4  # head_dim 16
_MAX_POSITIONS = 512
_TEXT_LAYERS = 2
_VISION_LAYERS = 2
_QWEN_PATCH = 14  # Qwen: 14 px patches, 2x2 spatial merge, 2-frame temporal patches
_QWEN_MIN_PIXELS = 56 * 56  # a 56x56 image -> 4x4 patches -> 4 image tokens
_QWEN_MAX_PIXELS = 112 * 112  # at most 16 image tokens
_QWEN3_PATCH = 16  # Qwen3-VL: a 56x56 image -> 64x64 -> 4x4 patches -> 4 image tokens
_GEMMA_IMAGE, _GEMMA_IMAGE_TOKENS = 64, 4
# Gemma 3's language model: sliding-window and global layers alternate (5:1 in the real models)
_GEMMA_TEXT = {"num_hidden_layers": _TEXT_LAYERS, "head_dim": _HIDDEN // _HEADS, "query_pre_attn_scalar": _HIDDEN // _HEADS,
               "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}
_SMOLVLM_IMAGE = 64  # one 64 px image, no splitting: 4x4 patches -> 4 <image> tokens
_MLLAMA_TILE = 28  # vision image_size == image processor tile size; a 56 px image is 2x2 tiles
_PIXTRAL_PATCH = 16
_PIXTRAL_IMAGE = 64  # longest edge; a 56 px image -> 4x4 patches -> 16 [IMG] + 4 break/end tokens

_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_LLAMA_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
)
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
_SPECIALS: dict[str, tuple[str, ...]] = {
    "qwen2_vl": _QWEN_SPECIALS,
    "qwen2_5_vl": _QWEN_SPECIALS,
    "qwen3_vl": _QWEN_SPECIALS,
    "mllama": _LLAMA_SPECIALS + ("<|image|>", "<|python_tag|>"),  # MllamaProcessor looks up <|python_tag|>
    "llava": ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
    "llama": _LLAMA_SPECIALS,
    "qwen3": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "gemma3_text": _GEMMA_SPECIALS,
    "gemma3": _GEMMA_SPECIALS + ("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
    "smolvlm": ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"),
    "lfm2_vl": ("<|pad|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|image_start|>", "<|image_end|>",
                "<|img_thumbnail|>"),
}
# bos / eos / pad token strings per family (Qwen has no bos token, its config uses <|endoftext|>).
_ROLE_TOKENS: dict[str, dict[str, str | None]] = {
    "qwen2_vl": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"},
    "qwen2_5_vl": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"},
    "qwen3_vl": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"},
    "mllama": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"},
    "llava": {"bos": "<s>", "eos": "</s>", "pad": "<pad>"},
    "llama": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"},
    "qwen3": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"},
    "gemma3_text": {"bos": "<bos>", "eos": "<end_of_turn>", "pad": "<pad>"},
    "gemma3": {"bos": "<bos>", "eos": "<end_of_turn>", "pad": "<pad>"},
    "smolvlm": {"bos": "<|im_start|>", "eos": "<end_of_utterance>", "pad": "<|endoftext|>"},
    "lfm2_vl": {"bos": "<|startoftext|>", "eos": "<|im_end|>", "pad": "<|pad|>"},
}

_COLOURS = {name: rgb for name, rgb in PALETTE.items() if name != "grey"}
_SHAPES = ("circle", "square", "triangle")
_CORPUS = [
    *(
        f"A {colour} {shape} on a {background} background."
        for colour, background in zip(_COLOURS, reversed(_COLOURS), strict=True)
        for shape in _SHAPES
    ),
    "What is in the image?",
    "What colour is the shape?",
    "What shape do you see?",
    "Describe the picture in one sentence.",
    "How many shapes are there?",
    "Is the circle bigger than the square?",
    "Where is the triangle in the image?",
    "There is one small shape in the middle of the picture.",
    "The shape is near the top left corner.",
    "The background is plain and the shape is bright.",
    "I see a picture of a simple shape.",
    "You are a helpful assistant.",
    "Answer the question about the image.",
    "Yes, it is. No, it is not.",
    "The numbers are 0 1 2 3 4 5 6 7 8 9 10.",
]

# Jinja macro shared by every template: content is a plain string or a TRL-style list of
# {"type": "image"} / {"type": "text", "text": ...} items; IMAGE is the family's placeholder.
_RENDER = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}IMAGE"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
# Assistant answers (with their end-of-turn token) sit inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly them.
# ChatML turns (Qwen, LFM2), after the family's render macro
_CHATML_BODY = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- render(message['content']) + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_QWEN_TEMPLATE = _RENDER.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>") + _CHATML_BODY
_LLAMA3_BODY = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render(message['content']) + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- render(message['content']) + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)
_PIXTRAL_TEMPLATE = _RENDER.replace("IMAGE", "[IMG]") + (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = render(message['content']) + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST]' + ns.system + render(message['content']) + '[/INST]' -}}{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render(message['content']) + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('roles must be system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# Gemma: the assistant is "model", a system message goes at the start of the next user turn.
_GEMMA_BODY = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = render(message['content']) + '\\n\\n' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- generation -%}{{- render(message['content']) + '<end_of_turn>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<start_of_turn>user\\n' + ns.system + render(message['content']) + '<end_of_turn>\\n' -}}{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


# SmolVLM: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
_SMOLVLM_BODY = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- 'Assistant:' -}}{%- generation -%}{{- ' ' + render(message['content']) + '<end_of_utterance>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}{{- message['role'] | capitalize + ':' + render(message['content']) + '<end_of_utterance>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _text_only(family: str) -> str:
    return _RENDER.replace("IMAGE", "{{- raise_exception('" + family + " is text-only: no image items') -}}")


_CHAT_TEMPLATES: dict[str, str] = {
    "qwen2_vl": _QWEN_TEMPLATE,
    "qwen2_5_vl": _QWEN_TEMPLATE,
    "qwen3_vl": _QWEN_TEMPLATE,
    "mllama": _RENDER.replace("IMAGE", "<|image|>") + _LLAMA3_BODY,
    "llava": _PIXTRAL_TEMPLATE,
    "llama": _text_only("llama") + _LLAMA3_BODY,
    "qwen3": _text_only("qwen3") + _CHATML_BODY,
    "gemma3_text": _text_only("gemma3_text") + _GEMMA_BODY,
    "gemma3": _RENDER.replace("IMAGE", "<start_of_image>") + _GEMMA_BODY,
    "smolvlm": _RENDER.replace("IMAGE", "<image>") + _SMOLVLM_BODY,
    "lfm2_vl": _RENDER.replace("IMAGE", "<image>") + "{{- bos_token -}}" + _CHATML_BODY,
}

_MODEL_CLASSES: dict[str, type[transformers.PreTrainedModel]] = {
    "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
    "gemma3": transformers.Gemma3ForConditionalGeneration,
    "smolvlm": transformers.SmolVLMForConditionalGeneration,
    "lfm2_vl": transformers.Lfm2VlForConditionalGeneration,
    "mllama": transformers.MllamaForConditionalGeneration,
    "llava": transformers.LlavaForConditionalGeneration,
    "llama": transformers.LlamaForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "gemma3_text": transformers.Gemma3ForCausalLM,
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; valid families are: {', '.join(FAMILIES)}")


def _train_tokenizer(family: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB,
        special_tokens=list(_SPECIALS[family]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def _tiny_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    roles = _ROLE_TOKENS[family]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(family),
        bos_token=roles["bos"],
        eos_token=roles["eos"],
        pad_token=roles["pad"],
        unk_token="<unk>" if family == "llava" else None,
        # Gemma 3's processor reads its image markers from the tokenizer
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        if family == "gemma3" else None,
        model_max_length=_MAX_POSITIONS,
        chat_template=_CHAT_TEMPLATES[family],
    )


def _token_ids(family: str) -> dict[str, int]:
    """Ids the trainer gives the family's special tokens: they come first, in order."""
    return {token: index for index, token in enumerate(_SPECIALS[family])}


def _text_kwargs(family: str) -> dict:
    ids = _token_ids(family)
    roles = _ROLE_TOKENS[family]
    return {
        "vocab_size": _VOCAB,
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _HEADS,
        "max_position_embeddings": _MAX_POSITIONS,
        "bos_token_id": ids[roles["bos"] or "<|endoftext|>"],
        "eos_token_id": ids[roles["eos"]],
        "pad_token_id": ids[roles["pad"]],
    }


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """Return a tiny config of the family's real config class, ids matching :func:`tiny_processor`.

    Example::

        >>> from dq_kit.synthetic.tiny import tiny_config
        >>> tiny_config("mllama").text_config.cross_attention_layers
        [1, 3]
    """
    _check_family(family)
    ids = _token_ids(family)
    text = _text_kwargs(family)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # mrope sections (temporal, height, width) add up to head_dim / 2 = 8.
        text_config = {
            **text,
            "num_hidden_layers": _TEXT_LAYERS,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        }
        vision = {
            "depth": _VISION_LAYERS,
            "num_heads": _HEADS,
            "patch_size": _QWEN_PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        if family == "qwen2_vl":
            config_class = transformers.Qwen2VLConfig
            vision |= {"embed_dim": _HIDDEN, "hidden_size": _HIDDEN, "mlp_ratio": 4}
        else:
            config_class = transformers.Qwen2_5_VLConfig
            vision |= {
                "hidden_size": _HIDDEN,
                "intermediate_size": _INTERMEDIATE,
                "out_hidden_size": _HIDDEN,
                "window_size": 112,
                "fullatt_block_indexes": [1],
            }
        return config_class(
            text_config=text_config,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
    if family == "qwen3_vl":
        # Qwen3-VL: 16 px patches, interleaved mrope, DeepStack (vision layer 0 also feeds the language model)
        return transformers.Qwen3VLConfig(
            text_config={**text, "num_hidden_layers": _TEXT_LAYERS, "head_dim": _HIDDEN // _HEADS,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                             "mrope_interleaved": True}},
            vision_config={"depth": _VISION_LAYERS, "hidden_size": _HIDDEN, "intermediate_size": _INTERMEDIATE, "num_heads": _HEADS,
                           "patch_size": _QWEN3_PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": _HIDDEN,
                           "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
    if family == "gemma3":
        # Gemma 3 with vision: a SigLIP tower (64 px images, 16 px patches), pooled to 2x2 = 4 soft tokens per image
        return transformers.Gemma3Config(
            text_config={**text, **_GEMMA_TEXT},
            vision_config={"hidden_size": _HIDDEN, "intermediate_size": _INTERMEDIATE, "num_hidden_layers": _VISION_LAYERS,
                           "num_attention_heads": _HEADS, "image_size": _GEMMA_IMAGE, "patch_size": 16, "vision_use_head": False},
            mm_tokens_per_image=_GEMMA_IMAGE_TOKENS,
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
        )
    if family == "smolvlm":
        # SmolVLM (Idefics3 layout): SigLIP tower, pixel-shuffle connector (scale 2: 4x4 patches -> 4 tokens), Llama text model
        return transformers.SmolVLMConfig(
            vision_config={"hidden_size": _HIDDEN, "intermediate_size": _INTERMEDIATE, "num_hidden_layers": _VISION_LAYERS,
                           "num_attention_heads": _HEADS, "image_size": _SMOLVLM_IMAGE, "patch_size": 16},
            text_config={**text, "model_type": "llama", "num_hidden_layers": _TEXT_LAYERS},
            scale_factor=2,
            image_token_id=ids["<image>"],
            tie_word_embeddings=False,
        )
    if family == "lfm2_vl":
        # LFM2-VL: a SigLIP2 NaFlex tower, pixel-unshuffle projector (factor 2), LFM2 text model (short convolutions
        # and attention layers alternating)
        return transformers.Lfm2VlConfig(
            vision_config={"model_type": "siglip2_vision_model", "hidden_size": _HIDDEN, "intermediate_size": _INTERMEDIATE,
                           "num_hidden_layers": _VISION_LAYERS, "num_attention_heads": _HEADS, "patch_size": 16,
                           "num_patches": 16, "vision_use_head": False},
            text_config={**text, "num_hidden_layers": _TEXT_LAYERS, "layer_types": ["conv", "full_attention"],
                         "block_auto_adjust_ff_dim": False, "block_ff_dim": _INTERMEDIATE},
            projector_hidden_size=_INTERMEDIATE,
            downsample_factor=2,
            image_token_id=ids["<image>"],
            tie_word_embeddings=False,
        )
    if family == "mllama":
        return transformers.MllamaConfig(
            text_config={**text, "num_hidden_layers": 4, "cross_attention_layers": [1, 3]},
            vision_config={
                "hidden_size": _HIDDEN,
                "intermediate_size": _INTERMEDIATE,
                "attention_heads": _HEADS,
                "num_hidden_layers": _VISION_LAYERS,
                "num_global_layers": _VISION_LAYERS,
                "intermediate_layers_indices": [0, 1],
                "vision_output_dim": _HIDDEN * 3,  # final hidden state + 2 intermediate layers
                "image_size": _MLLAMA_TILE,
                "patch_size": 14,
                "max_num_tiles": 4,
            },
            image_token_index=ids["<|image|>"],
        )
    if family == "llava":
        # The Pixtral-12B layout: Llava wrapper, Pixtral vision tower, Mistral text model.
        return transformers.LlavaConfig(
            vision_config=transformers.PixtralVisionConfig(
                hidden_size=_HIDDEN,
                intermediate_size=_INTERMEDIATE,
                num_hidden_layers=_VISION_LAYERS,
                num_attention_heads=_HEADS,
                image_size=_PIXTRAL_IMAGE,
                patch_size=_PIXTRAL_PATCH,
            ),
            text_config=transformers.MistralConfig(**text, num_hidden_layers=_TEXT_LAYERS, sliding_window=None),
            image_token_index=ids["[IMG]"],
            projector_hidden_act="gelu",
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    if family == "qwen3":
        return transformers.Qwen3Config(**text, num_hidden_layers=_TEXT_LAYERS, head_dim=_HIDDEN // _HEADS, tie_word_embeddings=False)
    if family == "gemma3_text":
        # Gemma 3 text: embeddings tied to the output head
        return transformers.Gemma3TextConfig(**text, **_GEMMA_TEXT)
    return transformers.LlamaConfig(**text, num_hidden_layers=_TEXT_LAYERS)


def tiny_processor(family: str) -> transformers.ProcessorMixin | transformers.PreTrainedTokenizerFast:
    """Return the family's processor (or, for a language model of :data:`TEXT_FAMILIES`, its tokenizer) sized for tiny images.

    Example::

        >>> from dq_kit.synthetic.tiny import tiny_processor
        >>> type(tiny_processor("llava")).__name__
        'PixtralProcessor'
    """
    _check_family(family)
    tokenizer = _tiny_tokenizer(family)
    template = _CHAT_TEMPLATES[family]
    if family in TEXT_FAMILIES:
        return tokenizer
    if family in ("qwen2_vl", "qwen2_5_vl"):
        size = {"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS}
        patches = {"patch_size": _QWEN_PATCH, "temporal_patch_size": 2, "merge_size": 2}
        processor_class = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        return processor_class(
            image_processor=transformers.Qwen2VLImageProcessor(size=size, **patches),
            video_processor=transformers.Qwen2VLVideoProcessor(size=size, **patches),
            tokenizer=tokenizer,
            chat_template=template,
        )
    if family == "qwen3_vl":
        size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
        patches = {"patch_size": _QWEN3_PATCH, "temporal_patch_size": 2, "merge_size": 2}
        return transformers.Qwen3VLProcessor(
            image_processor=transformers.Qwen2VLImageProcessor(size=size, **patches),
            video_processor=transformers.Qwen3VLVideoProcessor(size=size, **patches),
            tokenizer=tokenizer,
            chat_template=template,
        )
    if family == "gemma3":
        return transformers.Gemma3Processor(
            image_processor=transformers.Gemma3ImageProcessor(size={"height": _GEMMA_IMAGE, "width": _GEMMA_IMAGE}),
            tokenizer=tokenizer,
            chat_template=template,
            image_seq_length=_GEMMA_IMAGE_TOKENS,
        )
    if family == "smolvlm":
        size = {"longest_edge": _SMOLVLM_IMAGE}
        return transformers.SmolVLMProcessor(
            image_processor=transformers.SmolVLMImageProcessor(size=size, max_image_size=size, do_image_splitting=False),
            video_processor=transformers.SmolVLMVideoProcessor(size=size, max_image_size=size),
            tokenizer=tokenizer,
            image_seq_len=4,
            chat_template=template,
        )
    if family == "lfm2_vl":
        return transformers.Lfm2VlProcessor(
            image_processor=transformers.Lfm2VlImageProcessor(do_image_splitting=False, min_image_tokens=4, max_image_tokens=16,
                                                              encoder_patch_size=16, downsample_factor=2),
            tokenizer=tokenizer,
            chat_template=template,
        )
    if family == "mllama":
        return transformers.MllamaProcessor(
            image_processor=transformers.MllamaImageProcessor(
                size={"height": _MLLAMA_TILE, "width": _MLLAMA_TILE}, max_image_tiles=4
            ),
            tokenizer=tokenizer,
            chat_template=template,
        )
    return transformers.PixtralProcessor(
        image_processor=transformers.PixtralImageProcessor(
            size={"longest_edge": _PIXTRAL_IMAGE},
            patch_size={"height": _PIXTRAL_PATCH, "width": _PIXTRAL_PATCH},
        ),
        tokenizer=tokenizer,
        patch_size=_PIXTRAL_PATCH,
        spatial_merge_size=1,
        chat_template=template,
    )


def build_tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """Build the family's model with random float32 weights (seeded, global RNG untouched), in eval mode.

    Example::

        >>> from dq_kit.synthetic.tiny import build_tiny_model
        >>> type(build_tiny_model("llama")).__name__
        'LlamaForCausalLM'
    """
    _check_family(family)
    config = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family](config)
        if family == "gemma3":  # its projection starts at zero (images would add nothing): draw it like the other weights
            torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=config.text_config.initializer_range)
    return model.to(torch.float32).eval()


def save_tiny(family: str, path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Save a tiny model (safetensors) and its processor/tokenizer to ``path``; return the path.

    Example::

        >>> import tempfile, transformers
        >>> from dq_kit.synthetic.tiny import save_tiny
        >>> path = save_tiny("llama", tempfile.mkdtemp())
        >>> transformers.AutoModelForCausalLM.from_pretrained(path).config.model_type
        'llama'
    """
    _check_family(family)
    path = pathlib.Path(path)
    build_tiny_model(family, seed).save_pretrained(path)
    tiny_processor(family).save_pretrained(path)
    return path



_GGUF_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}


def save_tiny_gguf(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write the tiny llama model and its tokenizer as one f32 GGUF file (llama.cpp's layout) and return it.

    transformers reads it back with ``from_pretrained(folder, gguf_file=name)`` to the same weights,
    so the GGUF loading path runs offline.

    Example::

        >>> import tempfile, dq_kit as dq
        >>> file = save_tiny_gguf(tempfile.mkdtemp() + "/tiny-llama.gguf")
        >>> model, tokenizer = dq.load(file.parent, quant="4bit", gguf_file=file.name)
        >>> type(model.model.layers[0].mlp.up_proj).__name__
        'Linear4bit'
    """
    import gguf

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_tiny_model("llama", seed), tiny_processor("llama")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(getattr(config, "rope_theta", None) or 10000.0)
    writer.add_vocab_size(config.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [f"<unused{i}>" for i in range(config.vocab_size)]
    for token, index in vocab:
        if index < len(tokens):
            tokens[index] = token
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            target = "output.weight"
        else:  # model.layers.<i>.<module>.weight
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            target = f"blk.{parts[2]}.{_GGUF_TENSORS[module]}.weight"
            heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}.get(module)
            if heads:  # llama.cpp stores q/k rows in its own rotary order; transformers undoes this on load
                array = array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

def tiny_chat_inputs(
    processor: transformers.ProcessorMixin | transformers.PreTrainedTokenizerFast,
    family: str,
    text: str = "What is in the image?",
    image: PIL.Image.Image | None = None,
) -> transformers.BatchFeature:
    """Encode one user turn (one image plus ``text``; text only for :data:`TEXT_FAMILIES`) for generation.

    The turn goes through the chat template with ``add_generation_prompt=True`` and then the
    processor, giving tensors ready for ``model(**inputs)`` or ``model.generate(**inputs)``.
    ``image`` defaults to :func:`tiny_image`.

    Example::

        >>> from dq_kit.synthetic.tiny import tiny_chat_inputs, tiny_processor
        >>> inputs = tiny_chat_inputs(tiny_processor("mllama"), "mllama")
        >>> sorted(inputs)[:3]
        ['aspect_ratio_ids', 'aspect_ratio_mask', 'attention_mask']
    """
    _check_family(family)
    if family in TEXT_FAMILIES:
        if image is not None:
            raise ValueError(f"family {family!r} is text-only: pass image=None")
        messages = [{"role": "user", "content": text}]
        return processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = tiny_image() if image is None else image
    return processor(images=[image], text=[prompt], return_tensors="pt")


def tiny_image(seed: int = 0, size: int = 56) -> PIL.Image.Image:
    """Draw a deterministic ``size`` x ``size`` RGB image: one coloured shape on a plain background.

    Example::

        >>> from dq_kit.synthetic.tiny import tiny_image
        >>> tiny_image(seed=3).size
        (56, 56)
    """
    rng = random.Random(seed)
    background, foreground = rng.sample(sorted(_COLOURS), 2)
    image = PIL.Image.new("RGB", (size, size), _COLOURS[background])
    extent = rng.randint(size // 3, size * 2 // 3)
    left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (left, top, left + extent - 1, top + extent - 1)
    draw = PIL.ImageDraw.Draw(image)
    draw_shape(draw, rng.choice(_SHAPES), box, _COLOURS[foreground])
    return image
