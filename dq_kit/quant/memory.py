"""Footprints: bytes of a model in 16-bit, plain NF4 and under a plan, without loading weights.

Example:
    >>> import dq_kit as dq
    >>> est = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct")      # shipped config, offline
    >>> round(est.gib("16bit"), 2)
    4.11
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import AnalysisError
from ..models import registry
from ..models.resolution import meta_model, resolve_config
from ..units import GIB, human_bytes, human_count
from .corrections import plain_layers
from .plan import Plan

BLOCKSIZE = 4 * 16  # bitsandbytes' 4-bit blocksize
NESTED_BLOCKSIZE = 256  # double quantization groups 256 absmax values
_NF4_CODE_BYTES = 16 * 4  # the 16-entry float32 code of NF4/FP4
_NESTED_CODE_BYTES = 256 * 4 + 4  # the 8-bit dynamic code and the offset of double quantization


def nf4_weight_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for a 4-bit weight of ``numel`` elements: packed 4-bit values,
    per-block scales (8-bit with double quantization, else fp32) and the quantization codes.

    Example:
        >>> nf4_weight_bytes(4096 * 4096) / (4096 * 4096) * 8     # doctest: +ELLIPSIS
        4.1274...
    """
    blocks = math.ceil(numel / BLOCKSIZE)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + blocks * 4 + _NF4_CODE_BYTES
    return packed + blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + _NESTED_CODE_BYTES + _NF4_CODE_BYTES


def correction_bytes(rank: int, in_features: int, out_features: int) -> int:
    """Bytes of a rank-``rank`` low-rank correction stored as bf16 factors: ``2·r·(in+out)``.

    Example:
        >>> correction_bytes(8, 576, 1536)
        33792
    """
    return 2 * rank * (in_features + out_features)


def plan_correction_bytes(model: nn.Module, plan: Plan) -> int:
    """Bytes of all of ``plan``'s corrections on ``model`` (a skeleton on the meta device will do).

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> plan_correction_bytes(model, dq.Plan(corrections={"model.layers.0.mlp.down_proj": 4}))   # 2·4·(128 + 64)
        1536
    """
    modules = dict(model.named_modules())
    return sum(correction_bytes(rank, modules[name].in_features, modules[name].out_features) for name, rank in plan.corrections.items())


