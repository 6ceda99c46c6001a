"""``dq.quantize``: turn an in-memory 16-bit model into a dynamic 4-bit one, in place, without reloading.

The module swap is transformers' own (``HfQuantizer.preprocess_model`` ->
``replace_with_bnb_linear``) and the weights go through ``bitsandbytes.nn.Params4bit`` exactly as
``from_pretrained(..., quantization_config=...)`` does, so the result is the model
``dq.load(..., quant="dynamic", plan=plan)`` would return on the same weights: same modules
quantized, same packed weights, same outputs, ``save_pretrained`` / PEFT / ``get_memory_footprint`` work.

Example:
    >>> import dq_kit as dq
    >>> model = dq.tiny.build_tiny_model("llama")
    >>> model = dq.quantize(model, dq.Plan.preset(model))
    >>> model.is_loaded_in_4bit, type(model.model.layers[1].self_attn.q_proj).__name__
    (True, 'Linear4bit')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import DQError, PlanError
from ..progress import progress_bar
from .corrections import attach_corrections, check_factors, report_factors
from .plan import Plan
from .verification import is_quantized, verify


def quantize(model: PreTrainedModel, plan: Plan | None = None, *, report: Any = None, progress: bool | None = None) -> PreTrainedModel:
    """Quantize every Linear layer of ``model`` to bitsandbytes 4-bit except the plan's
    ``skip_modules``, in place, and return the model — wrapped in a PEFT model with a frozen
    ``dq_correction`` adapter when the plan has corrections.

    The compute dtype is the model's dtype; quant type and double quantization come from the plan.
    Afterwards ``model.dq_plan`` is ``plan``, ``model.is_loaded_in_4bit`` is true and
    ``model.config.quantization_config`` holds the exact skip list, as after a 4-bit
    ``from_pretrained``; the result is checked with :func:`dq_kit.quant.verification`.

    Args:
        model: a transformers model with real (not meta) 16- or 32-bit weights, not yet quantized.
        plan: which modules stay 16-bit (and which get low-rank corrections); default the
            architecture's preset (``dq.Plan.preset``).
        report: the :class:`dq_kit.QuantReport` the plan was made from; its ``corrections`` hold the
            factors of ``plan.corrections`` (needed only when the plan has corrections).

    Raises:
        PlanError: the plan was made for another architecture, names modules the model lacks, or
            has corrections without their factors.
        DQError: the model is already quantized, has weights on the meta device, or is not a
            transformers model (e.g. already wrapped by PEFT).

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("qwen2_vl")
        >>> plan = dq.Plan.from_patterns(model, ["merger"])
        >>> model = dq.quantize(model, plan)
        >>> sorted(n for n, m in model.named_modules() if type(m).__name__ == "Linear")
        ['lm_head', 'model.visual.merger.mlp.0', 'model.visual.merger.mlp.2']
    """
    _check_quantizable(model)
    plan = plan if plan is not None else Plan.preset(model)
    plan.check(model)
    factors = report_factors(report)
    if plan.corrections and not factors:
        raise PlanError(
            f"The plan corrects {len(plan.corrections)} module(s) but no factors were given: pass report= (the report from "
            "dq.analyze(..., corrections=True) that the plan was made from)."
        )
    check_factors(model, plan, factors)  # before the model changes

    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(plan.bnb_config(model.dtype), pre_quantized=False)
    quantizer.validate_environment(device_map=getattr(model, "hf_device_map", None))
    originals = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    # Swaps the Linear modules that the skip list does not name for empty (meta) Linear4bit modules.
    quantizer.preprocess_model(model=model, dtype=model.dtype, device_map=getattr(model, "hf_device_map", None))
    swapped = [(name, module) for name, module in model.named_modules() if is_quantized(module)]
    for name, module in progress_bar(swapped, progress if progress is not None or len(swapped) >= 50 else False, "Quantizing to 4-bit", unit="module"):
        _load_weights(module, originals.pop(name))  # drop each 16-bit original as soon as it is quantized
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)  # config.quantization_config, is_loaded_in_4bit, config._is_quantized
    model.dq_plan = plan
    model = attach_corrections(model, plan, factors)
    verify(model, plan)
    return model


def _load_weights(target: nn.Module, source: nn.Linear) -> None:
    """Quantize ``source``'s weight into the empty Linear4bit ``target`` on the weight's own device
    (what ``transformers.integrations.bitsandbytes.Bnb4bitQuantize`` does while loading)."""
    import bitsandbytes as bnb

    weight = source.weight.data
    target.weight = bnb.nn.Params4bit(weight, requires_grad=False, **target.weight.__dict__).to(weight.device)
    if source.bias is not None:
        target.bias = source.bias
    # bitsandbytes picks its CPU inference kernel from `training`: match the replaced module.
    target.train(source.training)


def forget_gguf_origin(model: nn.Module) -> bool:
    """Mark a model loaded from a GGUF file as the plain full-precision model it is; True if it was one.

    transformers dequantizes GGUF weights on load but leaves its GGUF quantizer on the model and a
    ``GgufConfig`` in its config, so the model would pass for an already quantized one.

    Example:
        >>> import dq_kit as dq
        >>> forget_gguf_origin(dq.tiny.build_tiny_model("llama"))
        False
    """
    quantizer = getattr(model, "hf_quantizer", None)
    settings = getattr(getattr(model, "config", None), "quantization_config", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None) or getattr(settings, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return False
    model.hf_quantizer = None
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    return True


def _check_quantizable(model: nn.Module) -> None:
    if not isinstance(model, PreTrainedModel):
        raise DQError(
            f"dq.quantize needs a transformers model, got {type(model).__name__}. "
            "Quantize before wrapping the model (PEFT / LoRA adapters go on the quantized model)."
        )
    forget_gguf_origin(model)  # dequantized on load: a full-precision source like any other
    if getattr(model, "is_quantized", False) or any(is_quantized(module) for module in model.modules()):
        raise DQError(
            "The model is already quantized. Quantize a 16-bit model: dq.load(path, quant='16bit'), "
            "or load it directly with dq.load(path, quant='dynamic', plan=plan)."
        )
    meta = [name for name, param in model.named_parameters() if param.device == torch.device("meta")]
    if meta:
        raise DQError(
            f"{len(meta)} parameter(s) are on the meta device (e.g. {meta[0]!r}): there are no weights to quantize. "
            "Load real weights first (dq.load(path, quant='16bit'))."
        )
