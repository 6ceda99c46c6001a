"""Check that a loaded model is quantized exactly as its plan says."""

from __future__ import annotations

from torch import nn

from ..errors import VerificationError
from .corrections import base_linears, correction_ranks
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
    """Raise :class:`VerificationError` unless the plan's modules are plain Linear layers, every
    other Linear layer is quantized with its quantization state (scales) in place, and the plan's corrections are exactly the model's
    ``dq_correction`` adapter (same modules, same ranks). The message lists every difference.

    Example:
        >>> import dq_kit as dq
        >>> model, _ = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="4bit", processor=False)
        >>> verify(model, dq.Plan.uniform(model))
    """
    expected_16bit = set(plan.skip_modules)
    modules = base_linears(model)
    linears = {name: is_quantized(module) for name, module in modules.items()}
    missing = sorted(expected_16bit - linears.keys())
    wrongly_quantized = sorted(name for name, quantized in linears.items() if quantized and name in expected_16bit)
    wrongly_16bit = sorted(name for name, quantized in linears.items() if not quantized and name not in expected_16bit)
    stateless = sorted(name for name, quantized in linears.items()
                       if quantized and getattr(modules[name].weight, "quant_state", None) is None)
    problems = [
        (stateless, "4-bit module(s) without a quantization state (their scales were not loaded: the weights are unusable)"),
        (missing, "planned module(s) absent from the model"),
        (wrongly_quantized, "module(s) quantized although the plan keeps them 16-bit"),
        (wrongly_16bit, "module(s) left 16-bit although the plan quantizes them"),
        *_correction_problems(model, plan),
    ]
    if any(names for names, _ in problems):
        lines = ["The loaded model does not match its plan:"]
        for names, what in problems:
            if names:
                shown = ", ".join(names[:10]) + (f", ... (+{len(names) - 10})" if len(names) > 10 else "")
                lines.append(f"  {len(names)} {what}: {shown}")
        lines.append("The skip list may not have matched (transformers' matching rules changed) — report this with the plan.")
        raise VerificationError("\n".join(lines))


def _correction_problems(model: nn.Module, plan: Plan) -> list[tuple[list[str], str]]:
    actual = correction_ranks(model)
    absent = sorted(set(plan.corrections) - set(actual))
    extra = sorted(set(actual) - set(plan.corrections))
    wrong = sorted(f"{name} (rank {actual[name]}, planned {rank})" for name, rank in plan.corrections.items()
                   if name in actual and actual[name] != rank)
    return [
        (absent, "planned correction(s) missing from the dq_correction adapter"),
        (extra, "correction(s) in the dq_correction adapter that the plan does not have"),
        (wrong, "correction(s) of another rank than planned"),
    ]
