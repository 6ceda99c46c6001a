"""Save a LoRA adapter, merge it into a plain 16-bit model, and re-quantize the merge with a plan.

Example:
    >>> import dq_kit as dq
    >>> model, processor = dq.load(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), quant="dynamic")
    >>> peft_model = dq.add_lora(model, r=4)                     # doctest: +ELLIPSIS
    trainable params: ...
    >>> dq.save_adapter(peft_model, "/tmp/adapter").name
    'adapter'
    >>> merged = dq.merge_to_16bit(peft_model, "/tmp/merged", processor=processor)
    >>> requantized = dq.requantize(merged)                     # same plan as the original load
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from ..errors import DQError
from ..files import Output, atomic_directory, check_target
from ..models.resolution import default_dtype
from ..quant.checkpoint import CHECKPOINT
from ..quant.loading import load
from ..quant.plan import Plan
from .cpu_repacking import make_4bit_trainable

ADAPTER = Output("LoRA adapter", marker="adapter_config.json")


def save_adapter(peft_model: PeftModel, path: str | os.PathLike, processor: Any = None, *, overwrite: bool = False) -> Path:
    """Save the LoRA adapter alone (``adapter_model.safetensors`` + ``adapter_config.json``), atomically.

    ``processor`` (optional) is saved alongside, so the folder is self-contained for inference.
    Reload with ``peft.PeftModel.from_pretrained(base_model, path)``. An existing adapter folder
    at ``path`` is replaced; a folder with other files, or a file, is refused unless ``overwrite=True``.

    Example:
        >>> import dq_kit as dq
        >>> model, _ = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="4bit", processor=False)
        >>> path = save_adapter(dq.add_lora(model, r=4), "/tmp/llama-adapter")     # doctest: +ELLIPSIS
        trainable params: ...
        >>> sorted(p.name for p in path.iterdir())
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    if not isinstance(peft_model, PeftModel):
        raise DQError("save_adapter needs a model returned by dq.add_lora (a peft.PeftModel).")
    with atomic_directory(path, ADAPTER, overwrite) as staging:
        peft_model.save_pretrained(staging, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(staging)
    return Path(path).expanduser().resolve()


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The full-precision weight of a plain or bitsandbytes 4-bit Linear."""
    if isinstance(module, bnb.nn.Linear4bit):
        make_4bit_trainable(module)
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return module.weight.data.float()


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def merge_to_16bit(
    peft_model: PeftModel,
    path: str | os.PathLike | None = None,
    processor: Any = None,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> nn.Module:
    """Merge every LoRA adapter into dequantized base weights: a plain model with no 4-bit layer left.

    4-bit base layers are dequantized with bitsandbytes, the LoRA update ``B @ A * scale`` added
    in fp32, and the sum stored as a plain ``nn.Linear`` of ``dtype`` (default bf16 on GPU, fp32
    on CPU, like ``dq.load(..., quant="16bit")``); other 4-bit layers are dequantized as they are.
    The PEFT model is consumed (its modules are replaced in place, as PEFT's ``merge_and_unload``
    does). With ``path`` the model (safetensors, no quantization config) and ``processor`` are
    saved there atomically; an existing checkpoint at ``path`` is replaced, a folder with other files
    or a file refused (checked before anything is merged) unless ``overwrite=True``. The returned
    model keeps ``dq_plan`` for :func:`requantize`.

    Example:
        >>> import dq_kit as dq
        >>> model, processor = dq.load(dq.tiny.save_tiny("llava", "/tmp/tiny-llava"), quant="dynamic")
        >>> merged = merge_to_16bit(dq.add_lora(model, r=4))          # doctest: +ELLIPSIS
        trainable params: ...
        >>> from dq_kit.quant.verification import is_quantized
        >>> any(is_quantized(m) for m in merged.modules())
        False
    """
    if not isinstance(peft_model, PeftModel):
        raise DQError("merge_to_16bit needs a model returned by dq.add_lora (a peft.PeftModel).")
    if path is not None:
        check_target(path, CHECKPOINT, overwrite)
    dtype = dtype or default_dtype(None)
    model = peft_model.get_base_model()
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                weight = _dense_weight(base)
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).float()
                _set_module(model, name, _plain_linear(weight, base.bias, dtype))
        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit):
                _set_module(model, name, _plain_linear(_dense_weight(module), module.bias, dtype))
    for attribute in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
    for attribute in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attribute in vars(model):
            setattr(model, attribute, False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if getattr(model, "dq_plan", None) is not None:  # merged corrections are part of the 16-bit weights now
        model.dq_plan = model.dq_plan.without_corrections()
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    model.eval()
    if path is not None:
        with atomic_directory(path, CHECKPOINT, overwrite) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            if processor is not None:
                processor.save_pretrained(staging)
    return model


def requantize(merged_model: nn.Module, plan: Plan | str | os.PathLike | None = None) -> nn.Module:
    """Re-quantize a merged 16-bit model dynamically: NF4 everywhere except the plan's modules.

    ``plan`` defaults to the one the adapter's base model was loaded with (``merged_model.dq_plan``),
    else the family preset. The model is saved to a temporary folder and reloaded with
    ``dq.load(folder, quant="dynamic", plan=plan)``, so the result is verified against the plan.

    Example:
        >>> import dq_kit as dq
        >>> model, _ = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="dynamic", processor=False)
        >>> merged = dq.merge_to_16bit(dq.add_lora(model, r=4))         # doctest: +ELLIPSIS
        trainable params: ...
        >>> requantize(merged).dq_plan == model.dq_plan
        True
    """
    plan = plan if plan is not None else getattr(merged_model, "dq_plan", None)
    with tempfile.TemporaryDirectory(prefix="dq-requantize-") as folder:
        merged_model.save_pretrained(folder, safe_serialization=True)
        model, _ = load(folder, quant="dynamic", plan=plan, processor=False)
    return model
