"""Footprints: bytes of a model in 16-bit, plain NF4 and under a plan, without loading weights.

Example:
    >>> import dq_kit as dq
    >>> est = dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct")      # shipped config, offline
    >>> round(est.gib("16bit"), 2)
    4.11
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AnalysisError, DQError
from ..models import registry
from ..models.resolution import default_dtype, meta_model, resolve_config
from ..units import GIB, human_bytes, human_count
from .corrections import plain_layers
from .footprint import correction_bytes, footprint_bytes, plan_correction_bytes
from .plan import Plan
from .task_memory import TaskMemory, Workload, task_memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one model in 16-bit, uniform NF4 and under a plan, and what a task adds on the device.

    ``peak_bytes`` is the memory the task (``task_memory.task``) adds beyond the model as it sits
    during the task (``resident_bytes``), on the dtype the model would load with; :meth:`fits` says
    per common GPU whether both fit.
    """

    model: str
    params: int
    bytes_16bit: int
    bytes_4bit: int
    bytes_plan: int
    plan_source: str
    kept_modules: int
    corrected_modules: int = 0
    correction_bytes: int = 0
    task_memory: TaskMemory | None = None

    def gib(self, which: str) -> float:
        """Size in GiB of ``"16bit"``, ``"4bit"`` or ``"plan"``."""
        return {"16bit": self.bytes_16bit, "4bit": self.bytes_4bit, "plan": self.bytes_plan}[which] / GIB

    @property
    def plan_overhead(self) -> float:
        """Extra size of the plan over uniform NF4, as a fraction (0.10 = +10%)."""
        return self.bytes_plan / self.bytes_4bit - 1

    @property
    def peak_bytes(self) -> int:
        """Memory the task adds on the device beyond the loaded model, at its peak (0 without a task)."""
        return self.task_memory.peak_bytes if self.task_memory else 0

    @property
    def resident_bytes(self) -> int:
        """The model on the device during the task (16-bit for a whole-model analysis, 0 for a sequential one)."""
        return self.task_memory.resident_bytes if self.task_memory else self.bytes_plan

    def fits(self) -> dict[str, bool]:
        """Per common GPU (T4 16 GB, L4 24 GB, A100 40/80 GB, H100 80 GB), whether the model and the task fit.

        Example:
            >>> import dq_kit as dq
            >>> dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="train", device="cuda").fits()["T4 16 GB"]
            True
        """
        return self.task_memory.fits() if self.task_memory else {}

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
        lines = [
            f"{self.model}: {human_count(self.params)} parameters",
            f"  16-bit            {human_bytes(self.bytes_16bit):>11}",
            f"  NF4 (all Linear)  {human_bytes(self.bytes_4bit):>11}",
            f"  {'dynamic (' + self.plan_source + ')':<18}{human_bytes(self.bytes_plan):>11}  "
            f"(+{self.plan_overhead:.1%} over NF4, {self.kept_modules} module(s) in 16-bit"
            + (f", {self.corrected_modules} with low-rank corrections of {human_bytes(self.correction_bytes)})" if self.corrected_modules else ")"),
        ]
        if self.task_memory:
            memory = self.task_memory
            lines.append(f"  {memory.task}: model {human_bytes(memory.resident_bytes)} + peak {human_bytes(memory.peak_bytes)} = "
                         f"{human_bytes(memory.total_bytes)}  ("
                         + ", ".join(f"{name} {human_bytes(value)}" for name, value in memory.parts.items() if value) + ")")
            lines.append("  fits: " + ", ".join(f"{gpu} {'yes' if ok else 'no'}" for gpu, ok in memory.fits().items()))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<b>{self.model}</b> — {human_count(self.params)} parameters" + self.to_frame().to_html() + (
            f"<pre>{str(self).split(chr(10), 4)[-1]}</pre>" if self.task_memory else "")


