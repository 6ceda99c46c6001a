"""Architecture registry: which family a model belongs to, what its Linear modules are, and presets.

Module groups are derived from the module tree itself (names such as
``model.visual.blocks.3.mlp.fc2`` or ``model.language_model.layers.7.cross_attn.o_proj``),
so a new checkpoint of a known family needs no table of layer names.

Example:
    >>> import dq_kit as dq
    >>> model = dq.tiny.build_tiny_model("mllama")
    >>> [m.name for m in dq.registry.linear_modules(model) if m.group == "cross_attention"][:2]
    ['model.language_model.layers.1.cross_attn.q_proj', 'model.language_model.layers.1.cross_attn.k_proj']
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError

TOWERS = ("vision", "projector", "language", "head")
GROUPS = (
    "vision_attention",
    "vision_mlp",
    "projector",
    "language_attention",
    "cross_attention",
    "language_mlp",
    "lm_head",
)

_VISION_MARKERS = ("visual.", "vision_model.", "vision_tower.", "vision_encoder.")
_PROJECTOR_MARKERS = ("multi_modal_projector", "visual.merger", "visual.deepstack_merger", "connector.modality_projection")
_ATTENTION_MARKERS = ("attn", "attention")
_BLOCK = re.compile(r"^(.*?\.(?:blocks|layers|layer|h)\.\d+)\.")


@dataclass(frozen=True)
class ModuleInfo:
    """One Linear module of a model: where it sits and how big it is."""

    name: str
    tower: str
    group: str
    layer: int | None
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        """Number of weight elements (the part that 4-bit quantization shrinks)."""
        return self.in_features * self.out_features


def block_of(name: str) -> str | None:
    """The transformer block (``...layers.N``) a parameter or module sits in, or ``None``.

    Example:
        >>> block_of("model.language_model.layers.3.mlp.up_proj.weight"), block_of("lm_head.weight")
        ('model.language_model.layers.3', None)
    """
    match = _BLOCK.match(name)
    return match.group(1) if match else None


def classify(name: str) -> tuple[str, str]:
    """Return ``(tower, group)`` for a full module name.

    Example:
        >>> classify("model.visual.blocks.0.mlp.fc1")
        ('vision', 'vision_mlp')
    """
    if name == "lm_head" or name.endswith(".lm_head"):
        return "head", "lm_head"
    if any(marker in name for marker in _PROJECTOR_MARKERS):
        return "projector", "projector"
    is_attention = any(marker in part for part in name.split(".")[:-1] for marker in _ATTENTION_MARKERS)
    if any(marker in name for marker in _VISION_MARKERS):
        return "vision", "vision_attention" if is_attention else "vision_mlp"
    if "cross_attn" in name:
        return "language", "cross_attention"
    return "language", "language_attention" if is_attention else "language_mlp"


def linear_modules(model: nn.Module) -> list[ModuleInfo]:
    """Every ``nn.Linear`` of ``model`` (bitsandbytes ``Linear4bit`` included), in module order.

    ``layer`` is the ordinal of the block the module sits in within its tower (so Mllama's
    global vision layers follow its local ones), or ``None`` outside any block.

    Example:
        >>> import dq_kit as dq
        >>> infos = linear_modules(dq.tiny.build_tiny_model("llama"))
        >>> infos[0].name, infos[0].group, infos[0].layer
        ('model.layers.0.self_attn.q_proj', 'language_attention', 0)
    """
    infos: list[ModuleInfo] = []
    block_ordinal: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        tower, group = classify(name)
        match = _BLOCK.match(name)
        layer = None
        if match and tower in ("vision", "language"):
            blocks = block_ordinal.setdefault(tower, {})
            layer = blocks.setdefault(match.group(1), len(blocks))
        infos.append(
            ModuleInfo(
                name=name,
                tower=tower,
                group=group,
                layer=layer,
                in_features=int(module.in_features),
                out_features=int(module.out_features),
                bias=module.bias is not None,
            )
        )
    return infos


def always_16bit(model: nn.Module) -> list[str]:
    """Linear modules no plan quantizes: the output head(s), and patch embeddings that are Linear layers.

    SigLIP2's NaFlex patch embedding (LFM2-VL) is a Linear, and its forward casts the pixels to the
    layer's weight dtype: a 4-bit weight (uint8) would turn the image into integers.

    Example:
        >>> import dq_kit as dq
        >>> always_16bit(dq.tiny.build_tiny_model("lfm2_vl"))
        ['lm_head', 'model.vision_tower.embeddings.patch_embedding']
    """
    patch_embeddings = [name for name, module in model.named_modules()
                        if isinstance(module, nn.Linear) and name.endswith("embeddings.patch_embedding")]
    return [*output_head_names(model), *patch_embeddings]


def output_head_names(model: nn.Module) -> list[str]:
    """Full names of the output-embedding Linear(s), which bitsandbytes keeps in 16-bit by default."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return [name for name, module in model.named_modules() if name.split(".")[-1] == "lm_head"]
    return [name for name, module in model.named_modules() if module is head]


