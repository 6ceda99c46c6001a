"""Low-rank error corrections as a frozen PEFT LoRA adapter named ``dq_correction``.

A plan's ``corrections`` (module -> rank) say which NF4 modules get ``deq(NF4(W)) + B·A``; the
factors come from the report the plan was made from (``dq.analyze(..., corrections=True)``). They
are stored the way users already hold low-rank weights: a LoRA adapter with ``rank_pattern`` and
``alpha_pattern`` (alpha = r, so the scale is 1), which plain ``peft`` reloads onto the 4-bit model.

Example:
    >>> import dq_kit as dq
    >>> model = dq.quantize(dq.tiny.build_tiny_model("llama"), dq.Plan.uniform(dq.tiny.build_tiny_model("llama")))
    >>> a, b = torch.zeros(4, 64), torch.zeros(128, 4)
    >>> plan = dq.Plan.uniform(model).with_corrections({"model.layers.0.mlp.up_proj": 4})
    >>> wrapped = attach_corrections(model, plan, {"model.layers.0.mlp.up_proj": (a, b)})
    >>> correction_ranks(wrapped)
    {'model.layers.0.mlp.up_proj': 4}
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DQError, PlanError
from ..files import Output, atomic_file, check_target
from .plan import Plan

__all__ = ["ADAPTER_NAME", "attach_corrections", "base_linears", "base_model", "check_factors", "correction_factors",
           "correction_ranks", "has_corrections", "match_compute_dtype", "plain_layers", "read_factors", "report_factors",
           "save_correction_adapter", "strip_corrections", "write_factors"]

ADAPTER_NAME = "dq_correction"


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself when it has none).

    Example:
        >>> base_model(nn.Linear(2, 2)).__class__.__name__
        'Linear'
    """
    return model.get_base_model() if _is_peft(model) else model


