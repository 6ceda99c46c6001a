"""Bytes of weights: bitsandbytes 4-bit storage, low-rank correction factors, whole-model footprints.

Example:
    >>> nf4_weight_bytes(64 * 64, double_quant=False)
    2368
"""

from __future__ import annotations

import math

from torch import nn

from .plan import Plan

BLOCKSIZE = 4 * 16  # bitsandbytes' 4-bit blocksize
NESTED_BLOCKSIZE = 256  # double quantization groups 256 absmax values
_NF4_CODE_BYTES = 16 * 4  # the 16-entry float32 code of NF4/FP4
_NESTED_CODE_BYTES = 256 * 4 + 4  # the 8-bit dynamic code and the offset of double quantization


def nf4_weight_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for a 4-bit weight of ``numel`` elements: packed 4-bit values,
    per-block scales (8-bit with double quantization, else fp32) and the quantization codes.

    Example:
        >>> nf4_weight_bytes(4096 * 4096) / (4096 * 4096) * 8     # doctest: +ELLIPSIS
        4.1274...
    """
    blocks = math.ceil(numel / BLOCKSIZE)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + blocks * 4 + _NF4_CODE_BYTES
    return packed + blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + _NESTED_CODE_BYTES + _NF4_CODE_BYTES


def correction_bytes(rank: int, in_features: int, out_features: int) -> int:
    """Bytes of a rank-``rank`` low-rank correction stored as bf16 factors: ``2·r·(in+out)``.

    Example:
        >>> correction_bytes(8, 576, 1536)
        33792
    """
    return 2 * rank * (in_features + out_features)


def plan_correction_bytes(model: nn.Module, plan: Plan) -> int:
    """Bytes of all of ``plan``'s corrections on ``model`` (a skeleton on the meta device will do).

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> plan_correction_bytes(model, dq.Plan(corrections={"model.layers.0.mlp.down_proj": 4}))   # 2·4·(128 + 64)
        1536
    """
    modules = dict(model.named_modules())
    return sum(correction_bytes(rank, modules[name].in_features, modules[name].out_features) for name, rank in plan.corrections.items())


def footprint_bytes(model: nn.Module, quantized: set[str], *, double_quant: bool = True, bytes_16bit: int = 2) -> int:
    """Bytes of ``model`` with the Linear weights named in ``quantized`` stored in 4-bit and every
    other parameter in 16-bit (tied parameters counted once). Works on a meta-device skeleton.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> footprint_bytes(model, set()) == 2 * sum(p.numel() for p in model.parameters())
        True
    """
    quantized_weights = {f"{name}.weight" for name in quantized}
    total = 0
    for name, param in model.named_parameters():
        if name in quantized_weights:
            total += nf4_weight_bytes(param.numel(), double_quant)
        else:
            total += param.numel() * bytes_16bit
    return total