# --------------------------------------------------------------------------------------------
# Families and presets
# --------------------------------------------------------------------------------------------

Preset = Callable[[list[ModuleInfo]], list[str]]


@dataclass(frozen=True)
class Family:
    """A model family dq_kit knows: how to load it and which modules its preset keeps in 16-bit."""

    name: str
    model_types: tuple[str, ...]
    kind: str  # "vlm" or "causal_lm"
    preset: Preset
    preset_doc: str


def _names(infos: list[ModuleInfo], keep: Callable[[ModuleInfo], bool]) -> list[str]:
    return [info.name for info in infos if keep(info)]


def _qwen_vl_preset(infos: list[ModuleInfo]) -> list[str]:
    return _names(infos, lambda m: m.group == "projector" or (m.tower == "language" and m.layer in (0, 1)))


def _mllama_preset(infos: list[ModuleInfo]) -> list[str]:
    cross_layers = sorted({m.layer for m in infos if m.group == "cross_attention"})
    later = set(cross_layers[1:])
    return _names(infos, lambda m: m.group == "cross_attention" and m.layer in later and m.name.endswith(".o_proj"))


def _pixtral_preset(infos: list[ModuleInfo]) -> list[str]:
    return _names(infos, lambda m: m.tower == "vision")


def _causal_lm_preset(infos: list[ModuleInfo]) -> list[str]:
    layers = sorted({m.layer for m in infos if m.tower == "language" and m.layer is not None})
    chosen = set(layers[:2] + layers[-1:])
    return _names(infos, lambda m: m.layer in chosen and m.name.endswith("down_proj"))


def _gemma_text_preset(infos: list[ModuleInfo]) -> list[str]:
    layers = sorted({m.layer for m in infos if m.tower == "language" and m.layer is not None})
    last = layers[-1:] if layers else []
    return _names(infos, lambda m: m.tower == "language" and (m.name.endswith("self_attn.v_proj")
                                                               or (m.layer in last and m.name.endswith("mlp.down_proj"))))


def _no_preset(infos: list[ModuleInfo]) -> list[str]:
    return []


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "qwen2_vl",
            ("qwen2_vl",),
            "vlm",
            _qwen_vl_preset,
            "Vision merger (projector) and language layers 0-1 in 16-bit: the published analysis of "
            "Qwen2-VL-2B shows large accumulated activation error in the first layers. Costs about "
            "+0.18 GiB (+13%) over uniform NF4 on Qwen2-VL-2B-Instruct.",
        ),
        Family(
            "qwen2_5_vl",
            ("qwen2_5_vl",),
            "vlm",
            _qwen_vl_preset,
            "Same rule as Qwen2-VL: the vision merger and language layers 0-1 stay 16-bit.",
        ),
        Family(
            "qwen3_vl",
            ("qwen3_vl",),
            "vlm",
            _qwen_vl_preset,
            "The Qwen2-VL rule carried over: the vision merger and the DeepStack mergers (projector) and language "
            "layers 0-1 stay 16-bit: +0.28 GiB (+19.1%) over uniform NF4 on Qwen3-VL-2B-Instruct, +0.76 GiB (+12.7%) on 8B. "
            "Not from a published upload and not measured on a trained Qwen3-VL: make a model-specific plan with "
            "dq.analyze + dq.plan.",
        ),
        Family(
            "gemma3",
            ("gemma3",),
            "vlm",
            _qwen_vl_preset,
            "Language layers 0-1 stay 16-bit (Gemma 3's projector is a plain weight matrix, not a Linear, and is "
            "never quantized): +0.26 GiB (+8.7%) over uniform NF4 on gemma-3-4b-it. Not from a published upload and "
            "not measured on a trained Gemma 3: make a model-specific plan with dq.analyze + dq.plan.",
        ),
        Family(
            "smolvlm",
            ("smolvlm",),
            "vlm",
            _qwen_vl_preset,
            "The connector (pixel-shuffle projection) and language layers 0-1 stay 16-bit, the Qwen2-VL rule carried "
            "over. Not from a published upload and not measured on a trained SmolVLM: make a model-specific plan with "
            "dq.analyze + dq.plan.",
        ),
        Family(
            "lfm2_vl",
            ("lfm2_vl",),
            "vlm",
            _qwen_vl_preset,
            "The projector and language layers 0-1 (a short-convolution and an attention layer) stay 16-bit, the "
            "Qwen2-VL rule carried over. Not from a published upload and not measured on a trained LFM2-VL: make a "
            "model-specific plan with dq.analyze + dq.plan.",
        ),
        Family(
            "mllama",
            ("mllama",),
            "vlm",
            _mllama_preset,
            "Cross-attention o_proj of every cross-attention layer except the first stays 16-bit "
            "(published finding on Llama-3.2-11B-Vision: without it, sentences go missing).",
        ),
        Family(
            "llava",
            ("llava",),
            "vlm",
            _pixtral_preset,
            "The whole vision encoder stays 16-bit (published finding on Pixtral-12B; about +0.6 GiB).",
        ),
        Family(
            "qwen3",
            ("qwen3",),
            "causal_lm",
            _causal_lm_preset,
            "Qwen3 language models: MLP down_proj of the first two and the last layer stays 16-bit, dq_kit's "
            "causal-LM rule (down-projections carry the largest measured sensitivity in small language models); "
            "not taken from a published upload. Costs +0.10 GiB (+4.2%) over uniform NF4 on Qwen3-4B.",
        ),
        Family(
            "gemma3_text",
            ("gemma3_text",),
            "causal_lm",
            _gemma_text_preset,
            "Gemma 3 text models (270M-27B): self_attn.v_proj of every layer and the last layer's mlp.down_proj stay "
            "16-bit, measured: on Gemma 3 270M's trained weights a Fisher analysis puts the (narrow, one-KV-head) value "
            "projections first per byte, and this rule closes more of the held-out NF4 gap than the down_proj rule "
            "(24.7% vs 10.0% of the gap at +1.6%, benchmarks/results/family_presets.md). +0.006 GiB over uniform NF4 on gemma-3-270m-it, whose 168 "
            "M-parameter tied embedding stays 16-bit as every output head does.",
        ),
        Family(
            "causal_lm",
            ("llama", "mistral", "qwen2", "phi3", "gemma", "gemma2"),
            "causal_lm",
            _causal_lm_preset,
            "MLP down_proj of the first two and the last language layer stays 16-bit: down-projections "
            "carry the largest measured sensitivity in small language models. A heuristic starting "
            "point — measure with dq.analyze and dq.plan for a model-specific choice.",
        ),
    )
}