def _is_peft(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # a model cannot be a PeftModel before peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


def base_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear layer by its name in the plain model, looking through LoRA wrappers (their
    ``base_layer``), without the adapters' own ``lora_A`` / ``lora_B`` layers.

    Example:
        >>> import dq_kit as dq
        >>> len(base_linears(dq.tiny.build_tiny_model("llama")))
        15
    """
    out: dict[str, nn.Module] = {}
    for name, module in base_model(model).named_modules():
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts) or not isinstance(module, nn.Linear):
            continue
        if parts[-1] == "base_layer":
            name = ".".join(parts[:-1])
        out[name] = module
    return out


def has_corrections(model: nn.Module) -> bool:
    """Whether ``model`` (a PEFT model, or the transformers model inside one) carries a ``dq_correction`` adapter.

    Example:
        >>> import dq_kit as dq
        >>> has_corrections(dq.tiny.build_tiny_model("llama"))
        False
    """
    return ADAPTER_NAME in getattr(base_model(model), "peft_config", {})


def correction_ranks(model: nn.Module) -> dict[str, int]:
    """``{module: rank}`` of the ``dq_correction`` adapter (empty without one).

    Example:
        >>> import dq_kit as dq
        >>> correction_ranks(dq.tiny.build_tiny_model("llama"))
        {}
    """
    return {name: layer.r[ADAPTER_NAME] for name, layer in _corrected_layers(model).items()}


def correction_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` of the ``dq_correction`` adapter, so that the corrected weight is ``deq + B @ A``.

    Example:
        >>> import dq_kit as dq
        >>> correction_factors(dq.tiny.build_tiny_model("llama"))
        {}
    """
    return {
        name: (layer.lora_A[ADAPTER_NAME].weight.detach(), layer.lora_B[ADAPTER_NAME].weight.detach() * layer.scaling[ADAPTER_NAME])
        for name, layer in _corrected_layers(model).items()
    }


def _corrected_layers(model: nn.Module) -> dict[str, nn.Module]:
    if not has_corrections(model):
        return {}
    return {
        name: module for name, module in base_model(model).named_modules()
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and ADAPTER_NAME in module.lora_A
    }


def check_factors(model: nn.Module, plan: Plan, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raise :class:`dq_kit.PlanError` unless ``factors`` hold every planned correction, at a high
    enough rank and of the shape of its module (run it before changing the model).

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> check_factors(model, dq.Plan(corrections={"model.layers.0.mlp.up_proj": 4}), {})
        Traceback (most recent call last):
        ...
        dq_kit.errors.PlanError: The plan corrects 1 module(s) without factors to apply (e.g. 'model.layers.0.mlp.up_proj'). Pass the report the plan was made from (dq.load(..., plan=plan, report=report) / dq.quantize(model, plan, report=report)), saved with its .corrections.safetensors file.
    """
    missing = [name for name in plan.corrections if name not in factors]
    if missing:
        raise PlanError(
            f"The plan corrects {len(missing)} module(s) without factors to apply (e.g. {missing[0]!r}). Pass the report the plan "
            "was made from (dq.load(..., plan=plan, report=report) / dq.quantize(model, plan, report=report)), saved with its "
            ".corrections.safetensors file."
        )
    linears = base_linears(model)
    for name, rank in plan.corrections.items():
        a, b = factors[name]
        layer = linears.get(name)
        if layer is None:
            raise PlanError(f"The plan corrects {name!r}, which is not a Linear layer of this model.")
        if a.shape[0] < rank or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != (layer.out_features, layer.in_features):
            raise PlanError(
                f"The correction factors of {name!r} (B {tuple(b.shape)}, A {tuple(a.shape)}) do not fit a rank-{rank} correction of "
                f"its {layer.out_features}x{layer.in_features} weight: the report belongs to another model or another analysis."
            )


def report_factors(report: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The correction factors of ``report`` (``None`` gives none); anything but a report is refused.

    Example:
        >>> report_factors(None)
        {}
    """
    if report is None:
        return {}
    if not hasattr(report, "corrections"):
        raise DQError(
            f"report= takes a dq.QuantReport, got {type(report).__name__}: load a saved one with dq.QuantReport.load(path)."
        )
    return report.corrections


def attach_corrections(model: nn.Module, plan: Plan, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Wrap a quantized model in a PEFT model whose frozen ``dq_correction`` adapter holds the
    plan's corrections (factors truncated to the planned rank, stored in each layer's compute
    dtype: 2 bytes per parameter on a bf16/fp16 model); returns the model unchanged when the plan has none.

    Raises:
        PlanError: a planned module has no factors, or factors of the wrong shape or too low a rank.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> attach_corrections(model, dq.Plan.uniform(model), {}) is model
        True
    """
    if not plan.corrections:
        return model
    from peft import LoraConfig, get_peft_model

    check_factors(model, plan, factors)
    top = max(plan.corrections.values())
    patterns = {re.escape(name): rank for name, rank in plan.corrections.items()}
    config = LoraConfig(
        r=top, lora_alpha=top, target_modules=list(plan.corrections), rank_pattern=patterns, alpha_pattern=dict(patterns),
        lora_dropout=0.0, bias="none", init_lora_weights=False, inference_mode=True, task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME, autocast_adapter_dtype=False)
    match_compute_dtype(peft_model)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for name, rank in plan.corrections.items():
            layer = inner.get_submodule(name)
            a, b = factors[name]
            target_a, target_b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            target_a.copy_(a[:rank].to(target_a.dtype))
            target_b.copy_(b[:, :rank].to(target_b.dtype))
    peft_model.eval()
    return peft_model


def match_compute_dtype(model: nn.Module) -> None:
    """Store each ``dq_correction`` factor in its layer's compute dtype (PEFT would keep fp32 next to a 4-bit weight).

    Example:
        >>> import dq_kit as dq
        >>> match_compute_dtype(dq.tiny.build_tiny_model("llama"))     # nothing to do without corrections
    """
    for layer in _corrected_layers(model).values():
        base = layer.get_base_layer()
        dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
        if not dtype.is_floating_point:
            continue
        layer.lora_A[ADAPTER_NAME].to(dtype)
        layer.lora_B[ADAPTER_NAME].to(dtype)


def save_correction_adapter(model: nn.Module, folder: Path, checkpoint: Path) -> None:
    """Write the ``dq_correction`` adapter of ``model`` (a PEFT model) to ``folder/dq_correction/``,
    pointing at ``checkpoint`` (the 4-bit model it corrects), without touching the network.

    Example:
        >>> save_correction_adapter(torch.nn.Linear(2, 2), Path("/tmp"), Path("/tmp"))
        Traceback (most recent call last):
        ...
        dq_kit.errors.DQError: The model carries no dq_correction adapter to save.
    """
    if not has_corrections(model):
        raise DQError("The model carries no dq_correction adapter to save.")
    if not _is_peft(model):
        raise DQError(
            "Save the PEFT model that dq.quantize / dq.load returned for a plan with corrections (the transformers model "
            "inside it cannot save its dq_correction adapter)."
        )
    config = model.peft_config[ADAPTER_NAME]
    source = config.base_model_name_or_path
    config.base_model_name_or_path = str(checkpoint)  # the adapter corrects the 4-bit checkpoint, not the 16-bit source
    try:
        model.save_pretrained(folder, selected_adapters=[ADAPTER_NAME], save_embedding_layers=False)  # -> folder/dq_correction/
    finally:
        config.base_model_name_or_path = source


@contextlib.contextmanager
def plain_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the PEFT model's transformers model with every LoRA wrapper replaced by its
    base layer (what ``save_pretrained`` of the quantized model must see); restored afterwards.

    Example:
        >>> import dq_kit as dq
        >>> with plain_layers(dq.tiny.build_tiny_model("llama")) as plain:
        ...     type(plain).__name__
        'LlamaForCausalLM'
    """
    inner, swapped = _unwrap(model)
    try:
        yield inner
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


def _unwrap(model: nn.Module) -> tuple[nn.Module, list[tuple[nn.Module, str, nn.Module]]]:
    """Put every LoRA wrapper's base layer in its place; returns the transformers model and what was replaced."""
    inner = base_model(model)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in list(inner.named_modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module) and isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            parent_name, _, child = name.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            setattr(parent, child, base)
            swapped.append((parent, child, module))
    return inner, swapped


FACTORS_OUTPUT = Output("dq_kit correction factors file", file_format="dq_kit.corrections")


def write_factors(path: str | os.PathLike, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, overwrite: bool = False) -> Path:
    """Save ``{module: (A, B)}`` as bf16 safetensors (``<module>.lora_A`` / ``<module>.lora_B``), atomically;
    an existing file is replaced only when it holds factors too, or with ``overwrite=True``.

    Example:
        >>> import tempfile
        >>> path = write_factors(tempfile.mkdtemp() + "/f.safetensors", {"m": (torch.ones(2, 3), torch.ones(4, 2))})
        >>> tuple(read_factors(path, {"m": (4, 3)})["m"][1].shape)
        (4, 2)
    """
    from safetensors.torch import save_file

    check_target(path, FACTORS_OUTPUT, overwrite)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{name}.lora_A"] = a.detach().to(torch.bfloat16).contiguous().cpu()
        tensors[f"{name}.lora_B"] = b.detach().to(torch.bfloat16).contiguous().cpu()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FACTORS_OUTPUT.file_format})
    return Path(path)


