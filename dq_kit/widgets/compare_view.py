"""``CompareView``: a :func:`dq_kit.evaluation.compare` result as a notebook panel — sizes and KL per variant,
then each sample's image thumbnail and every variant's answer side by side, answers identical to the
reference variant's marked ✓.

Example:
    >>> import dq_kit as dq
    >>> from dq_kit.widgets import CompareView
    >>> sample = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}
    >>> result = dq.compare({"16bit": dq.tiny.build_tiny_model("llama")}, dq.tiny.tiny_processor("llama"), [sample], 2)
    >>> view = CompareView(result, [sample])
    >>> "Sample 0" in view.cards.value
    True
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets

from ..errors import DQError
from .formatting import chip, image_data_uri, variant_color

__all__ = ["CompareView"]

_CELL = "padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top"


class CompareView(widgets.VBox):
    """The side-by-side view of a :class:`dq_kit.ComparisonResult`.

    Args:
        result: what :func:`dq_kit.evaluation.compare` returned.
        samples: the samples passed to ``compare`` (same order), for image thumbnails; optional.
        thumbnail: thumbnail size in pixels.

    Attributes:
        summary: HTML table, one row per variant (size, KL, top-1 agreement, perplexity, gap closed).
        only_differences: tick to show only the samples where some variant's answer differs.
        cards: HTML of the samples shown.

    Example:
        >>> CompareView(dq.compare({"16bit": m16, "4bit": m4, "dynamic": md}, processor, samples), samples)   # doctest: +SKIP
    """

    def __init__(self, result: Any, samples: Sequence[Mapping[str, Any]] | None = None, *, thumbnail: int = 128) -> None:
        answers = result.answers
        if samples is not None and len(samples) != len(answers):
            raise DQError(f"CompareView got {len(samples)} sample(s) but the result has {len(answers)}: "
                          "pass the same samples, in the same order, as to dq.compare.")
        self.result = result
        self._variants = result.summary["variant"].tolist()
        self._thumbnails = [_thumbnail(sample, thumbnail) for sample in samples] if samples is not None else [None] * len(answers)
        self.summary = widgets.HTML(self._summary_html())
        self.only_differences = widgets.Checkbox(value=False, description="only samples where answers differ", indent=False)
        self.cards = widgets.HTML()
        self.only_differences.observe(lambda _: self._show(), names="value")
        super().__init__([self.summary, self.only_differences, self.cards])
        self.add_class("dq-compare-view")
        self._show()

    def _summary_html(self) -> str:
        rows = []
        for record in self.result.summary.to_dict("records"):
            name = record["variant"]
            rows.append(
                "<tr>" + "".join(f"<td style='{_CELL}'>{cell}</td>" for cell in (
                    chip(variant_color(name), name),
                    html.escape(self.result.descriptions.get(name, "")),
                    f"{_fmt(record['GiB'], '.3f')} GiB",
                    f"{_fmt(record['KL mean'], '.3g')} ± {_fmt(record['KL se'], '.2g')}",
                    f"{_fmt(record['top-1 agreement %'], '.1f')}%",
                    _fmt(record["perplexity"], ".3g"),
                    f"{_fmt(record['gap closed %'], '.0f')}%" if _finite(record["gap closed %"]) else "—",
                )) + "</tr>"
            )
        head = "".join(f"<th style='{_CELL}'>{h}</th>" for h in (
            "variant", "how", "size", f"KL to {html.escape(self.result.reference)} (nats/token)", "same top-1 token",
            "perplexity", "gap closed"))
        return f"<table style='border-collapse:collapse;font-size:13px'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

    def _show(self) -> None:
        reference = self.result.reference
        cards = []
        for (index, row), image in zip(self.result.answers.iterrows(), self._thumbnails, strict=True):
            same = {name: row[name] == row[reference] for name in self._variants}
            if self.only_differences.value and all(same.values()):
                continue
            lines = "".join(
                f"<tr><td style='{_CELL};white-space:nowrap'>{chip(variant_color(name), name)}</td>"
                f"<td style='{_CELL}'>{html.escape(str(row[name]))}</td>"
                f"<td style='{_CELL}'>{_mark(name == reference, same[name])}</td></tr>"
                for name in self._variants
            )
            picture = f"<img src='{image}' alt='sample {index}' style='border-radius:4px;margin-right:12px'>" if image else ""
            cards.append(
                "<div class='dq-sample' style='display:flex;align-items:flex-start;margin:10px 0;padding:8px;border:1px solid #e3e3e3;border-radius:6px'>"
                f"{picture}<div><b>Sample {index}</b>: {html.escape(str(row['question']))}<br>"
                f"<i>expected:</i> {html.escape(str(row['expected']))}"
                f"<table style='border-collapse:collapse;font-size:13px;margin-top:4px'>{lines}</table></div></div>"
            )
        hidden = len(self.result.answers) - len(cards)
        footer = f"<p><i>{hidden} sample(s) where every variant answers like {html.escape(reference)} are hidden.</i></p>" if hidden else ""
        self.cards.value = ("".join(cards) or "<p>No sample to show.</p>") + footer


def _mark(is_reference: bool, same: bool) -> str:
    if is_reference:
        return "reference"
    return "<b style='color:#2e7d32'>✓ same</b>" if same else "<b style='color:#b00020'>✗ differs</b>"


def _thumbnail(sample: Mapping[str, Any], size: int) -> str | None:
    images = sample.get("images") or []
    return image_data_uri(images[0], size) if images else None


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if _finite(value) else "—"
