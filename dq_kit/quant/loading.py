"""``dq.load``: one call to get a model in 16-bit, plain NF4, or dynamic 4-bit, plus its processor."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from ..errors import DQError, ModelNotFoundError, PlanError
from ..models.registry import family_of
from ..models.resolution import auto_class, default_device_map, default_dtype, local_or_hub, meta_model, resolve_config
from .checkpoint import checkpoint_file, plan_from_checkpoint, prequantized_config, saved_report_factors
from .corrections import ADAPTER_NAME, attach_corrections, match_compute_dtype, report_factors
from .plan import Plan
from .verification import verify

QUANT_MODES = ("16bit", "4bit", "dynamic")


def load(
    name_or_path: str | os.PathLike,
    quant: str = "dynamic",
    plan: Plan | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device_map: Any = None,
    *,
    report: Any = None,
    processor: bool = True,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a model and its processor in 16-bit, 4-bit (NF4) or dynamic 4-bit.

    Args:
        name_or_path: a hub id (``"Qwen/Qwen2-VL-2B-Instruct"``) or a local model folder.
        quant: ``"16bit"``, ``"4bit"`` (NF4 on every Linear but the output head) or ``"dynamic"``
            (NF4 except the plan's modules, which stay 16-bit).
        plan: a :class:`Plan` or a path to a saved plan; ``None`` with ``quant="dynamic"`` uses the
            checkpoint's own plan (one written by ``dq.save``, or a published dynamic 4-bit skip list)
            or else the architecture's preset (``dq.Plan.preset``).
        dtype: compute / 16-bit dtype; default bf16 on GPU (fp16 where bf16 is missing), fp32 on CPU.
        device_map: passed to transformers/accelerate (``"auto"`` spreads over GPUs); default the
            first GPU, else the CPU.
        report: the :class:`dq_kit.QuantReport` a plan with corrections was made from (its factors);
            a checkpoint written by :func:`dq_kit.save` carries its own in ``dq_correction/``.
        processor: also load the processor (VLMs) or tokenizer (LMs); ``False`` returns ``None``.
        trust_remote_code: run code from the model repository; off unless you trust it.
        **kwargs: passed to ``from_pretrained`` (``revision=``, ``attn_implementation=``, ...).

    Returns:
        ``(model, processor)``. The model's ``dq_plan`` attribute holds the plan it was loaded with
        (``None`` for 16-bit); 4-bit loads are verified against it. With corrections the model is a
        ``peft.PeftModel`` whose frozen ``dq_correction`` adapter holds them.

    Example:
        >>> import dq_kit as dq
        >>> path = dq.tiny.save_tiny("mllama", "/tmp/tiny-mllama")
        >>> model, processor = dq.load(path, quant="dynamic")
        >>> model.dq_plan.keep
        ('model.language_model.layers.3.cross_attn.o_proj',)
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}.")
    if plan is not None and quant != "dynamic":
        raise PlanError(f"A plan applies only to quant='dynamic' (got quant={quant!r}).")
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    config = resolve_config(name_or_path, trust_remote_code=trust_remote_code)
    model_class = auto_class(config)
    family_of(config)  # warns once for an architecture without a registry entry
    device_map = device_map if device_map is not None else default_device_map()
    dtype = dtype or default_dtype(device_map)
    reference = local_or_hub(name_or_path)

    load_kwargs = dict(dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, **kwargs)
    stored = None
    if quant != "16bit":
        skeleton = meta_model(config, trust_remote_code=trust_remote_code)
        stored = plan_from_checkpoint(config, skeleton, reference)  # dq_plan.json, or the checkpoint's own skip list
        if quant == "4bit":
            plan = Plan.uniform(skeleton)
        elif plan is None:
            plan = stored or Plan.preset(skeleton)
        plan.check(skeleton)
        load_kwargs["quantization_config"] = plan.bnb_config(dtype)
    quantized_config = prequantized_config(config, plan, stored, dtype)
    if quantized_config is not None:  # already 4-bit on disk: transformers reads the skip list from the config
        load_kwargs.pop("quantization_config", None)
        load_kwargs["config"] = quantized_config

    try:
        model = model_class.from_pretrained(reference, **load_kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"Could not load the weights of {str(name_or_path)!r}: {str(exc).splitlines()[0]}") from exc
    model.dq_plan = plan
    if plan is not None:
        model = _with_corrections(model, plan, report, reference)
        verify(model, plan)
    return model, (load_processor(reference, config, trust_remote_code=trust_remote_code) if processor else None)


def _with_corrections(model: nn.Module, plan: Plan, report: Any, reference: str | os.PathLike) -> nn.Module:
    """Attach the plan's corrections: from ``report``, else the checkpoint's ``dq_correction`` adapter."""
    if not plan.corrections:
        return model
    factors = report_factors(report)
    if not factors and checkpoint_file(reference, f"{ADAPTER_NAME}/adapter_config.json") is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, reference, subfolder=ADAPTER_NAME, adapter_name=ADAPTER_NAME, is_trainable=False,
                                          autocast_adapter_dtype=False)
        match_compute_dtype(model)
        model.eval()
        return model
    return attach_corrections(model, plan, factors or saved_report_factors(reference, model) or {})


def load_processor(reference: str | os.PathLike, config: Any = None, *, trust_remote_code: bool = False) -> Any:
    """The processor of a vision-language model, or the tokenizer of a language model.

    Example:
        >>> import dq_kit as dq
        >>> type(load_processor(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"))).__name__
        'Qwen2VLProcessor'
    """
    config = config or resolve_config(reference, trust_remote_code=trust_remote_code)
    loader = AutoProcessor if auto_class(config) is AutoModelForImageTextToText else AutoTokenizer
    try:
        return loader.from_pretrained(reference, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise DQError(
            f"Could not load the {loader.__name__[4:].lower()} of {str(reference)!r}: {str(exc).splitlines()[0]}. "
            "Pass processor=False to load the model alone."
        ) from exc
