"""``dq.analyze``: where 4-bit quantization hurts a model — weight error, activation error and output sensitivity.

Modules: ``run`` (whole-model analysis), ``sequential`` (one decoder layer at a time, from the
checkpoint), ``common`` (pieces both share), ``weights`` / ``activations`` / ``sensitivity`` (the three
measurements), ``safetensors_reader`` (16-bit weights read tensor by tensor), ``report`` (``QuantReport``).

Example:
    >>> import dq_kit as dq
    >>> report = dq.analyze(dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama"), ["A red circle."], progress=False)
    >>> len(report.table) > 0
    True
"""

from ..errors import AnalysisError
from .common import measure_weight, model_inputs, quantizable_modules
from .report import QuantReport
from .run import analyze, leave_one_out

__all__ = ["AnalysisError", "QuantReport", "analyze", "leave_one_out", "measure_weight", "model_inputs", "quantizable_modules"]
