"""Figures of a :class:`dq_kit.QuantReport`: errors by layer, vision and language towers side by side.

Only drawing happens here; every number comes from the report.

Example:
    >>> import pandas as pd
    >>> from dq_kit.analysis import QuantReport
    >>> t = pd.DataFrame({"module": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
    ...                   "tower": ["language"] * 2, "group": ["language_mlp"] * 2, "layer": [0, 1],
    ...                   "weight_error": [0.09, 0.3]})
    >>> fig = weight_error_figure(QuantReport(t))
    >>> fig.axes[0].get_title()
    'Language model'
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from .style import ANNOTATION_FONTSIZE, COLORS, GROUP_STYLE, PANEL_HEIGHT, PANEL_WIDTH, TOWER_TITLES, rc

__all__ = ["activation_error_figure", "report_figures", "sensitivity_figure", "weight_error_figure"]


def short_name(module: str) -> str:
    """A compact label for a module: ``L3 mlp.down_proj`` for ``...layers.3.mlp.down_proj``.

    Example:
        >>> short_name("model.language_model.layers.3.mlp.down_proj")
        'L3 mlp.down_proj'
    """
    match = re.search(r"\.(?:blocks|layers|layer|h)\.(\d+)\.(.+)$", module)
    if match:
        return f"L{match.group(1)} {match.group(2)}"
    return ".".join(module.split(".")[-3:])


def tower_panels(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(tower, rows) per panel: vision (projector appended after its last layer) and language."""
    panels = []
    projector = table[table["tower"] == "projector"]
    for tower in ("vision", "language"):
        rows = table[table["tower"] == tower].copy()
        if tower == "vision" and len(projector):
            projector = projector.copy()
            last = rows["layer"].max() if len(rows) else -1
            projector["layer"] = (0 if pd.isna(last) else int(last)) + 1
            rows = pd.concat([rows, projector])
        if len(rows):
            rows["layer"] = rows["layer"].fillna(-1).astype(int)
            panels.append((tower, rows))
    return panels


def _figure(count: int, title: str):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(PANEL_WIDTH * count, PANEL_HEIGHT), squeeze=False, layout="constrained")
    fig.suptitle(title, fontsize=11.5)
    return fig, list(axes[0])


def _annotate(ax, rows: pd.DataFrame, column: str, top: int, scale: float) -> None:
    worst = rows.dropna(subset=[column]).nlargest(top, column)
    for rank, (_, row) in enumerate(worst.iterrows()):
        ax.annotate(
            short_name(row["module"]),
            (row["layer"], row[column] * scale),
            xytext=(6, 8 - 11 * rank),
            textcoords="offset points",
            fontsize=ANNOTATION_FONTSIZE,
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"},
        )


def _scatter_groups(ax, rows: pd.DataFrame, column: str, scale: float) -> None:
    for group, part in rows.groupby("group"):
        marker, colour = GROUP_STYLE.get(group, ("o", "0.5"))
        ax.scatter(part["layer"], part[column] * scale, s=16, marker=marker, color=colour, alpha=0.75, label=group.replace("_", " "))


