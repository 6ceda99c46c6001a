"""Colours and sizes shared by every dq_kit figure, defined once.

Example:
    >>> from dq_kit.viz.style import COLORS
    >>> sorted(COLORS)
    ['16bit', 'dynamic', 'nf4']
"""

from __future__ import annotations

# One colour per precision, used wherever 16-bit, NF4 and dynamic 4-bit appear side by side.
COLORS: dict[str, str] = {
    "16bit": "#2f6db5",  # blue
    "nf4": "#d9622b",  # orange
    "dynamic": "#2e9e5b",  # green
}
# Module groups: marker and a muted colour each, so towers and groups read the same in every plot.
GROUP_STYLE: dict[str, tuple[str, str]] = {
    "vision_attention": ("o", "#8c6bb1"),
    "vision_mlp": ("s", "#6a51a3"),
    "projector": ("D", "#e7298a"),
    "language_attention": ("o", "#41ab5d"),
    "cross_attention": ("^", "#e6ab02"),
    "language_mlp": ("s", "#238b45"),
    "lm_head": ("*", "#666666"),
}
TOWER_TITLES: dict[str, str] = {"vision": "Vision tower", "language": "Language model"}
PANEL_WIDTH = 5.2  # inches; two panels fit a Colab cell (~10.5 in) at the default dpi
PANEL_HEIGHT = 3.6
ANNOTATION_FONTSIZE = 7.5


def rc() -> dict[str, object]:
    """Matplotlib rc settings for dq_kit figures (use with ``matplotlib.rc_context``)."""
    return {
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 10.5,
        "axes.labelsize": 9.5,
        "xtick.labelsize": 8.5,
        "ytick.labelsize": 8.5,
        "legend.fontsize": 7.5,
        "figure.dpi": 100,
    }