def footprint_bytes(model: nn.Module, quantized: set[str], *, double_quant: bool = True, bytes_16bit: int = 2) -> int:
    """Bytes of ``model`` with the Linear weights named in ``quantized`` stored in 4-bit and every
    other parameter in 16-bit (tied parameters counted once). Works on a meta-device skeleton.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> footprint_bytes(model, set()) == 2 * sum(p.numel() for p in model.parameters())
        True
    """
    quantized_weights = {f"{name}.weight" for name in quantized}
    total = 0
    for name, param in model.named_parameters():
        if name in quantized_weights:
            total += nf4_weight_bytes(param.numel(), double_quant)
        else:
            total += param.numel() * bytes_16bit
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one model in 16-bit, uniform NF4 and under a plan."""

    model: str
    params: int
    bytes_16bit: int
    bytes_4bit: int
    bytes_plan: int
    plan_source: str
    kept_modules: int
    corrected_modules: int = 0
    correction_bytes: int = 0

    def gib(self, which: str) -> float:
        """Size in GiB of ``"16bit"``, ``"4bit"`` or ``"plan"``."""
        return {"16bit": self.bytes_16bit, "4bit": self.bytes_4bit, "plan": self.bytes_plan}[which] / GIB

    @property
    def plan_overhead(self) -> float:
        """Extra size of the plan over uniform NF4, as a fraction (0.10 = +10%)."""
        return self.bytes_plan / self.bytes_4bit - 1

    def to_frame(self):
        """The three sizes as a pandas DataFrame (GiB, bytes, ratio to 16-bit)."""
        import pandas as pd

        rows = [("16-bit", self.bytes_16bit), ("NF4 (all Linear)", self.bytes_4bit), (f"dynamic ({self.plan_source})", self.bytes_plan)]
        return pd.DataFrame(
            {
                "variant": [name for name, _ in rows],
                "GiB": [round(b / GIB, 3) for _, b in rows],
                "bytes": [b for _, b in rows],
                "vs 16-bit": [round(b / self.bytes_16bit, 3) for _, b in rows],
            }
        ).set_index("variant")

    def __str__(self) -> str:
        return (
            f"{self.model}: {human_count(self.params)} parameters\n"
            f"  16-bit            {human_bytes(self.bytes_16bit):>11}\n"
            f"  NF4 (all Linear)  {human_bytes(self.bytes_4bit):>11}\n"
            f"  {'dynamic (' + self.plan_source + ')':<18}{human_bytes(self.bytes_plan):>11}  "
            f"(+{self.plan_overhead:.1%} over NF4, {self.kept_modules} module(s) in 16-bit"
            + (f", {self.corrected_modules} with low-rank corrections of {human_bytes(self.correction_bytes)})" if self.corrected_modules else ")")
        )

    def _repr_html_(self) -> str:
        return f"<b>{self.model}</b> — {human_count(self.params)} parameters" + self.to_frame().to_html()


def estimate_memory(config_or_name_or_path: Any, plan: Plan | None = None, *, trust_remote_code: bool = False) -> MemoryEstimate:
    """Sizes of a model in 16-bit, uniform NF4 and under ``plan`` (default: its preset), computed on
    the meta device: no weights are downloaded or allocated. Configs of popular VLMs ship with
    dq_kit, so their hub ids work offline.

    Example:
        >>> import dq_kit as dq
        >>> print(dq.estimate_memory("meta-llama/Llama-3.2-11B-Vision-Instruct"))   # doctest: +ELLIPSIS
        meta-llama/Llama-3.2-11B-Vision-Instruct: 10.67 B parameters
        ...
    """
    if isinstance(config_or_name_or_path, nn.Module):
        with plain_layers(config_or_name_or_path) as model:  # a PEFT model's own layers, not its adapters
            return _estimate(model, model.config.model_type, plan)
    config = resolve_config(config_or_name_or_path, trust_remote_code=trust_remote_code, prefer_shipped=True)
    model = meta_model(config, trust_remote_code=trust_remote_code)
    label = os.fspath(config_or_name_or_path) if isinstance(config_or_name_or_path, (str, os.PathLike)) else config.model_type
    return _estimate(model, label, plan)


def _estimate(model: nn.Module, label: str, plan: Plan | None) -> MemoryEstimate:
    plan = plan or Plan.preset(model)
    plan.check(model)
    linear = {info.name for info in registry.linear_modules(model)}
    uniform = Plan.uniform(model)
    corrections = plan_correction_bytes(model, plan)
    return MemoryEstimate(
        model=label,
        params=sum(p.numel() for p in model.parameters()),
        bytes_16bit=footprint_bytes(model, set()),
        bytes_4bit=footprint_bytes(model, linear - set(uniform.skip_modules), double_quant=plan.double_quant),
        bytes_plan=footprint_bytes(model, linear - set(plan.skip_modules), double_quant=plan.double_quant) + corrections,
        plan_source=plan.source,
        kept_modules=len(plan.keep),
        corrected_modules=len(plan.corrections),
        correction_bytes=corrections,
    )


def loaded_bytes(module: nn.Module) -> int:
    """Bytes actually held by a loaded module: parameters, buffers and bitsandbytes quantization state.

    Example:
        >>> import torch
        >>> loaded_bytes(torch.nn.Linear(4, 4, dtype=torch.float32))
        80
    """
    total = 0
    seen: set[int] = set()
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
            total += 4 if state.offset is not None else 0
            state = state.state2 if state.nested else None
    return total


REPORT_META = ("bytes_16bit", "bytes_4bit")


def report_memory(report: Any, plan: Plan) -> MemoryEstimate:
    """Sizes of an analysed model in 16-bit, all-NF4 and under ``plan``, from its ``QuantReport``
    alone (no model, no weights): the report's whole-model footprints plus, for every kept module,
    its 16-bit minus its NF4 bytes, and for every corrected module its bf16 factors.

    Example:
        >>> import pandas as pd
        >>> from dq_kit.analysis import QuantReport
        >>> report = QuantReport(pd.DataFrame({"module": ["a"], "bytes_16bit": [2048], "bytes_nf4": [600]}),
        ...                      meta={"bytes_16bit": 4096, "bytes_4bit": 2648})
        >>> round(report_memory(report, Plan(keep=("a",))).plan_overhead, 3)
        0.547
    """
    missing = [key for key in REPORT_META if key not in report.meta]
    if missing:
        raise AnalysisError(f"report.meta lacks {missing} (whole-model footprints): re-run dq.analyze with this dq_kit version.")
    table = report.table
    kept = table[table["module"].isin(plan.keep)]
    extra = int((kept["bytes_16bit"] - kept["bytes_nf4"]).sum())
    corrections = 0
    if plan.corrections:
        rows = table.set_index("module")
        if "in_features" not in rows.columns or any(n not in rows.index for n in plan.corrections):
            raise AnalysisError("The plan has corrections this report does not describe: use the report made with "
                                "dq.analyze(..., corrections=True) for this model.")
        corrections = sum(correction_bytes(r, int(rows.at[n, "in_features"]), int(rows.at[n, "out_features"]))
                          for n, r in plan.corrections.items())
    bytes_16bit = int(report.meta["bytes_16bit"])
    return MemoryEstimate(
        model=str(report.meta.get("name_or_path") or report.meta.get("model_type") or "model"),
        params=bytes_16bit // 2,
        bytes_16bit=bytes_16bit,
        bytes_4bit=int(report.meta["bytes_4bit"]),
        bytes_plan=int(report.meta["bytes_4bit"]) + extra + corrections,
        plan_source=plan.source,
        kept_modules=len(plan.keep),
        corrected_modules=len(plan.corrections),
        correction_bytes=corrections,
    )
