"""dq_kit — dynamic 4-bit quantization, LoRA fine-tuning and inspection of vision-language models.

Example:
    >>> import dq_kit as dq
    >>> print(dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct"))          # doctest: +SKIP
    >>> model, processor = dq.load("Qwen/Qwen2-VL-2B-Instruct", quant="dynamic")   # doctest: +SKIP
    >>> dq.inspect(model)                                                  # doctest: +SKIP
"""

import logging

# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package
# (which would fetch CPU kernels from a hub) is absent; its own fallback kernels work, so drop it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

from . import calibration, data, modeling, registry, tiny, widgets
from .analysis import AnalysisError, QuantReport, analyze
from .calibration import CalibrationError, default_calibration
from .checkpoint import save
from .compare import ComparisonResult, compare
from .errors import DQError, ModelNotFoundError, PlanError, UnsupportedModelError, VerificationError
from .export import merge_to_16bit, requantize, save_adapter
from .inference import evaluate_answers, generate
from .inspection import inspect
from .loading import load, load_processor
from .lora import add_lora
from .memory import MemoryEstimate, estimate_memory
from .plans import Plan
from .planner import plan, predicted_kl
from .quantize import quantize
from .refine import Refiner, refine_plan
from .train import sft_trainer
from .verification import verify

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "CalibrationError",
    "ComparisonResult",
    "QuantReport",
    "Refiner",
    "analyze",
    "calibration",
    "default_calibration",
    "DQError",
    "add_lora",
    "data",
    "evaluate_answers",
    "generate",
    "merge_to_16bit",
    "requantize",
    "save_adapter",
    "sft_trainer",
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
    "refine_plan",
    "save",
    "compare",
    "modeling",
    "registry",
    "tiny",
    "verify",
    "widgets",
]
