"""Step 2 — quantize: the ``Plan`` (exact module names, JSON), loading in 16-bit / NF4 / dynamic, in-place
quantization, verification and ``inspect``, the memory model, and dynamic checkpoints.

Example:
    >>> import dq_kit as dq
    >>> print(dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct").gib("4bit") < 2)
    True
"""

from .checkpoint import save
from .inspection import inspect
from .loading import load, load_processor
from .memory import MemoryEstimate, estimate_memory
from .plan import Plan
from .quantization import quantize
from .verification import verify

__all__ = ["MemoryEstimate", "Plan", "estimate_memory", "inspect", "load", "load_processor", "quantize", "save", "verify"]
