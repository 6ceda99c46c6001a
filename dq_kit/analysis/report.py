"""``QuantReport``: per-module quantization metrics of one model, with metadata, JSON I/O and plots.

Example:
    >>> import dq_kit as dq
    >>> model = dq.tiny.build_tiny_model("llama")
    >>> report = dq.analyze(model, dq.tiny.tiny_processor("llama"), ["A red circle on a blue background."],
    ...                     metrics=("weight",), progress=False)
    >>> report.worst(1, by="weight_error").columns[:3].tolist()
    ['module', 'tower', 'group']
"""

from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..errors import AnalysisError, DQError
from ..files import Output, check_target, read_json, remove_stale_staging, write_json
from ..quant.corrections import is_factors_file, read_factors, write_factors
from ..quant.footprint import nf4_weight_bytes

REPORT_FORMAT = "dq_kit.quant_report"
REPORT_VERSION = 1
REPORT_OUTPUT = Output("dq_kit report", file_format=REPORT_FORMAT)
ID_COLUMNS = ("module", "tower", "group", "layer", "numel", "bytes_16bit", "bytes_nf4", "in_features", "out_features")
GAIN_PREFIX = "gain_r"  # column gain_r<rank>: full-Fisher KL removed by a rank-<rank> correction (nats/token)
FULL_SENSITIVITY = "sensitivity_full"  # full-Fisher KL of quantizing the module: what the corrections menus weigh against
BLOCK_COLUMNS = ("block", "tower", "layer", "act_local_error", "act_accum_error", "nonfinite_samples")
# Which metric ranks modules by default, best first.
_RANKING = ("sensitivity", "sensitivity_loo", "act_accum_error", "act_local_error", "weight_error")