def is_factors_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a correction factors file written by :func:`write_factors`.

    Example:
        >>> is_factors_file("/no/such.safetensors")
        False
    """
    return FACTORS_OUTPUT.is_earlier_output(Path(path))


def read_factors(path: str | os.PathLike, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load factors written by :func:`write_factors`, each checked against ``shapes`` (``{module: (out, in)}``).

    Raises :class:`dq_kit.DQError` naming the file when it is missing, unreadable, or does not match.

    Example:
        >>> read_factors("/no/such.safetensors", {})
        Traceback (most recent call last):
        ...
        dq_kit.errors.DQError: The correction factors file is missing: /no/such.safetensors. Keep it beside its report, or re-run dq.analyze(..., corrections=True).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DQError(f"The correction factors file is missing: {path}. Keep it beside its report, or re-run "
                      "dq.analyze(..., corrections=True).")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DQError(f"Correction factors file {path} is unreadable ({exc}); re-run dq.analyze(..., corrections=True).") from exc
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        b = tensors.get(f"{name}.lora_B")
        if name not in shapes or b is None:
            raise DQError(f"Correction factors file {path} does not match its report: {name!r} is not one of the report's "
                          "modules, or lacks its B factor. Keep a report and its factors together.")
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != shapes[name]:
            raise DQError(f"Correction factors file {path} does not match its report: {name!r} has factors of shapes "
                          f"{tuple(b.shape)} x {tuple(a.shape)} for a {shapes[name][0]}x{shapes[name][1]} weight.")
        factors[name] = (a, b)
    return factors


def strip_corrections(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The transformers model without its ``dq_correction`` wrappers, and the factors they held; its
    ``dq_plan`` loses the corrections (they now live wherever the caller puts the factors).

    Raises :class:`dq_kit.DQError`, before changing anything, when the model carries other adapters too.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> strip_corrections(model) == (model, {})
        True
    """
    if not has_corrections(model):
        return model, {}
    inner = base_model(model)
    if others := sorted(set(inner.peft_config) - {ADAPTER_NAME}):
        raise DQError(f"The model carries adapter(s) {others} besides dq_correction; pass the model dq.load / dq.quantize returned.")
    factors = {name: (a.clone(), b.clone()) for name, (a, b) in correction_factors(model).items()}
    _unwrap(model)
    del inner.peft_config  # set on the wrapped model by peft
    plan = getattr(inner, "dq_plan", None)
    if plan is not None:
        inner.dq_plan = plan.without_corrections()
    return inner, factors
