"""dq_kit — dynamic 4-bit quantization, LoRA fine-tuning and inspection of vision-language models.

Example:
    >>> import dq_kit as dq
    >>> print(dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct"))          # doctest: +SKIP
    >>> model, processor = dq.load("Qwen/Qwen2-VL-2B-Instruct", quant="dynamic")   # doctest: +SKIP
    >>> dq.inspect(model)                                                  # doctest: +SKIP
"""

from . import modeling, registry, tiny
from .checkpoint import save
from .compare import ComparisonResult, compare
from .errors import DQError, ModelNotFoundError, PlanError, UnsupportedModelError, VerificationError
from .inspection import inspect
from .loading import load, load_processor
from .memory import MemoryEstimate, estimate_memory
from .plan import Plan
from .planner import plan, predicted_kl
from .quantize import quantize
from .verify import verify

__version__ = "0.1.0"

__all__ = [
    "ComparisonResult",
    "DQError",
    "MemoryEstimate",
    "ModelNotFoundError",
    "Plan",
    "PlanError",
    "UnsupportedModelError",
    "VerificationError",
    "estimate_memory",
    "inspect",
    "load",
    "load_processor",
    "plan",
    "predicted_kl",
    "quantize",
    "save",
    "compare",
    "modeling",
    "registry",
    "tiny",
    "verify",
]