def _legend(ax) -> None:
    """Legend under the panel, clear of the data and the annotations."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)


def layer_axis(ax, rows: pd.DataFrame, tower: str) -> None:
    layers = sorted(rows["layer"].unique())
    ax.set_xlabel("block (layer index)" + (", last = projector" if tower == "vision" and (rows["tower"] == "projector").any() else ""))
    if len(layers) <= 40:
        ax.set_xticks(layers)


def weight_error_figure(report: Any, top: int = 3):
    """Relative RMS weight error (%) of every module by layer, mean per layer as a line.

    Example:
        >>> import pandas as pd
        >>> from dq_kit.analysis import QuantReport
        >>> t = pd.DataFrame({"module": ["a.layers.0.q"], "tower": ["language"], "group": ["language_attention"],
        ...                   "layer": [0], "weight_error": [0.1]})
        >>> weight_error_figure(QuantReport(t)).axes[0].get_ylabel()
        'relative RMS weight error (%)'
    """
    import matplotlib

    meta = report.meta
    column = "weight_error"
    panels = tower_panels(report.table.dropna(subset=[column]))
    with matplotlib.rc_context(rc()):
        fig, axes = _figure(
            max(len(panels), 1),
            f"{meta.get('model_type', 'model')}: {meta.get('quant_type', 'nf4').upper()} weight error (blocksize {meta.get('blocksize', 64)})",
        )
        for ax, (tower, rows) in zip(axes, panels, strict=False):
            _scatter_groups(ax, rows, column, 100)
            mean = rows.groupby("layer")[column].mean() * 100
            ax.plot(mean.index, mean.values, color=COLORS["nf4"], lw=1.5, label="mean per layer")
            _annotate(ax, rows, column, top, 100)
            layer_axis(ax, rows, tower)
            ax.set_ylabel("relative RMS weight error (%)")
            ax.set_title(TOWER_TITLES[tower])
            ax.set_ylim(bottom=0)
            _legend(ax)
    return fig


def activation_error_figure(report: Any, top: int = 3):
    """Relative output error (%) of every block by layer: accumulated (whole model 4-bit) and local.

    Example:
        >>> import pandas as pd
        >>> from dq_kit.analysis import QuantReport
        >>> t = pd.DataFrame({"module": ["a.layers.0.q"], "tower": ["language"], "group": ["language_attention"],
        ...                   "layer": [0], "act_accum_error": [0.05], "act_local_error": [0.02]})
        >>> activation_error_figure(QuantReport(t)).axes[0].get_ylabel()
        'relative output error (%)'
    """
    import matplotlib

    meta = report.meta
    table = report.table.dropna(subset=["act_accum_error"])
    panels = tower_panels(table)
    blocks = report.blocks
    with matplotlib.rc_context(rc()):
        fig, axes = _figure(
            max(len(panels), 1),
            f"{meta.get('model_type', 'model')}: activation error, {meta.get('quant_type', 'nf4').upper()} vs 16-bit",
        )
        for ax, (tower, rows) in zip(axes, panels, strict=False):
            ax.scatter(rows["layer"], rows["act_accum_error"] * 100, s=12, color=COLORS["nf4"], alpha=0.35,
                       label="modules, accumulated")
            tower_blocks = blocks[blocks["tower"] == tower].dropna(subset=["act_accum_error"]).sort_values("layer")
            if len(tower_blocks):
                ax.plot(tower_blocks["layer"], tower_blocks["act_accum_error"] * 100, "-o", ms=3.5, color=COLORS["nf4"],
                        lw=1.8, label="block output, accumulated (all 4-bit)")
                ax.plot(tower_blocks["layer"], tower_blocks["act_local_error"] * 100, "--", color=COLORS["nf4"], alpha=0.6,
                        lw=1.2, label="block output, local (this block 4-bit)")
            ax.axhline(0, color=COLORS["16bit"], lw=1.2, label="16-bit reference")
            _annotate(ax, rows, "act_accum_error", top, 100)
            layer_axis(ax, rows, tower)
            ax.set_ylabel("relative output error (%)")
            ax.set_title(TOWER_TITLES[tower])
            _legend(ax)
    return fig


def sensitivity_figure(report: Any, top: int = 3):
    """Output sensitivity (KL to 16-bit, nats per token, log scale) of every module by layer.

    Example:
        >>> import pandas as pd
        >>> from dq_kit.analysis import QuantReport
        >>> t = pd.DataFrame({"module": ["a.layers.0.q"], "tower": ["language"], "group": ["language_attention"],
        ...                   "layer": [0], "sensitivity": [1e-3]})
        >>> sensitivity_figure(QuantReport(t)).axes[0].get_yscale()
        'log'
    """
    import matplotlib

    meta = report.meta
    table = report.table.dropna(subset=["sensitivity"])
    table = table[table["sensitivity"] > 0]
    panels = tower_panels(table)
    estimator = {"fisher": "Fisher estimate", "loo": "leave-one-out", "both": "Fisher estimate"}.get(meta.get("estimator"), "")
    with matplotlib.rc_context(rc()):
        fig, axes = _figure(
            max(len(panels), 1),
            f"{meta.get('model_type', 'model')}: sensitivity ({estimator})",
        )
        for ax, (tower, rows) in zip(axes, panels, strict=False):
            _scatter_groups(ax, rows, "sensitivity", 1)
            _annotate(ax, rows, "sensitivity", top, 1)
            _log_panel(ax, rows, tower, "KL to 16-bit (nats / token)")
    return fig


def _log_panel(ax: Any, rows: Any, tower: str, ylabel: str) -> None:
    """Layer axis, log scale, label, tower title and legend of one panel."""
    layer_axis(ax, rows, tower)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(TOWER_TITLES[tower])
    _legend(ax)


def correction_gain_figure(report: Any):
    """What each option buys per byte, by layer: the estimated KL removed per MiB by keeping a module
    in 16-bit and by NF4 + a rank-r correction (each rank of the report's menu), averaged over the
    modules of each layer (log scale). Where a correction line sits above the 16-bit line, the
    correction is the better use of memory for that layer.

    Example:
        >>> import pandas as pd
        >>> from dq_kit.analysis import QuantReport
        >>> t = pd.DataFrame({"module": ["l.0.q", "l.1.q"], "tower": ["language"] * 2, "group": ["language_attention"] * 2,
        ...                   "layer": [0, 1], "sensitivity": [1e-3, 2e-3], "bytes_16bit": [8192, 8192], "bytes_nf4": [2300, 2300],
        ...                   "in_features": [64, 64], "out_features": [64, 64], "gain_r4": [5e-4, 1e-3]})
        >>> [line.get_label() for line in correction_gain_figure(QuantReport(t)).axes[0].get_lines()]
        ['16-bit', 'NF4 + r4']
    """
    import matplotlib

    meta = report.meta
    panels = tower_panels(report.table.dropna(subset=["sensitivity"]))
    with matplotlib.rc_context(rc()):
        fig, axes = _figure(max(len(panels), 1), f"{meta.get('model_type', 'model')}: KL removed per MiB, by option")
        for ax, (tower, rows) in zip(axes, panels, strict=False):
            per_layer = _gain_per_mib(rows, report.correction_ranks)
            for index, (label, values) in enumerate(per_layer.items()):
                if index == 0:
                    ax.plot(per_layer.index, values, "-o", ms=3.5, color=COLORS["16bit"], lw=1.8, label=label)
                else:
                    ax.plot(per_layer.index, values, "-", lw=1.2, color=COLORS["dynamic"],
                            alpha=0.35 + 0.65 * index / (len(per_layer.columns) - 1), label=label)
            _log_panel(ax, rows, tower, "KL removed per MiB (nats / token)")
    return fig


def _gain_per_mib(rows: Any, ranks: list[int]) -> Any:
    """Per layer, the mean estimated KL removed per MiB by 16-bit and by each correction rank, in the
    full-Fisher form the planner weighs them in (gains clipped to [0, that sensitivity])."""
    import pandas as pd

    from ..quant.footprint import correction_bytes

    mib = 2**20
    sensitivity = rows["sensitivity_full" if "sensitivity_full" in rows.columns else "sensitivity"].clip(lower=0)
    options = {"16-bit": sensitivity / ((rows["bytes_16bit"] - rows["bytes_nf4"]) / mib)}
    for rank in ranks:
        cost = pd.Series([correction_bytes(rank, int(i), int(o)) for i, o in zip(rows["in_features"], rows["out_features"], strict=True)],
                         index=rows.index, dtype=float) / mib
        options[f"NF4 + r{rank}"] = rows[f"gain_r{rank}"].clip(lower=0).clip(upper=sensitivity) / cost
    return pd.DataFrame(options).assign(layer=rows["layer"]).groupby("layer").mean()


def report_figures(report: Any, top: int = 3) -> list[Any]:
    """Every figure the report's metrics allow: weight error, activation error, sensitivity and,
    with corrections, the gain per byte of each option.

    Example:
        >>> import pandas as pd
        >>> from dq_kit.analysis import QuantReport
        >>> report_figures(QuantReport(pd.DataFrame({"module": ["a"], "tower": ["language"], "group": ["g"], "layer": [0]})))
        []
    """
    figures = []
    columns = report.table.columns
    if "weight_error" in columns and report.table["weight_error"].notna().any():
        figures.append(weight_error_figure(report, top))
    if "act_accum_error" in columns and report.table["act_accum_error"].notna().any():
        figures.append(activation_error_figure(report, top))
    if "sensitivity" in columns and (report.table["sensitivity"] > 0).any():
        figures.append(sensitivity_figure(report, top))
        if getattr(report, "correction_ranks", None):
            figures.append(correction_gain_figure(report))
    return figures
