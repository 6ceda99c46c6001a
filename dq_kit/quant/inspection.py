"""``dq.inspect``: a per-module table of a loaded model — group, layer, shape, precision and bytes."""

from __future__ import annotations

from torch import nn

from ..models import registry
from .corrections import correction_factors, plain_layers
from .memory import loaded_bytes
from .verification import is_quantized


def inspect(model: nn.Module):
    """One row per Linear module: name, tower, group, layer, shape, params, quantized, dtype, bytes,
    and ``correction``: the rank of its low-rank correction (0 for none; ``bytes`` include its factors).

    Example:
        >>> import dq_kit as dq
        >>> table = dq.inspect(dq.tiny.build_tiny_model("qwen2_vl"))
        >>> table.groupby("group")["params"].sum().index.tolist()[:2]
        ['language_attention', 'language_mlp']
    """
    import pandas as pd

    corrections = correction_factors(model)
    rows = []
    with plain_layers(model) as plain:
        modules = dict(plain.named_modules())
        infos = registry.linear_modules(plain)
    for info in infos:
        module = modules[info.name]
        factors = corrections.get(info.name)
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
                "bytes": loaded_bytes(module) + (sum(f.numel() * f.element_size() for f in factors) if factors else 0),
                "correction": int(factors[0].shape[0]) if factors else 0,
            }
        )
    columns = ["name", "tower", "group", "layer", "shape", "params", "quantized", "dtype", "bytes", "correction"]
    table = pd.DataFrame(rows, columns=columns)
    return table.astype({"layer": "Int64"})
