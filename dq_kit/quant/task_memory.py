"""What a task adds to device memory beyond the loaded model: inference, analysis, LoRA training.

The estimates count the tensors each task holds at its peak, from the model's shapes alone (a
meta-device skeleton): no weights are read. Per transformer layer of ``T`` tokens, a forward pass
with gradients saves about ``8·T·H + 4·T·I`` activations (hidden size ``H``, MLP width ``I``: the
norms' inputs, the inputs of the projections, q, k and v, the MLP's gate, up, activation and
product) plus, on the CPU, ``heads·T²`` attention probabilities; ``benchmarks/memory_model.py``
checks the totals against measured peaks.

Example:
    >>> import dq_kit as dq
    >>> from dq_kit.models.resolution import meta_model, resolve_config
    >>> model = meta_model(resolve_config("Qwen/Qwen2-VL-2B-Instruct", prefer_shipped=True))
    >>> peak = task_memory(model, dq.Plan.preset(model), Workload("analyze", element_size=2)).peak_bytes
    >>> 0 < peak < 4 * 2**30
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DQError
from ..models import registry
from ..units import GIB
from .footprint import footprint_bytes, nf4_weight_bytes
from .plan import Plan

TASKS = ("inference", "analyze", "train")
# usable memory of common GPUs (what torch reports as total), and what the CUDA context takes before any tensor
GPUS: dict[str, float] = {"T4 16 GB": 15.0 * GIB, "L4 24 GB": 22.2 * GIB, "A100 40 GB": 39.4 * GIB,
                          "A100 80 GB": 79.1 * GIB, "H100 80 GB": 79.1 * GIB}
CUDA_CONTEXT = int(0.5 * GIB)
CORRECTION_MOMENT_GROUP = GIB  # dq.analyze fits corrections in groups of at most this many bytes of input moments
LORA_BYTES_PER_PARAM = 16  # fp32 adapter weight, its gradient and Adam's two moments


@dataclass(frozen=True)
class Workload:
    """The work a memory estimate is for; every count must be positive.

    Attributes:
        task: ``"inference"`` (generation), ``"analyze"`` (:func:`dq_kit.analyze`) or ``"train"`` (LoRA).
        sequential: analysis in sequential mode (one layer at a time, streamed from the checkpoint).
        samples: calibration samples (analysis).
        tokens: language-model tokens per calibration sample (analysis), image tokens included.
        vision_tokens: patches per image in the vision tower (default: from the config's image size,
            tiles and patch size, or a 224-pixel image as in dq_kit's default calibration).
        batch_size, seq_len: per-device batch and sequence length (inference: prompt + new tokens).
        lora_r: LoRA rank (training), on every Linear of the language model.
        gradient_checkpointing: training recomputes layer activations in the backward pass.
        corrections: analysis also fits low-rank corrections.
        element_size: bytes per element of the compute dtype (2 for bf16/fp16 on a GPU, 4 on the CPU).
        device: ``"cpu"`` or ``"cuda"``. On the CPU attention probabilities are materialised (``T²``
            per head) and TRL's loss makes fp32 copies of the logits; on a GPU fused kernels avoid both.

    Example:
        >>> Workload("train", batch_size=0)
        Traceback (most recent call last):
        ...
        dq_kit.errors.DQError: batch_size must be a positive whole number, got 0.
    """

    task: str = "inference"
    sequential: bool = False
    samples: int = 8
    tokens: int = 256
    vision_tokens: int | None = None
    batch_size: int = 1
    seq_len: int = 512
    lora_r: int = 16
    gradient_checkpointing: bool = True
    corrections: bool = False
    element_size: int = 2
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise DQError(f"device must be 'cuda' or 'cpu', got {self.device!r}.")
        if self.task not in TASKS:
            raise DQError(f"task must be one of {TASKS}, got {self.task!r}.")
        for name in ("samples", "tokens", "batch_size", "seq_len", "lora_r", "element_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DQError(f"{name} must be a positive whole number, got {value!r}.")
        if self.vision_tokens is not None and (isinstance(self.vision_tokens, bool) or not isinstance(self.vision_tokens, int)
                                               or self.vision_tokens < 0):
            raise DQError(f"vision_tokens must be a whole number >= 0, got {self.vision_tokens!r}.")


@dataclass(frozen=True)
class TaskMemory:
    """Device memory of one task: the model as it sits during the task, and what the task adds at its peak.

    Attributes:
        resident_bytes: the model on the device during the task (16-bit for a whole-model analysis,
            nothing for a sequential one, the 4-bit plan for inference and training).
        peak_bytes: what the task adds beyond that, at its peak.
        parts: the peak's main terms, by name.
    """

    task: str
    resident_bytes: int
    peak_bytes: int
    parts: dict[str, int]

    @property
    def total_bytes(self) -> int:
        """Resident model plus the task's peak."""
        return self.resident_bytes + self.peak_bytes

    def fits(self) -> dict[str, bool]:
        """Per common GPU, whether the total fits beside the CUDA context.

        Example:
            >>> TaskMemory("inference", 2 * 2**30, 2**30, {}).fits()["T4 16 GB"]
            True
        """
        return {gpu: self.total_bytes + CUDA_CONTEXT <= capacity for gpu, capacity in GPUS.items()}


@dataclass(frozen=True)
class _Tower:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    linears: list[registry.ModuleInfo]
    eager_attention: bool

    def layer_activations(self, tokens: int, element_size: int) -> int:
        """Activations one layer saves for its backward pass on ``tokens`` tokens."""
        attention = self.heads * tokens * tokens if self.eager_attention else 0
        return (8 * tokens * self.hidden + 4 * tokens * self.intermediate + attention) * element_size


def task_memory(model: nn.Module, plan: Plan, workload: Workload) -> TaskMemory:
    """The memory ``workload`` needs on ``model`` (a skeleton on the meta device will do) loaded with ``plan``.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> memory = task_memory(model, dq.Plan.preset(model), Workload("train", element_size=4))
        >>> sorted(memory.parts)
        ['activations', 'dequantized weight', 'logits', 'lora + optimizer']
    """
    infos = registry.linear_modules(model)
    heads = set(registry.always_16bit(model))
    quantizable = [info for info in infos if info.name not in heads]
    skip = set(plan.skip_modules)
    quantized = {info.name for info in infos} - skip
    towers = _towers(model.config, quantizable, eager_attention=workload.device == "cpu")
    language = towers["language"]
    vocab = registry.text_config(model.config).vocab_size
    e = workload.element_size
    vision_tokens = _vision_tokens(model.config, workload.vision_tokens)
    largest = max((info.numel for info in quantizable), default=0)
    plan_bytes = footprint_bytes(model, quantized, double_quant=plan.double_quant, bytes_16bit=e)

    if workload.task == "inference":
        b, s = workload.batch_size, workload.seq_len
        kv = registry.text_config(model.config)
        kv_dim = getattr(kv, "num_key_value_heads", None) or language.heads
        kv_dim = kv_dim * (getattr(kv, "head_dim", None) or language.hidden // max(language.heads, 1))
        parts = {
            "kv cache": 2 * language.layers * b * s * kv_dim * e,
            "prefill activations": b * s * (4 * language.hidden + 2 * language.intermediate) * e
            + (b * language.heads * s * s * e if workload.device == "cpu" else 0),
            "logits": 2 * b * vocab * 4,
            "dequantized weight": largest * e if quantized else 0,
        }
        return TaskMemory("inference", plan_bytes, sum(parts.values()), parts)

    if workload.task == "train":
        b, s = workload.batch_size, workload.seq_len
        lora = sum(workload.lora_r * (info.in_features + info.out_features) for info in language.linears)
        per_layer = language.layer_activations(b * s, e)
        activations = (language.layers * b * s * language.hidden * e + per_layer if workload.gradient_checkpointing
                       else language.layers * per_layer)
        if "vision" in towers and vision_tokens:  # images of the batch through the vision tower, with gradients
            vision = towers["vision"]
            per_vision_layer = vision.layer_activations(b * vision_tokens, e)
            activations += (vision.layers * b * vision_tokens * vision.hidden * e + per_vision_layer
                            if workload.gradient_checkpointing else vision.layers * per_vision_layer)
        parts = {
            "lora + optimizer": lora * LORA_BYTES_PER_PARAM,
            "activations": activations,
            # the logits and what TRL's loss and token metrics make of them: on the CPU seven fp32 copies (log-probabilities,
            # softmax for the entropy, gradients; benchmarks/memory_model.py), on a GPU its fused kernels keep the gradient alone
            "logits": b * s * vocab * (e + (7 * 4 if workload.device == "cpu" else e)),
            "dequantized weight": 2 * largest * e if quantized else 0,  # a 4-bit layer's weight, dequantized for its backward
        }
        return TaskMemory("train", plan_bytes, sum(parts.values()), parts)

    return _analysis_memory(model, workload, towers, quantizable, vocab, vision_tokens, largest)


def _analysis_memory(model: nn.Module, workload: Workload, towers: dict[str, _Tower], quantizable: list[registry.ModuleInfo],
                     vocab: int, vision_tokens: int, largest: int) -> TaskMemory:
    e, t, samples = workload.element_size, workload.tokens, workload.samples
    tokens = {"language": t, "projector": t, "vision": vision_tokens}
    scored = max(t // 2, 1)
    language = towers["language"]
    corrections = 0
    if workload.corrections:
        moments = sum(info.in_features ** 2 * 4 for info in quantizable)
        factors = sum(64 * (info.in_features + info.out_features) * 2 for info in quantizable)
        corrections = min(moments, CORRECTION_MOMENT_GROUP) + factors
    if not workload.sequential:
        parts = {
            "4-bit weights (packed)": sum(nf4_weight_bytes(info.numel) for info in quantizable),
            "activations": sum(tower.layers * tower.layer_activations(tokens.get(name, t), e) for name, tower in towers.items()),
            # the activation probe's 16-bit outputs: most are saved for the backward pass anyway; q, k, the attention and
            # MLP outputs and the block's output are not (five hidden-size tensors per layer)
            "reference outputs": sum(5 * tower.layers * tokens.get(name, t) * tower.hidden * e for name, tower in towers.items()),
            # at the scored positions, in fp32: the 16-bit logits, their selection, log-probabilities, the sampled labels'
            # probabilities, the loss's log-softmax and the gradients back through them (8 copies at the start of backward)
            "logits": scored * vocab * 4 * 8,
            "per-module scratch": 5 * largest * 4,  # a gradient, its 4-bit round trip, their difference and products, in fp32
            "corrections": corrections,
        }
        return TaskMemory("analyze", footprint_bytes(model, set(), bytes_16bit=e), sum(parts.values()), parts)
    # sequential: the streams of every sample stay; the front, one layer, or the head is in memory at a time
    layer_params = max((sum(info.numel for info in language.linears if info.layer == layer) for layer in range(language.layers)), default=0)
    stream = samples * t * language.hidden * e
    one_layer = language.layer_activations(t, e) + 5 * t * language.hidden * e
    head = _head_bytes(model, e) + t * vocab * (e + 3 * 4)  # full-vocabulary logits, their fp32 copy, log-probabilities, gradient
    front = _front_bytes(model, e)
    vision = towers.get("vision")
    front_phase = front + (vision.layers * vision.layer_activations(vision_tokens, e) if vision else 0)
    phases = {
        "front (embeddings, vision tower)": front_phase,
        "one layer, forward (weights, 4-bit copy, activations)": 2 * layer_params * e + one_layer,
        "output head and logits": head,
        "one layer, Fisher backward (weights, 4-bit copy, gradients, activations)": 3 * layer_params * e + one_layer + stream,
    }
    largest_phase = max(phases, key=phases.get)
    parts = {
        "hidden states of every sample (16-bit and 4-bit streams, saved layer inputs)": (2 + language.layers) * stream,
        largest_phase: phases[largest_phase],
        "front kept for its Fisher backward": front if vision and largest_phase != "front (embeddings, vision tower)" else 0,
        "corrections": corrections,
    }
    return TaskMemory("analyze", 0, sum(parts.values()), parts)


def _head_bytes(model: nn.Module, element_size: int) -> int:
    """Parameters of the output head."""
    heads = registry.output_head_names(model)
    return sum(model.get_submodule(name).weight.numel() * element_size for name in heads)


def _front_bytes(model: nn.Module, element_size: int) -> int:
    """Parameters outside the language model's decoder layers (embeddings, vision tower, projector, head)."""
    total, seen = 0, set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if not (registry.classify(name)[0] == "language" and registry.block_of(name) is not None):
            total += param.numel() * element_size
    return total


def _towers(config: Any, infos: list[registry.ModuleInfo], eager_attention: bool) -> dict[str, _Tower]:
    text = registry.text_config(config)
    towers = {"language": _Tower(text.num_hidden_layers, text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
                                 text.num_attention_heads, [i for i in infos if i.tower == "language"], eager_attention)}
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        hidden = getattr(vision, "embed_dim", None) or vision.hidden_size
        layers = (getattr(vision, "depth", None) or vision.num_hidden_layers) + (getattr(vision, "num_global_layers", None) or 0)
        width = getattr(vision, "intermediate_size", None) or int((getattr(vision, "mlp_ratio", None) or 4) * hidden)
        heads = getattr(vision, "num_heads", None) or getattr(vision, "attention_heads", None) or vision.num_attention_heads
        towers["vision"] = _Tower(layers, hidden, width, heads, [i for i in infos if i.tower == "vision"], eager_attention)
    return towers


def _vision_tokens(config: Any, given: int | None) -> int:
    """Patches per image in the vision tower: given, else from the config, else a 224-pixel image; 0 for a text model."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0
    if given is not None:
        return given
    image, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and patch:
        return (image // patch) ** 2 * (getattr(vision, "max_num_tiles", None) or 1)
    return (224 // patch) ** 2 if isinstance(patch, int) and patch else 256


def available_bytes(device: str | None = None) -> int | None:
    """Free memory where a task would run: the GPU's free memory (``"cuda"``), else the memory the OS
    reports available (Linux ``MemAvailable``); ``None`` where it cannot tell.

    Example:
        >>> available_bytes("cpu") is None or available_bytes("cpu") > 0
        True
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    line = next((line for line in lines if line.startswith("MemAvailable:")), None)
    return int(line.split()[1]) * 1024 if line else None