def estimate_memory(
    config_or_name_or_path: Any,
    plan: Plan | None = None,
    *,
    task: str = "inference",
    quant: str = "dynamic",
    sequential: bool = False,
    samples: int = 8,
    tokens: int = 256,
    vision_tokens: int | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    lora_r: int = 16,
    gradient_checkpointing: bool = True,
    corrections: bool = False,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> MemoryEstimate:
    """Sizes of a model in 16-bit, uniform NF4 and under ``plan`` (default: its preset), and the
    peak memory ``task`` adds on the device, computed on the meta device: no weights are downloaded
    or allocated. Configs of popular VLMs ship with dq_kit, so their hub ids work offline.

    Args:
        config_or_name_or_path: a hub id, a local folder, a config, or a model.
        plan: the plan the model is loaded with (inference and training); default the preset.
        task: ``"inference"`` (generation of ``seq_len`` tokens in batches of ``batch_size``),
            ``"analyze"`` (:func:`dq_kit.analyze` of ``samples`` samples of ``tokens`` tokens;
            ``sequential=True`` for the layer-by-layer mode; ``corrections=True`` with corrections)
            or ``"train"`` (LoRA of rank ``lora_r`` on ``batch_size`` × ``seq_len`` tokens, with or
            without ``gradient_checkpointing``).
        quant: the model variant loaded for inference or training: ``"16bit"``, ``"4bit"`` or ``"dynamic"``.
        vision_tokens: patches per image in the vision tower (default from the config).
        device: ``"cuda"`` or ``"cpu"``: where the task runs (default: a GPU when there is one). On the
            CPU attention probabilities are materialised; on a GPU fused kernels avoid them.
        dtype: compute dtype (default: what :func:`dq_kit.load` uses on ``device``: bf16 on a GPU, fp32 on the CPU).

    Returns:
        A :class:`MemoryEstimate`: ``.peak_bytes`` (the task's addition), ``.resident_bytes``,
        ``.fits()`` (T4 / L4 / A100 / H100) and a printable summary.

    Example:
        >>> import dq_kit as dq
        >>> print(dq.estimate_memory("meta-llama/Llama-3.2-11B-Vision-Instruct"))   # doctest: +ELLIPSIS
        meta-llama/Llama-3.2-11B-Vision-Instruct: 10.67 B parameters
        ...
        >>> dq.estimate_memory("Qwen/Qwen2-VL-2B-Instruct", task="analyze", device="cuda").fits()["T4 16 GB"]
        True
    """
    if quant not in ("16bit", "4bit", "dynamic"):
        raise DQError(f"quant must be '16bit', '4bit' or 'dynamic', got {quant!r}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise DQError(f"device must be 'cuda' or 'cpu', got {device!r}.")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16 if not torch.cuda.is_available() else default_dtype())
    workload = Workload(task, sequential, samples, tokens, vision_tokens, batch_size, seq_len, lora_r, gradient_checkpointing,
                        corrections, torch.empty((), dtype=dtype).element_size(), device)
    if isinstance(config_or_name_or_path, nn.Module):
        with plain_layers(config_or_name_or_path) as model:  # a PEFT model's own layers, not its adapters
            return _estimate(model, model.config.model_type, plan, workload, quant)
    config = resolve_config(config_or_name_or_path, trust_remote_code=trust_remote_code, prefer_shipped=True)
    model = meta_model(config, trust_remote_code=trust_remote_code)
    label = os.fspath(config_or_name_or_path) if isinstance(config_or_name_or_path, (str, os.PathLike)) else config.model_type
    return _estimate(model, label, plan, workload, quant)


def _estimate(model: nn.Module, label: str, plan: Plan | None, workload: Workload | None = None, quant: str = "dynamic") -> MemoryEstimate:
    plan = plan or Plan.preset(model)
    plan.check(model)
    linear = {info.name for info in registry.linear_modules(model)}
    uniform = Plan.uniform(model)
    corrections = plan_correction_bytes(model, plan)
    loaded = {"16bit": Plan(keep=tuple(linear)), "4bit": uniform, "dynamic": plan}[quant]
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
        task_memory=task_memory(model, loaded, workload) if workload else None,
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
