"""``dq.load``: one call to get a model in 16-bit, plain NF4, or dynamic 4-bit, plus its processor."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from ..errors import DQError, ModelNotFoundError, PlanError
from ..models.registry import always_16bit, family_of
from ..models.resolution import auto_class, default_device_map, default_dtype, local_or_hub, meta_model, resolve_config
from .checkpoint import checkpoint_file, plan_from_checkpoint, prequantized_config, saved_report_factors
from .corrections import ADAPTER_NAME, attach_corrections, match_compute_dtype, report_factors
from .plan import Plan
from .quantization import forget_gguf_origin, quantize
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
    gguf_file: str | None = None,
    quant_storage: torch.dtype | None = None,
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
        gguf_file: a GGUF file in ``name_or_path`` (``"SmolLM2-135M-Instruct.Q4_1.gguf"``):
            transformers dequantizes it to ``dtype``, and dq_kit treats the result as the
            full-precision source it is (4-bit modes quantize it in memory with the plan).
        quant_storage: the dtype packed 4-bit weights are stored as (bitsandbytes'
            ``bnb_4bit_quant_storage``; default uint8). Pass the 16-bit dtype (``torch.bfloat16``) to
            shard a 4-bit model with FSDP, which needs one dtype for all the parameters it flattens.
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
    _check_device_map(device_map)
    config = resolve_config(name_or_path, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    model_class = auto_class(config)
    family_of(config)  # warns once for an architecture without a registry entry
    device_map = device_map if device_map is not None else default_device_map()
    dtype = dtype or default_dtype(device_map)
    reference = local_or_hub(name_or_path)

    load_kwargs = dict(dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, **kwargs)
    if gguf_file is not None:
        return _load_gguf(model_class, reference, gguf_file, quant, plan, report, processor, load_kwargs)
    stored = None
    if quant != "16bit":
        skeleton = meta_model(config, trust_remote_code=trust_remote_code)
        stored = plan_from_checkpoint(config, skeleton, reference)  # dq_plan.json, or the checkpoint's own skip list
        if quant == "4bit":
            plan = Plan.uniform(skeleton)
        elif plan is None:
            plan = stored or Plan.preset(skeleton)
        plan.check(skeleton)
        missing = sorted(set(always_16bit(skeleton)) - set(plan.skip_modules))
        if missing:  # a hand-made or older plan: output heads and Linear patch embeddings are never 4-bit
            plan = replace(plan, fixed=tuple(sorted(set(plan.fixed) | set(missing))))
        load_kwargs["quantization_config"] = plan.bnb_config(dtype, quant_storage or torch.uint8)
    quantized_config = prequantized_config(config, plan, stored, dtype)
    if quantized_config is not None:  # already 4-bit on disk: transformers reads the skip list from the config
        load_kwargs.pop("quantization_config", None)
        load_kwargs["config"] = quantized_config

    model = _from_pretrained(model_class, reference, load_kwargs)
    model.dq_plan = plan
    if plan is not None:
        model = _with_corrections(model, plan, report, reference)
        verify(model, plan)
    return model, (load_processor(reference, config, trust_remote_code=trust_remote_code) if processor else None)


def _from_pretrained(model_class: type, reference: str | os.PathLike, load_kwargs: dict[str, Any]) -> nn.Module:
    """``from_pretrained`` with its file errors turned into :class:`dq_kit.DQError` naming the file."""
    from safetensors import SafetensorError

    try:
        return model_class.from_pretrained(reference, **load_kwargs)
    except SafetensorError as exc:
        broken = _unreadable_safetensors(reference)
        where = f"{broken} is unreadable" if broken else "a safetensors file is unreadable"
        raise ModelNotFoundError(f"Could not load the weights of {str(reference)!r}: {where} ({exc}). The file is truncated or "
                                 "corrupt (an interrupted download or copy): download or copy it again.") from exc
    except OSError as exc:
        raise ModelNotFoundError(f"Could not load the weights of {str(reference)!r}: {str(exc).splitlines()[0]}") from exc


def _unreadable_safetensors(reference: str | os.PathLike) -> Path | None:
    """The first ``*.safetensors`` file of a local folder whose header cannot be read."""
    from safetensors import SafetensorError, safe_open

    folder = Path(reference)
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError):
            return file
    return None


def _check_device_map(device_map: Any) -> None:
    """Refuse a device map that names a GPU on a machine without one, before anything is read."""
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    wants_gpu = any(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, (str, torch.device)) and str(v).startswith("cuda")
                    for v in values)
    if wants_gpu and not torch.cuda.is_available():
        raise DQError(f"device_map={device_map!r} asks for a CUDA GPU, but torch sees none on this machine "
                      "(torch.cuda.is_available() is False). Leave device_map out (the CPU is used), or pass device_map='cpu'.")


def _load_gguf(model_class: type, reference: str, gguf_file: str, quant: str, plan: Plan | None, report: Any, processor: bool,
               load_kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Load a GGUF file (dequantized by transformers), then quantize it in memory for the 4-bit modes."""
    model = _from_pretrained(model_class, reference, {**load_kwargs, "gguf_file": gguf_file})
    forget_gguf_origin(model)
    model.dq_plan = None
    if quant == "4bit":
        model = quantize(model, Plan.uniform(model))
    elif quant == "dynamic":
        model = quantize(model, plan or Plan.preset(model), report=report)
    tokenizer = None
    if processor:
        try:
            hub = {k: v for k, v in load_kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code")}
            tokenizer = AutoTokenizer.from_pretrained(reference, gguf_file=gguf_file, **hub)
        except (OSError, ValueError, TypeError) as exc:
            raise DQError(f"Could not load the tokenizer from {gguf_file!r}: {str(exc).splitlines()[0]}. "
                          "Pass processor=False to load the model alone.") from exc
    return model, tokenizer


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
