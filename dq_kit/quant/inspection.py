"""``dq.inspect``: a per-module table of a loaded model — group, layer, shape, precision and bytes."""

from __future__ import annotations

from torch import nn

from ..models import registry
from .memory import loaded_bytes
from .verification import is_quantized


def inspect(model: nn.Module):
    """One row per Linear module: name, tower, group, layer, shape, params, quantized, dtype, bytes.

    Example:
        >>> import dq_kit as dq
        >>> table = dq.inspect(dq.tiny.build_tiny_model("qwen2_vl"))
        >>> table.groupby("group")["params"].sum().index.tolist()[:2]
        ['language_attention', 'language_mlp']
    """
    import pandas as pd

    modules = dict(model.named_modules())
    rows = []
    for info in registry.linear_modules(model):
        module = modules[info.name]
        quantized = is_quantized(module)
        rows.append(
            {
                "name": info.name,
                "tower": info.tower,
                "group": info.group,
                "layer": info.layer,
                "shape": f"{info.out_features}x{info.in_features}",
                "params": info.numel + (info.out_features if info.bias else 0),
                "quantized": quantized,
                "dtype": getattr(module.weight, "quant_type", "int8") if quantized else str(module.weight.dtype).removeprefix("torch."),
                "bytes": loaded_bytes(module),
            }
        )
    table = pd.DataFrame(rows, columns=["name", "tower", "group", "layer", "shape", "params", "quantized", "dtype", "bytes"])
    return table.astype({"layer": "Int64"})
