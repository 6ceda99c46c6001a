"""Weight error of one Linear weight through the exact bitsandbytes 4-bit round trip.

Example:
    >>> import torch
    >>> w = torch.randn(128, 64) * 0.02
    >>> m = weight_metrics(w, quantize_roundtrip(w))
    >>> 0.08 < m["weight_rel_error"] < 0.11
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

WEIGHT_COLUMNS = (
    "weight_error",
    "weight_rel_error",
    "weight_max_abs_error",
    "weight_outlier_ratio",
    "weight_kurtosis",
)


def quantize_roundtrip(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> torch.Tensor:
    """Quantize ``weight`` to 4 bits and back with bitsandbytes, exactly as a 4-bit load stores it.

    Runs on the weight's device (bitsandbytes 4-bit works on CPU). Returns a tensor of the weight's
    dtype and shape.

    Example:
        >>> w = torch.randn(64, 64)
        >>> quantize_roundtrip(w).shape
        torch.Size([64, 64])
    """
    return _dequantize(*_quantize(weight, quant_type, blocksize, double_quant))


def _quantize(weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, Any, torch.Size, torch.dtype]:
    import bitsandbytes.functional as bnbf

    source = weight.detach()
    if source.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        source = source.float()
    packed, state = bnbf.quantize_4bit(source.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    return packed, state, weight.shape, weight.dtype


def _dequantize(packed: torch.Tensor, state: Any, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, state).reshape(shape).to(dtype)


class QuantizedWeights(Mapping[str, torch.Tensor]):
    """4-bit copies of many weights, kept packed as bitsandbytes stores them (half a byte per weight
    plus scales: an eighth of fp32 weights) and dequantized afresh on every access, so an analysis
    never holds a dequantized copy of the whole model. Values equal :func:`quantize_roundtrip`'s bit for bit.

    Example:
        >>> w = torch.randn(64, 64)
        >>> store = QuantizedWeights("nf4", 64, True)
        >>> torch.equal(store.add("m", w), quantize_roundtrip(w)), torch.equal(store["m"], quantize_roundtrip(w))
        (True, True)
    """

    def __init__(self, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> None:
        self.settings = (quant_type, blocksize, double_quant)
        self._packed: dict[str, tuple[torch.Tensor, Any, torch.Size, torch.dtype]] = {}

    def add(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Quantize ``weight``, keep it packed under ``name``, and return its round trip (for metrics)."""
        self._packed[name] = _quantize(weight, *self.settings)
        return _dequantize(*self._packed[name])

    def __getitem__(self, name: str) -> torch.Tensor:
        return _dequantize(*self._packed[name])

    def __contains__(self, name: object) -> bool:  # without dequantizing, as Mapping's default would
        return name in self._packed

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


def weight_metrics(weight: torch.Tensor, dequantized: torch.Tensor) -> dict[str, float]:
    """Error and outlier statistics of a weight and its 4-bit round trip (computed in float32).

    * ``weight_error``: RMS error divided by the robust spread of the weights (1.4826 x median
      absolute deviation). Equals ``weight_rel_error`` for Gaussian weights (~0.092 for NF4, blocksize 64)
      and grows when a few large weights stretch a block's scale and crush the others.
    * ``weight_rel_error``: relative Frobenius error ``||W - Q(W)|| / ||W||``.
    * ``weight_max_abs_error``: ``max |W - Q(W)|``.
    * ``weight_outlier_ratio``: ``max |W| / std(W)``.
    * ``weight_kurtosis``: excess kurtosis (0 for a Gaussian).

    Example:
        >>> w = torch.randn(64, 64)
        >>> round(weight_metrics(w, w)["weight_rel_error"], 3)
        0.0
    """
    w = weight.detach().float().flatten()
    error = dequantized.detach().float().flatten() - w
    norm = w.norm()
    centred = w - w.mean()
    std = centred.pow(2).mean().sqrt()
    median = w.median()
    robust = 1.4826 * (w - median).abs().median()
    rms_error = error.pow(2).mean().sqrt()
    scale = robust if robust > 0 else std
    return {
        "weight_error": float(rms_error / scale) if scale > 0 else 0.0,
        "weight_rel_error": float(error.norm() / norm) if norm > 0 else 0.0,
        "weight_max_abs_error": float(error.abs().max()),
        "weight_outlier_ratio": float(w.abs().max() / std) if std > 0 else 0.0,
        "weight_kurtosis": float(centred.pow(4).mean() / std.pow(4) - 3) if std > 0 else 0.0,
    }
