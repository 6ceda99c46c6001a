"""dq_kit — dynamic 4-bit quantization, LoRA fine-tuning and inspection of vision-language models.

``import dq_kit as dq`` is light: each name below is imported on first use (PEP 562), so the CLI and
a notebook's first cell do not pay for transformers, peft and trl until they need them.

The journey, one step per subpackage: ``models`` (which model) → ``quant`` (plans, loading,
memory, checkpoints) → ``analysis`` (where 4-bit hurts) → ``planning`` (what to keep) →
``evaluation`` (compare, generate) → ``training`` (LoRA, SFT, export); ``data``, ``viz``,
``widgets`` and ``synthetic`` serve them.

Example:
    >>> import dq_kit as dq
    >>> print(dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct"))          # doctest: +SKIP
    >>> model, processor = dq.load("Qwen/Qwen2-VL-2B-Instruct", quant="dynamic")   # doctest: +SKIP
    >>> dq.inspect(model)                                                  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .errors import (  # noqa: F401
    AnalysisError,
    CalibrationError,
    DataError,
    DQError,
    ModelNotFoundError,
    PlanError,
    UnsupportedModelError,
    VerificationError,
)
from .version import __version__  # noqa: F401

# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package
# (which would fetch CPU kernels from a hub) is absent; its own fallback kernels work, so drop it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())


# public name -> the module that defines it (imported on first access)
_NAMES: dict[str, str] = {
    # which model
    "estimate_memory": "quant.memory",
    "MemoryEstimate": "quant.memory",
    # quantize
    "Plan": "quant.plan",
    "load": "quant.loading",
    "load_processor": "quant.loading",
    "quantize": "quant.quantization",
    "verify": "quant.verification",
    "inspect": "quant.inspection",
    "save": "quant.checkpoint",
    # analyze
    "analyze": "analysis.run",
    "QuantReport": "analysis.report",
    "default_calibration": "data.calibration",
    # plan
    "plan": "planning.planner",
    "predicted_kl": "planning.report_plan",
    "PlanOptions": "planning.options",
    "Refiner": "planning.refine",
    "refine_plan": "planning.refine",
    # check
    "compare": "evaluation.compare",
    "ComparisonResult": "evaluation.compare",
    "generate": "evaluation.generation",
    "evaluate_answers": "evaluation.scores",
    # fine-tune
    "add_lora": "training.lora",
    "sft_trainer": "training.sft",
    "save_adapter": "training.export",
    "merge_to_16bit": "training.export",
    "requantize": "training.export",
    "device_stats": "training.device_stats",
}

# public submodules: the steps, and short names for the ones notebooks use most
_MODULES: dict[str, str] = {
    "models": "models",
    "quant": "quant",
    "analysis": "analysis",
    "planning": "planning",
    "data": "data",
    "training": "training",
    "evaluation": "evaluation",
    "viz": "viz",
    "widgets": "widgets",
    "synthetic": "synthetic",
    "demo": "demo",
    "tiny": "synthetic.tiny",
    "registry": "models.registry",
    "modeling": "models.resolution",
    "calibration": "data.calibration",
    "memory": "quant.memory",
}

__all__ = sorted(
    [*_NAMES, *_MODULES, "AnalysisError", "CalibrationError", "DataError", "DQError", "ModelNotFoundError", "PlanError",
     "UnsupportedModelError", "VerificationError", "__version__"]
)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
    else:
        raise AttributeError(f"module 'dq_kit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # what static tools and IDEs see
    from . import analysis, data, demo, evaluation, models, planning, quant, synthetic, training, viz, widgets  # noqa: F401
    from .analysis.report import QuantReport  # noqa: F401
    from .analysis.run import analyze  # noqa: F401
    from .data import calibration  # noqa: F401
    from .data.calibration import default_calibration  # noqa: F401
    from .evaluation.compare import ComparisonResult, compare  # noqa: F401
    from .evaluation.generation import generate  # noqa: F401
    from .evaluation.scores import evaluate_answers  # noqa: F401
    from .models import registry  # noqa: F401
    from .models import resolution as modeling  # noqa: F401
    from .planning.options import PlanOptions  # noqa: F401
    from .planning.planner import plan  # noqa: F401
    from .planning.refine import Refiner, refine_plan  # noqa: F401
    from .planning.report_plan import predicted_kl  # noqa: F401
    from .quant import memory  # noqa: F401
    from .training.device_stats import device_stats  # noqa: F401
    from .quant.checkpoint import save  # noqa: F401
    from .quant.inspection import inspect  # noqa: F401
    from .quant.loading import load, load_processor  # noqa: F401
    from .quant.memory import MemoryEstimate, estimate_memory  # noqa: F401
    from .quant.plan import Plan  # noqa: F401
    from .quant.quantization import quantize  # noqa: F401
    from .quant.verification import verify  # noqa: F401
    from .synthetic import tiny  # noqa: F401
    from .training.export import merge_to_16bit, requantize, save_adapter  # noqa: F401
    from .training.lora import add_lora  # noqa: F401
    from .training.sft import sft_trainer  # noqa: F401
