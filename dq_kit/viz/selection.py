"""The plan figure: every module's score by layer, the modules a plan keeps in 16-bit highlighted.

Only drawing happens here: scores come from the report, the selection from the plan. The figure
is built without pyplot (no global state, nothing auto-displayed in notebooks).

Example:
    >>> import pandas as pd
    >>> from dq_kit import Plan
    >>> from dq_kit.analysis import QuantReport
    >>> t = pd.DataFrame({"module": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
    ...                   "tower": ["language"] * 2, "group": ["language_mlp"] * 2, "layer": [0, 1],
    ...                   "sensitivity": [1e-3, 4e-3]})
    >>> fig = selection_figure(QuantReport(t), Plan(keep=("model.layers.1.mlp.down_proj",)))
    >>> kept_count(fig)
    1
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from ..quant.plan import Plan
from .figures import layer_axis, short_name, tower_panels
from .style import ANNOTATION_FONTSIZE, COLORS, PANEL_HEIGHT, PANEL_WIDTH, TOWER_TITLES, rc

__all__ = ["KEPT_GID", "kept_count", "selection_figure"]

KEPT_GID = "kept-16bit"  # gid of the highlighted (kept) scatter in each panel
_SPREAD = 0.7  # modules of one layer share this much of the x axis, so they do not overlap


def selection_figure(
    report: Any,
    plan: Plan,
    score: str = "sensitivity",
    *,
    threshold: float | None = None,
    title: str | None = None,
    top: int = 3,
) -> Figure:
    """Score of every module by layer (log scale), vision and language panels; kept modules in the dynamic colour.

    Args:
        report: a :class:`dq_kit.QuantReport` with ``tower``, ``group``, ``layer`` and ``score`` columns.
        plan: the plan whose ``keep`` modules are highlighted.
        score: the report column on the y axis (modules with a non-positive score are not drawn).
        threshold: draw the threshold of a threshold-mode plan as a dashed line.
        title: figure title (default: the model type and the number of kept modules).
        top: annotate this many kept modules per panel, highest score first.

    Example:
        >>> import pandas as pd
        >>> from dq_kit import Plan
        >>> from dq_kit.analysis import QuantReport
        >>> t = pd.DataFrame({"module": ["a.layers.0.q", "a.layers.0.k"], "tower": ["language"] * 2,
        ...                   "group": ["language_attention"] * 2, "layer": [0, 0], "sensitivity": [0.1, 0.2]})
        >>> selection_figure(QuantReport(t), Plan(), threshold=0.15).axes[0].get_yscale()
        'log'
    """
    import matplotlib

    table = report.table.dropna(subset=[score])
    table = table[table[score] > 0]
    kept = set(plan.keep)
    panels = tower_panels(table)
    with matplotlib.rc_context(rc()):
        # Fixed margins instead of constrained layout: this figure is redrawn at every slider move (2x faster).
        fig = Figure(figsize=(PANEL_WIDTH * max(len(panels), 1), PANEL_HEIGHT + 0.4))
        fig.subplots_adjust(left=0.16 / max(len(panels), 1), right=0.98, top=0.86, bottom=0.22, wspace=0.32)
        fig.suptitle(title or f"{report.meta.get('model_type', 'model')}: {len(kept)} module(s) kept in 16-bit", fontsize=11.5)
        axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
        for ax, (tower, rows) in zip(axes, panels, strict=False):
            rows = rows.assign(x=_spread_x(rows["layer"]))
            is_kept = rows["module"].isin(kept)
            quantized, chosen = rows[~is_kept], rows[is_kept]
            ax.scatter(quantized["x"], quantized[score], s=14, color=COLORS["nf4"], alpha=0.55, label="NF4 (4-bit)", zorder=2.5)
            ax.scatter(chosen["x"], chosen[score], s=40, color=COLORS["dynamic"], edgecolor="black", linewidth=0.6,
                       label="kept in 16-bit", gid=KEPT_GID, zorder=3)
            if threshold is not None:
                ax.axhline(threshold, color="0.3", ls="--", lw=1, label="threshold")
            middle = (rows["x"].min() + rows["x"].max()) / 2
            for rank, (_, row) in enumerate(chosen.nlargest(top, score).iterrows()):
                left = row["x"] > middle  # label towards the panel's centre, never past its edge
                ax.annotate(short_name(row["module"]), (row["x"], row[score]), xytext=(-7 if left else 7, 5 - 11 * rank),
                            textcoords="offset points", ha="right" if left else "left", fontsize=ANNOTATION_FONTSIZE,
                            color=COLORS["dynamic"], bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                            zorder=2)  # under the markers: a label never hides a module
            layer_axis(ax, rows, tower)
            ax.set_yscale("log")
            ax.set_ylabel("KL removed if kept (nats/token)" if score.startswith("sensitivity") else score.replace("_", " "))
            ax.set_title(TOWER_TITLES[tower])
        if panels:
            fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, frameon=False, fontsize=9, markerscale=1.3)
        if not panels:
            axes[0].text(0.5, 0.5, f"no module has a positive {score!r}", ha="center", va="center", transform=axes[0].transAxes)
            axes[0].set_axis_off()
    return fig


def kept_count(fig: Figure) -> int:
    """Number of highlighted (kept) module markers drawn in ``fig`` by :func:`selection_figure`.

    Example:
        >>> kept_count(Figure())
        0
    """
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if c.get_gid() == KEPT_GID)


def _spread_x(layer: pd.Series) -> pd.Series:
    """Layer index plus a small offset per module within its layer (model order)."""
    order = layer.groupby(layer).cumcount()
    size = layer.groupby(layer).transform("size")
    return layer + (order - (size - 1) / 2) * _SPREAD / size
