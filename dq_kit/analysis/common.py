"""Pieces shared by the whole-model and the sequential analysis: options, quantizable modules, the
weight round trip, calibration samples on the model's device, report metadata and error messages.

Example:
    >>> import dq_kit as dq
    >>> len(quantizable_modules(dq.tiny.build_tiny_model("llama")))
    14
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..data.calibration import CalibrationSample, default_calibration, image_token_ids, prepare_calibration
from ..data.chat import has_image_processor
from ..errors import AnalysisError
from ..models import registry
from ..quant.footprint import footprint_bytes
from ..quant.verification import is_quantized
from ..version import __version__
from .corrections import check_ranks
from .weights import quantize_roundtrip, weight_metrics

METRICS = ("weight", "activation", "sensitivity")
ESTIMATORS = ("fisher", "loo", "both")

def quantizable_modules(model: nn.Module) -> list[registry.ModuleInfo]:
    """Linear modules a 4-bit load quantizes (all but the output head); errors on 4-bit or empty models.

    Example:
        >>> import dq_kit as dq
        >>> len(quantizable_modules(dq.tiny.build_tiny_model("llama")))
        14
    """
    heads = set(registry.always_16bit(model))
    modules = dict(model.named_modules())
    quantized = [name for name, module in modules.items() if isinstance(module, nn.Linear) and is_quantized(module)]
    if quantized:
        raise AnalysisError(
            f"The model already has {len(quantized)} quantized layer(s) (e.g. {quantized[0]!r}); analyze needs the "
            "16-bit model: load it with dq.load(path, quant='16bit')."
        )
    infos = [info for info in registry.linear_modules(model) if info.name not in heads]
    if not infos:
        raise AnalysisError(
            f"The {type(model).__name__} model has no quantizable Linear layer (only the output head, or none at all): "
            "there is nothing for 4-bit quantization to change."
        )
    return infos


def measure_weight(weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """4-bit round trip of one weight and its metrics.

    Example:
        >>> deq, row = measure_weight(torch.randn(64, 64), "nf4", 64, True)
        >>> row["weight_rel_error"] < 0.12
        True
    """
    weight = weight.detach()
    deq = quantize_roundtrip(weight, quant_type, blocksize, double_quant)
    return deq, weight_metrics(weight, deq)


def check_weights_in_memory(model: nn.Module) -> None:
    """Raise :class:`AnalysisError` when parts of ``model`` are offloaded (weights on the meta device).

    accelerate's offload hooks (``device_map`` entries ``"cpu"`` beside a GPU, or ``"disk"``) put a
    module's weights in place only during its forward and would overwrite the 4-bit round trip the
    analysis swaps in, so such a model is refused rather than measured wrong. Layers spread over
    several GPUs (or all on the CPU) hold their weights and are analysed as they are.

    Example:
        >>> with torch.device("meta"):
        ...     offloaded = nn.Sequential(nn.Linear(2, 2))
        >>> try:
        ...     check_weights_in_memory(offloaded)
        ... except AnalysisError as error:
        ...     print(str(error)[:70])
        1 module(s) of this model are offloaded (weights on the meta device: 0
    """
    offloaded = sorted({name.rpartition(".")[0] for name, parameter in model.named_parameters() if parameter.device.type == "meta"})
    if offloaded:
        shown = ", ".join(offloaded[:4]) + (f" and {len(offloaded) - 4} more" if len(offloaded) > 4 else "")
        raise AnalysisError(
            f"{len(offloaded)} module(s) of this model are offloaded (weights on the meta device: {shown}): accelerate puts their "
            "weights in place only while they run, so dq.analyze cannot measure them. Analyse the model's folder layer by layer "
            "instead, dq.analyze(path, sequential=True), or load it with a device_map and max_memory that keep every layer on a "
            "GPU or on the CPU."
        )


def check_finite_weights(weights: dict[str, torch.Tensor]) -> None:
    """Raise :class:`AnalysisError` naming every module whose weight holds NaN or inf.

    Example:
        >>> check_finite_weights({"layer.up": torch.tensor([1.0, float("nan")])})
        Traceback (most recent call last):
        ...
        dq_kit.errors.AnalysisError: 1 module(s) have NaN/inf weights: layer.up (1 value(s)). The model is broken (a corrupt checkpoint, or an overflow when it was converted or trained); reload or repair it before analysing.
    """
    bad = {name: int((~torch.isfinite(weight.detach())).sum()) for name, weight in weights.items()}
    if bad := {name: count for name, count in bad.items() if count}:
        shown = ", ".join(f"{name} ({count} value(s))" for name, count in list(bad.items())[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise AnalysisError(f"{len(bad)} module(s) have NaN/inf weights: {shown}{more}. The model is broken (a corrupt checkpoint, "
                            "or an overflow when it was converted or trained); reload or repair it before analysing.")


def check_options(metrics: Sequence[str], quant_type: str, blocksize: int, estimator: str) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise AnalysisError(f"Unknown metric(s) {unknown!r}; choose from {METRICS}.")
    if quant_type not in ("nf4", "fp4"):
        raise AnalysisError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise AnalysisError(f"blocksize must be a power of two from 32 to 4096 (bitsandbytes uses 64), got {blocksize!r}.")
    if estimator not in ESTIMATORS:
        raise AnalysisError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    return metrics


def check_correction_options(corrections: bool, ranks: Sequence[int], metrics: Sequence[str], estimator: str) -> tuple[int, ...]:
    """The correction rank menu to fit (empty without ``corrections``); corrections need Fisher sensitivity.

    Example:
        >>> check_correction_options(True, [8, 4], ("sensitivity",), "fisher")
        (4, 8)
        >>> check_correction_options(False, [8], ("weight",), "fisher")
        ()
    """
    if not corrections:
        return ()
    if "sensitivity" not in metrics or estimator not in ("fisher", "both"):
        raise AnalysisError(
            "corrections=True scores each correction with the Fisher sensitivity estimator: keep 'sensitivity' in metrics "
            "and use estimator='fisher' (or 'both')."
        )
    return check_ranks(ranks)


def prepare_samples(calibration: Any, processor: Any, config: Any, max_length: int | None, base_dir: Any) -> list[CalibrationSample]:
    check_fit(processor, config)
    if calibration is None:
        calibration = default_calibration(images=processor is not None and has_image_processor(processor))
    samples = prepare_calibration(calibration, processor, config, base_dir=base_dir, max_length=max_length)
    if getattr(config, "vision_config", None) is not None and not any("pixel_values" in s.inputs for s in samples):
        warnings.warn(
            f"None of the {len(samples)} calibration samples has an image, so no vision module of this {config.model_type} model "
            "is exercised: every one gets activation error and sensitivity 0, and no plan can keep one in 16-bit. Calibrate "
            "with samples that have images (the default calibration set does, with the model's processor).",
            stacklevel=3,
        )
    return samples


def check_fit(processor: Any, config: Any) -> None:
    """Refuse a processor that cannot belong to the model (image processor on a text model, other image token)."""
    if processor is None or getattr(processor, "image_processor", None) is None:
        return
    if getattr(config, "vision_config", None) is None:
        raise AnalysisError(
            f"The processor ({type(processor).__name__}) handles images but the {config.model_type!r} model is text-only: "
            "the processor does not belong to this model. Pass the model's tokenizer (dq.load returns the matching pair)."
        )
    wanted = {getattr(config, attr) for attr in ("image_token_id", "image_token_index") if isinstance(getattr(config, attr, None), int)}
    if wanted and not wanted & image_token_ids(processor):
        raise AnalysisError(
            f"The processor's image token is not the model's (image token id {min(wanted)}): the processor "
            f"({type(processor).__name__}) does not belong to this {config.model_type!r} model."
        )


def finite_rows(ref_logp: torch.Tensor) -> torch.Tensor:
    """Positions whose 16-bit distribution is finite (non-finite ones are counted, not scored)."""
    return torch.isfinite(ref_logp).all(dim=-1)


def base_meta(model: Any, settings: dict[str, Any], metrics: Sequence[str], estimator: str, *, sequential: bool) -> dict[str, Any]:
    config = model.config
    heads = registry.always_16bit(model)
    quantizable = {info.name for info in registry.linear_modules(model)} - set(heads)
    return {
        "model_type": config.model_type,
        "family": registry.family_of(config).name,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "identity": registry.model_identity(config),
        "output_heads": heads,
        "bytes_16bit": footprint_bytes(model, set()),
        "bytes_4bit": footprint_bytes(model, quantizable, double_quant=settings.get("double_quant", True)),
        **settings,
        "metrics": list(metrics),
        "estimator": estimator if "sensitivity" in metrics else None,
        "sequential": sequential,
        "dq_kit_version": __version__,
        "torch_version": torch.__version__,
    }


def kl_meta(samples: list[CalibrationSample], outcome: dict[str, Any]) -> dict[str, Any]:
    tokens = outcome["num_tokens"]
    return {
        "calibration_samples": len(samples),
        "calibration_tokens": sum(s.num_tokens for s in samples),
        "scored_tokens": tokens,
        "kl_uniform": outcome["kl"] / tokens if tokens else float("nan"),
        "top1_agreement": outcome["top1"] / tokens if tokens else float("nan"),
        "nonfinite_positions": outcome["nonfinite_positions"],
    }


def tower_and_layer_of_blocks(blocks: dict[str, list[str]], infos: list[registry.ModuleInfo]) -> dict[str, tuple[str, int | None]]:
    by_name = {info.name: info for info in infos}
    return {block: (by_name[linears[0]].tower, by_name[linears[0]].layer) for block, linears in blocks.items()}


def model_inputs(sample: CalibrationSample, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The sample's tensors on ``device``, floating ones (pixel values) in the model's ``dtype``."""
    out = {}
    for key, value in sample.inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        out[key] = value
    return out


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next(model.parameters())
    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return weight.device, floating


@contextlib.contextmanager
def sample_errors(index: int) -> Iterator[None]:
    """Turn the model's own failure on calibration sample ``index`` into an :class:`AnalysisError` that says what to check."""
    try:
        yield
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
        raise AnalysisError(
            f"The model failed on calibration sample {index} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Check that the processor belongs to this model (load both with dq.load) and that the sample fits it."
        ) from exc


def forward_logits(model: nn.Module, inputs: dict[str, Any], index: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of one sample (batch of one): at the positions ``mask`` selects, else at every position.

    Where the model's forward takes ``logits_to_keep`` (transformers' causal LMs and VLMs), only the
    selected positions go through the output head: the full ``[tokens, vocab]`` logits (600 MiB for
    a 1000-token image chat with a 151k vocabulary) are never made.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> inputs = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
        >>> mask = torch.tensor([False, True, False, True])
        >>> torch.allclose(forward_logits(model, inputs, 0, mask), forward_logits(model, inputs, 0)[mask], atol=1e-6)
        True
    """
    with sample_errors(index):
        if mask is None:
            return model(**inputs, use_cache=False).logits[0]
        if _keeps_logits(type(model)):
            return model(**inputs, use_cache=False, logits_to_keep=mask.nonzero().squeeze(-1)).logits[0]
        return model(**inputs, use_cache=False).logits[0][mask]


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters

