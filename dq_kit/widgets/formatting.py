"""Small HTML helpers shared by the widgets: sizes, colour chips, image thumbnails."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from ..data.images import load_image
from ..viz.style import COLORS

# Variant names as dq.compare users write them -> the precision colour of dq_kit.viz.style.
_VARIANT_COLORS = {"16bit": COLORS["16bit"], "16-bit": COLORS["16bit"], "bf16": COLORS["16bit"], "fp16": COLORS["16bit"],
                   "4bit": COLORS["nf4"], "nf4": COLORS["nf4"], "dynamic": COLORS["dynamic"]}


def variant_color(name: str) -> str:
    """The precision colour of a variant name (``"16bit"``, ``"4bit"``, ``"dynamic"``...); grey otherwise.

    Example:
        >>> variant_color("dynamic") == COLORS["dynamic"], variant_color("mine")
        (True, '#555555')
    """
    return _VARIANT_COLORS.get(name.lower(), "#555555")


def chip(color: str, text: str) -> str:
    """``text`` in bold after a colour square, HTML-escaped.

    Example:
        >>> chip("#000", "a<b")
        '<span style="color:#000;font-weight:600">&#9632; a&lt;b</span>'
    """
    return f'<span style="color:{color};font-weight:600">&#9632; {html.escape(text)}</span>'


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib figure rendered as PNG bytes (for an ``ipywidgets.Image`` or an ``IPython.display.Image``).

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure_png(Figure(figsize=(1, 1)))[:4]
        b'\\x89PNG'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def image_data_uri(image: Any, size: int = 128) -> str:
    """A PNG ``data:`` URI of a thumbnail of ``image`` (PIL image, path, bytes; see :func:`dq_kit.data.load_image`).

    Example:
        >>> import dq_kit as dq
        >>> image_data_uri(dq.tiny.tiny_image(0))[:22]
        'data:image/png;base64,'
    """
    thumbnail = load_image(image).copy()
    thumbnail.thumbnail((size, size))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