_WARNED: set[str] = set()

GENERIC = Family(
    "generic",
    (),
    "unknown",
    _no_preset,
    "Unknown architecture: every Linear layer is quantized except the output head.",
)


def family_of(config_or_model_type) -> Family:
    """The :class:`Family` of a config (or a ``model_type`` string); :data:`GENERIC` with a warning if unknown.

    Example:
        >>> family_of("qwen2_vl").name
        'qwen2_vl'
    """
    model_type = config_or_model_type if isinstance(config_or_model_type, str) else getattr(config_or_model_type, "model_type", None)
    if not model_type:
        raise UnsupportedModelError("The model config has no `model_type`; dq_kit cannot tell its architecture.")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type not in _WARNED:
        _WARNED.add(model_type)
        warnings.warn(
            f"dq_kit has no registry entry for model_type={model_type!r}, so it is treated generically: no preset "
            "(quant='dynamic' without a plan quantizes every Linear but the output head; make a plan with dq.analyze + "
            "dq.plan), module groups and layers guessed from module names alone (check them with dq.inspect), and "
            "sequential analysis not tested for this architecture. Known families: "
            f"{', '.join(sorted(t for family in FAMILIES.values() for t in family.model_types))}.",
            stacklevel=2,
        )
    return GENERIC


def preset_modules(model: nn.Module, family: Family | None = None) -> list[str]:
    """Names of the modules the family's preset keeps in 16-bit for this model.

    Example:
        >>> import dq_kit as dq
        >>> preset_modules(dq.tiny.build_tiny_model("mllama"))
        ['model.language_model.layers.3.cross_attn.o_proj']
    """
    family = family or family_of(model.config)
    fixed = set(always_16bit(model))
    return [name for name in family.preset(linear_modules(model)) if name not in fixed]


def text_config(config: Any) -> Any:
    """The language model's config: ``text_config`` of a vision-language model, else the config itself.

    Example:
        >>> import transformers
        >>> text_config(transformers.LlamaConfig(hidden_size=64)).hidden_size
        64
    """
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_identity(config: Any) -> dict[str, Any]:
    """What tells one model from another of the same type: name or path, layer count, hidden size
    (of the language model, for a vision-language model).

    Example:
        >>> import transformers
        >>> model_identity(transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64))
        {'name_or_path': None, 'num_layers': 2, 'hidden_size': 64}
    """
    text = text_config(config)
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "num_layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
    }


def different_models(plan_identity: dict[str, Any], model_identity: dict[str, Any]) -> str | None:
    """Why two identities are different models (layer count or hidden size differ), else ``None``.
    A different name alone is not: local copies and fine-tunes of a model share its plan.

    Example:
        >>> different_models({"num_layers": 2, "hidden_size": 64}, {"num_layers": 4, "hidden_size": 64})
        '2 layers of width 64 against 4 layers of width 64'
    """
    keys = ("num_layers", "hidden_size")
    if not all(plan_identity.get(k) and model_identity.get(k) for k in keys):
        return None
    if all(plan_identity[k] == model_identity[k] for k in keys):
        return None
    return (f"{plan_identity['num_layers']} layers of width {plan_identity['hidden_size']} against "
            f"{model_identity['num_layers']} layers of width {model_identity['hidden_size']}")