class QuantReport:
    """Per-module metrics of one model (a pandas DataFrame), per-block activation errors and metadata.

    Attributes:
        table: one row per quantizable Linear, keyed by its exact full name in ``module``:
            ``tower``, ``group``, ``layer``, ``numel``, ``bytes_16bit``, ``bytes_nf4`` and every metric
            measured (``weight_*``, ``act_local_error``, ``act_accum_error``, ``sensitivity``,
            ``sensitivity_loo``), plus ``issues`` (non-finite weights or activations, as text).
        blocks: one row per transformer block: ``block``, ``tower``, ``layer``, ``act_local_error``,
            ``act_accum_error``.
        meta: model_type, family, quant settings, calibration size and tokens, measured KL of
            uniform 4-bit (``kl_uniform``), timings, dq_kit version.
        corrections: with ``analyze(..., corrections=True)``, ``{module: (A, B)}``: bf16 factors of
            the activation-weighted low-rank correction at the largest fitted rank (``deq + B @ A``);
            the table then has ``in_features``, ``out_features``, ``sensitivity_full`` (the KL of
            quantizing the module under the full Fisher quadratic form) and a ``gain_r<rank>`` column
            per menu rank (the part of ``sensitivity_full`` that correction removes), all in nats/token.

    ``sensitivity`` is in nats per scored token; ``meta["kl_uniform"]`` is the measured KL of the
    all-4-bit model on the same calibration set, which the sum of ``sensitivity`` approximates.

    Example:
        >>> import pandas as pd
        >>> report = QuantReport(pd.DataFrame({"module": ["a", "b"], "weight_error": [0.1, 0.3]}))
        >>> report.worst(1)["module"].tolist()
        ['b']
    """

    def __init__(
        self,
        table: pd.DataFrame,
        blocks: pd.DataFrame | None = None,
        meta: dict[str, Any] | None = None,
        corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if not isinstance(table, pd.DataFrame):
            raise AnalysisError(f"A QuantReport table is a pandas DataFrame with a 'module' column, got {type(table).__name__}.")
        if "module" not in table.columns:
            raise AnalysisError("A QuantReport table needs a 'module' column of exact module names.")
        if blocks is not None and not isinstance(blocks, pd.DataFrame):
            raise AnalysisError(f"A QuantReport's blocks are a pandas DataFrame, got {type(blocks).__name__}.")
        if meta is not None and not isinstance(meta, dict):
            raise AnalysisError(f"A QuantReport's meta is a dict (model_type, kl_uniform, bytes_4bit, ...), got {type(meta).__name__}.")
        if corrections is not None and not isinstance(corrections, dict):
            raise AnalysisError(f"A QuantReport's corrections map module names to (A, B) factors, got {type(corrections).__name__}.")
        self.table = table.reset_index(drop=True)
        self.blocks = blocks if blocks is not None else pd.DataFrame(columns=list(BLOCK_COLUMNS))
        self.meta = dict(meta or {})
        self.corrections = dict(corrections or {})

    # ---- access ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: Any) -> Any:
        return self.table[key]

    def meta_number(self, key: str) -> float:
        """``meta[key]`` as a number, or :class:`AnalysisError` saying the report lacks it.

        Example:
            >>> QuantReport(pd.DataFrame({"module": ["a"]}), meta={"kl_uniform": 0.2}).meta_number("kl_uniform")
            0.2
        """
        value = self.meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            found = "lacks it" if value is None else f"has {value!r}"
            raise AnalysisError(f"The report's meta needs a number {key!r} and {found}: it was not made by dq.analyze with "
                                "calibration data, or its file was edited. Re-run dq.analyze.")
        return float(value)

    @property
    def metrics(self) -> list[str]:
        """Metric columns present in the table."""
        return [c for c in self.table.columns if c not in ID_COLUMNS and c != "issues"]

    @property
    def correction_ranks(self) -> list[int]:
        """Ranks of the correction menu (``gain_r<rank>`` columns); empty without corrections.

        Example:
            >>> QuantReport(pd.DataFrame({"module": ["a"], "gain_r8": [0.1], "gain_r4": [0.05]})).correction_ranks
            [4, 8]
        """
        return gain_ranks(self.table.columns)

    @property
    def has_corrections(self) -> bool:
        """Whether the report carries fitted corrections (gains and factors).

        Example:
            >>> QuantReport(pd.DataFrame({"module": ["a"], "gain_r4": [0.1]})).has_corrections   # gains without factors
            False
        """
        return bool(self.correction_ranks) and bool(self.corrections)

    def default_metric(self) -> str:
        """The column :meth:`worst` ranks by when none is given: sensitivity if measured, else activation, else weight error."""
        for column in _RANKING:
            if column in self.table.columns and self.table[column].notna().any():
                return column
        raise AnalysisError("This report has no metric column to rank by.")

    def worst(self, n: int = 10, by: str | None = None) -> pd.DataFrame:
        """The ``n`` modules with the largest ``by`` (default: :meth:`default_metric`), worst first.

        Example:
            >>> report = QuantReport(pd.DataFrame({"module": ["a", "b", "c"], "sensitivity": [0.2, 0.1, 0.3]}))
            >>> report.worst(2)["module"].tolist()
            ['c', 'a']
        """
        by = by or self.default_metric()
        if by not in self.table.columns:
            raise AnalysisError(f"No column {by!r} in this report; available metrics: {', '.join(self.metrics)}.")
        return self.table.sort_values(by, ascending=False, na_position="last").head(n).reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """A copy of the per-module table."""
        return self.table.copy()

    def plot(self, top: int = 3) -> list[Any]:
        """Figures in the style of the published analyses: weight error by layer, activation error by
        layer (vision and language towers separately) and, when measured, sensitivity by layer; the
        ``top`` worst modules of each panel are annotated.

        Example:
            >>> import pandas as pd
            >>> t = pd.DataFrame({"module": ["model.layers.0.mlp.down_proj"], "tower": ["language"],
            ...                   "group": ["language_mlp"], "layer": [0], "weight_error": [0.1]})
            >>> [f.axes[0].get_ylabel() for f in QuantReport(t).plot()]
            ['relative RMS weight error (%)']
        """
        from ..viz.figures import report_figures

        return report_figures(self, top=top)

    # ---- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the on-disk format); NaN becomes ``null``."""
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "meta": _clean(self.meta),
            "modules": _records(self.table),
            "blocks": _records(self.blocks),
        }

    @classmethod
    def from_dict(cls, data: Any) -> QuantReport:
        """Inverse of :meth:`to_dict`, with a clear error for anything that is not a dq_kit report."""
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise AnalysisError(f'Not a dq_kit report: expected a JSON object with "format": "{REPORT_FORMAT}".')
        if data.get("version", 0) > REPORT_VERSION:
            raise AnalysisError(f"Report format version {data['version']} is newer than this dq_kit understands; upgrade dq_kit.")
        modules = data.get("modules")
        if not isinstance(modules, list) or not all(isinstance(row, dict) and "module" in row for row in modules):
            raise AnalysisError("Malformed report: 'modules' must be a list of rows that each name a 'module'.")
        table = pd.DataFrame(modules)
        if "layer" in table.columns:
            table["layer"] = table["layer"].astype("Int64")
        blocks = pd.DataFrame(data.get("blocks") or [], columns=None if data.get("blocks") else list(BLOCK_COLUMNS))
        if "layer" in blocks.columns:
            blocks["layer"] = blocks["layer"].astype("Int64")
        return cls(table, blocks, data.get("meta") or {})

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the report as JSON (atomically: a reader never sees half a file); correction factors,
        if any, go beside it in ``<name>.corrections.<id>.safetensors`` (``r.json`` ->
        ``r.corrections.1f2e3d4c.safetensors``, named in the report's meta). The new factors are
        written before the JSON that names them and the old ones removed after it, so a save
        killed at any moment leaves the old report with its factors or the new one with its own.
        An existing file is replaced only when it is a dq_kit report, or with ``overwrite=True``.

        Example:
            >>> import tempfile, os, pandas as pd
            >>> path = QuantReport(pd.DataFrame({"module": ["a"], "weight_error": [0.1]})).save(
            ...     os.path.join(tempfile.mkdtemp(), "report.json"))
            >>> QuantReport.load(path).table["module"].tolist()
            ['a']
        """
        path = check_target(path, REPORT_OUTPUT, overwrite)
        data = self.to_dict()
        if self.corrections:
            factors = corrections_path(path, secrets.token_hex(4))
            data["meta"]["corrections_file"] = factors.name
            write_factors(factors, self.corrections)
        write_json(path, data)  # the target was checked above, before the factors were written
        _remove_unused_factors(path, data["meta"].get("corrections_file"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantReport:
        """Read a report saved by :meth:`save` (and its correction factors); a missing or corrupt
        file, or factors that do not match the report, raise :class:`AnalysisError`."""
        report = cls.from_dict(read_json(path, "Report", AnalysisError))
        if report.meta.get("corrections_file"):
            factors = Path(path).parent / report.meta["corrections_file"]
            shapes = {}
            if {"in_features", "out_features"} <= set(report.table.columns):
                rows = report.table.dropna(subset=["in_features", "out_features"])
                shapes = {r.module: (int(r.out_features), int(r.in_features)) for r in rows.itertuples()}
            try:
                report.corrections = read_factors(factors, shapes)
            except DQError as exc:
                raise AnalysisError(str(exc)) from None
        return report

    # ---- display -----------------------------------------------------------------------------

    def summary(self) -> str:
        """A few lines: model, calibration, measured KL of uniform 4-bit and the worst modules."""
        meta = self.meta
        lines = [
            f"QuantReport: {meta.get('model_type', '?')} ({meta.get('family', '?')}), {len(self.table)} quantizable modules, "
            f"{meta.get('quant_type', 'nf4')} blocksize {meta.get('blocksize', '?')}",
        ]
        if "calibration_samples" in meta:
            lines.append(f"  calibration: {meta['calibration_samples']} samples, {meta.get('scored_tokens', '?')} scored tokens")
        if meta.get("kl_uniform") is not None:
            lines.append(
                f"  uniform 4-bit vs 16-bit: KL {meta['kl_uniform']:.4g} nats/token, top-1 agreement {meta.get('top1_agreement', float('nan')):.1%}"
            )
        if "sensitivity" in self.table.columns:
            lines.append(f"  sum of module sensitivities: {self.table['sensitivity'].sum():.4g} nats/token")
        issues = self.table.get("issues")
        if issues is not None and issues.fillna("").astype(bool).any():
            lines.append(f"  {int(issues.fillna('').astype(bool).sum())} module(s) with issues (see the 'issues' column)")
        try:
            metric = self.default_metric()
        except AnalysisError:
            return "\n".join(lines)
        lines.append(f"  worst by {metric}:")
        for _, row in self.worst(5).iterrows():
            lines.append(f"    {row['module']:<60} {row[metric]:.4g}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        return "<pre>" + self.summary() + "</pre>" + self.table.to_html(max_rows=40)


def gain_ranks(columns: Any) -> list[int]:
    """The ranks of the ``gain_r<rank>`` columns among ``columns``, ascending.

    Example:
        >>> gain_ranks(["module", "gain_r16", "gain_r4", "gain_rx"])
        [4, 16]
    """
    return sorted(int(c[len(GAIN_PREFIX):]) for c in columns if c.startswith(GAIN_PREFIX) and c[len(GAIN_PREFIX):].isdigit())


def corrections_path(report_path: str | os.PathLike, tag: str) -> Path:
    """A file for the correction factors of the report at ``report_path``; each save uses a new ``tag``.

    Example:
        >>> corrections_path("/tmp/r.json", "1f2e3d4c").name
        'r.corrections.1f2e3d4c.safetensors'
    """
    path = Path(report_path)
    return path.with_name(f"{_report_stem(path)}.corrections.{tag}.safetensors")


def _report_stem(path: Path) -> str:
    return path.stem if path.suffix == ".json" else path.name


def _remove_unused_factors(report_path: Path, in_use: str | None) -> None:
    """Remove factor files of earlier saves of this report (dq_kit's own, by their metadata), all but ``in_use``."""
    names = rf"{re.escape(_report_stem(report_path))}\.corrections(?:\.[0-9a-f]{{8}})?\.safetensors"
    for entry in report_path.parent.iterdir():
        if entry.name != in_use and re.fullmatch(names, entry.name) and is_factors_file(entry):
            entry.unlink(missing_ok=True)
    remove_stale_staging(report_path.parent, names)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _clean(value.item())
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    return [_clean(row) for row in rows]


def build_report(
    infos: list[Any],
    weights: dict[str, dict[str, float]],
    activations: dict[str, dict[str, dict[str, float]]] | None,
    sensitivities: dict[str, dict[str, float]],
    issues: dict[str, list[str]],
    block_layers: dict[str, tuple[str, int | None]],
    meta: dict[str, Any],
    double_quant: bool = True,
    corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    gains: dict[str, dict[int, float]] | None = None,
    ranks: tuple[int, ...] = (),
) -> QuantReport:
    """Assemble a :class:`QuantReport` from per-module measurements (used by both analysis modes).

    Args:
        infos: :class:`dq_kit.models.registry.ModuleInfo` of every quantizable Linear, in model order.
        weights: ``{module: weight metrics}``.
        activations: ``{"modules": {module: metrics}, "blocks": {block: metrics}}`` or ``None``.
        sensitivities: ``{column name: {module: nats}}`` (``sensitivity``, ``sensitivity_loo``).
        issues: ``{module: [problem, ...]}``.
        block_layers: ``{block: (tower, layer)}``.
        meta: report metadata.
        double_quant: whether ``bytes_nf4`` counts double-quantized scales.
        corrections, gains, ranks: fitted factors ``{module: (A, B)}``, their Fisher gains
            ``{module: {rank: nats}}`` and the rank menu (``analyze(..., corrections=True)``).
    """
    rows = []
    for info in infos:
        row: dict[str, Any] = {
            "module": info.name,
            "tower": info.tower,
            "group": info.group,
            "layer": info.layer,
            "numel": info.numel,
            "bytes_16bit": 2 * info.numel,
            "bytes_nf4": nf4_weight_bytes(info.numel, double_quant),
        }
        row.update(weights.get(info.name, {}))
        if activations is not None:
            values = dict(activations["modules"].get(info.name, {}))
            nonfinite = values.pop("nonfinite_samples", 0)
            if nonfinite:
                issues.setdefault(info.name, []).append(f"non-finite activations in {nonfinite} sample(s)")
            row.update(values)
        for column, values in sensitivities.items():
            row[column] = values.get(info.name, float("nan"))
        if ranks:
            row["in_features"], row["out_features"] = info.in_features, info.out_features
            for rank in ranks:
                row[f"{GAIN_PREFIX}{rank}"] = (gains or {}).get(info.name, {}).get(rank, float("nan"))
        row["issues"] = "; ".join(issues.get(info.name, []))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    block_rows = []
    if activations is not None:
        for block, values in activations["blocks"].items():
            tower, layer = block_layers.get(block, ("language", None))
            block_rows.append({"block": block, "tower": tower, "layer": layer, **values})
    blocks = pd.DataFrame(block_rows, columns=list(BLOCK_COLUMNS))
    blocks["layer"] = blocks["layer"].astype("Int64")
    if ranks:
        too_big = {str(rank): sum(rank > min(i.in_features, i.out_features) for i in infos) for rank in ranks}
        meta = {**meta, "correction_ranks": list(ranks),
                # why a gain is NaN: the rank exceeds the module's min(in, out), so it is not offered for that module
                "correction_ranks_skipped": {rank: n for rank, n in too_big.items() if n}}
    return QuantReport(table, blocks, meta, corrections)
