"""Check that a loaded model is quantized exactly as its plan says."""

from __future__ import annotations

from torch import nn

from ..errors import VerificationError
from .plan import Plan


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit Linear layer.

    Example:
        >>> is_quantized(nn.Linear(4, 4))
        False
    """
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def verify(model: nn.Module, plan: Plan) -> None:
    """Raise :class:`VerificationError` unless the plan's modules are plain Linear layers and every
    other Linear layer is quantized. The message lists every difference.

    Example:
        >>> import dq_kit as dq
        >>> model, _ = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="4bit", processor=False)
        >>> verify(model, dq.Plan.uniform(model))
    """
    expected_16bit = set(plan.skip_modules)
    linears = {name: is_quantized(module) for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted(expected_16bit - linears.keys())
    wrongly_quantized = sorted(name for name, quantized in linears.items() if quantized and name in expected_16bit)
    wrongly_16bit = sorted(name for name, quantized in linears.items() if not quantized and name not in expected_16bit)
    problems = [
        (missing, "planned module(s) absent from the model"),
        (wrongly_quantized, "module(s) quantized although the plan keeps them 16-bit"),
        (wrongly_16bit, "module(s) left 16-bit although the plan quantizes them"),
    ]
    if any(names for names, _ in problems):
        lines = ["The loaded model does not match its plan:"]
        for names, what in problems:
            if names:
                shown = ", ".join(names[:10]) + (f", ... (+{len(names) - 10})" if len(names) > 10 else "")
                lines.append(f"  {len(names)} {what}: {shown}")
        lines.append("The skip list may not have matched (transformers' matching rules changed) — report this with the plan.")
        raise VerificationError("\n".join(lines))
