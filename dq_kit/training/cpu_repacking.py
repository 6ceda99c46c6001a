"""4-bit layers made trainable again after bitsandbytes' CPU repacking: the one place dq_kit calls a
private bitsandbytes function.

Why private: bitsandbytes 0.50 repacks ``Linear4bit`` weights into a CPU-only layout for inference
and offers no public function to undo it; ``bitsandbytes.functional._convert_weight_packed_for_cpu_inverse``
is the inverse its own code uses. It is looked up when needed, so a bitsandbytes without it (older
releases, or CUDA builds that never repack) simply has nothing to undo.

Example:
    >>> import dq_kit as dq
    >>> model, _ = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="4bit", processor=False)
    >>> make_4bit_trainable(model) is model
    True
"""

from __future__ import annotations

import bitsandbytes as bnb
from torch import nn

__all__ = ["make_4bit_trainable"]


def make_4bit_trainable(model: nn.Module) -> nn.Module:
    """Undo and disable bitsandbytes' CPU inference repacking of 4-bit weights, so the model can be trained.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight into a CPU-only
    layout the first time the layer runs in eval mode without gradients (e.g. ``dq.generate``
    before training). The packed path then fails under autograd ("a view of a leaf Variable that
    requires grad is being used in an in-place operation") and gives wrong results if the weight
    is dequantized. This restores the standard layout and switches the repacking off.

    Example:
        >>> import dq_kit as dq
        >>> model, _ = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="4bit", processor=False)
        >>> make_4bit_trainable(model) is model
        True
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                unpack = bnb.functional._convert_weight_packed_for_cpu_inverse
                weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)
            module.support_avx512bf16_for_cpu = False
    return model
