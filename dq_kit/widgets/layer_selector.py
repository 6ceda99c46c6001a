"""``LayerSelector``: choose the modules kept in 16-bit live, from a ``QuantReport``, in a notebook.

A budget slider (0-30% over the NF4 footprint) or a sensitivity threshold picks modules through
:func:`dq_kit.plan`; a checkbox per module overrides a pick (overrides survive slider moves). With a
report that has corrections (``dq.analyze(..., corrections=True)``) the planner chooses per module
among NF4, NF4 + a rank-r correction and 16-bit, and a choice menu per module overrides any of them. The
panel shows the footprint of 16-bit, NF4 and the plan, the predicted KL
(:func:`dq_kit.predicted_kl`), the plan figure and the report's error figures, and saves the plan
or loads the dynamic model. All numbers come from the planner and the report; nothing is measured here.

Example:
    >>> import dq_kit as dq
    >>> from dq_kit.analysis import analyze
    >>> from dq_kit.widgets import LayerSelector
    >>> path = dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl")
    >>> model, processor = dq.load(path, quant="16bit")
    >>> report = analyze(model, processor, dq.calibration.default_calibration(n=2), progress=False)
    >>> selector = LayerSelector(report, model_ref=path)
    >>> selector.budget.value = 0.2
    >>> selector.plan.source
    'budget'
"""

from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pandas as pd

from ..errors import AnalysisError, DQError, PlanError
from ..planning.planner import plan as make_plan
from ..planning.report_plan import predicted_kl
from ..quant.loading import load
from ..quant.memory import REPORT_META, loaded_bytes, report_memory
from ..quant.plan import Plan
from ..units import human_bytes
from ..viz import figures
from ..viz.selection import selection_figure
from ..viz.style import COLORS
from .formatting import chip, figure_png

__all__ = ["REQUIRED_COLUMNS", "LayerSelector"]

REQUIRED_COLUMNS = ("module", "tower", "group", "layer", "bytes_16bit", "bytes_nf4")
MAX_BUDGET = 0.30
_ROW_GRID = "display:grid;grid-template-columns:minmax(240px,1fr) 120px 36px 72px 56px 56px 72px 92px;gap:6px;font-size:12px"
_HEADER = (("module", "exact name without the leading 'model.' (hover a name for all of it)"), ("group", "module group"),
           ("layer", "block index"), ("+16-bit", "extra memory if kept in 16-bit"), ("W err", "relative RMS weight error of NF4"),
           ("act err", "relative output error, whole model in NF4"))
_ERROR_TABS = (("weight_error", "Weight error"), ("act_accum_error", "Activation error"), ("sensitivity", "Sensitivity"))


class LayerSelector(widgets.VBox):
    """Interactive choice of the modules kept in 16-bit; ``selector.plan`` is always the current :class:`dq_kit.Plan`.

    Args:
        report: a :class:`dq_kit.QuantReport` with ``module``, ``tower``, ``group``, ``layer``,
            ``bytes_16bit``, ``bytes_nf4`` and ``score`` columns and ``meta["bytes_16bit"]``,
            ``meta["bytes_4bit"]`` and ``meta["kl_uniform"]`` (what :func:`dq_kit.analysis.analyze` records).
        plan: starting selection; its kept modules become manual picks (untick them or press
            "Reset picks" to hand them back to the sliders) and the budget starts at its overhead.
        model_ref: hub id or folder of the model, for the "Load dynamic model" button.
        budget: the budget slider's starting value (ignored when ``plan`` is given).
        score: the report column the planner maximises (``"sensitivity"``: KL removed, nats/token).
        max_rows: the module table shows at most this many rows (highest score first); filter to see others.

    Attributes:
        plan: the current plan. ``model``/``processor``: what "Load dynamic model" loaded (else ``None``).
        budget, threshold, mode, filter_text, group_filter, path: the input widgets (set their ``value``).
        footprint, prediction, status: HTML labels. ``figure``: the current plan figure (matplotlib),
        shown in ``image``, the first of the ``tabs`` (the others: the report's error figures).

    Example:
        >>> selector = LayerSelector(report, model_ref="Qwen/Qwen2-VL-2B-Instruct")     # doctest: +SKIP
        >>> selector.budget.value = 0.2; selector.checkbox("lm_head").value = True     # doctest: +SKIP
        >>> selector.plan.save("plan.json")                                             # doctest: +SKIP
    """

    def __init__(
        self,
        report: Any,
        plan: Plan | None = None,
        model_ref: str | os.PathLike | None = None,
        *,
        budget: float = 0.10,
        score: str = "sensitivity",
        max_rows: int = 40,
    ) -> None:
        _check_report(report, score)
        self.report, self.model_ref, self.score, self.max_rows = report, model_ref, score, max_rows
        self.model: Any = None
        self.processor: Any = None
        self.overrides: dict[str, bool] = {}
        self.rank_overrides: dict[str, int] = {}
        self._ranks: list[int] = report.correction_ranks if getattr(report, "has_corrections", False) else []
        self._rows: dict[str, tuple[widgets.Checkbox, widgets.HTML, widgets.HBox]] = {}
        self._choices: dict[str, widgets.Dropdown] = {}
        self._syncing = False
        self._note = ""
        table = report.table
        self._by_score = table.sort_values(score, ascending=False, na_position="last").reset_index(drop=True)
        self._names = set(table["module"])

        start = budget
        if plan is not None:
            self.overrides = {name: True for name in plan.keep if name in self._names}
            self.rank_overrides = {name: rank for name, rank in plan.corrections.items() if name in self._names}
            start = report_memory(report, plan).plan_overhead
        self.mode = widgets.ToggleButtons(options=[("Budget", "budget"), ("Threshold", "threshold")], value="budget",
                                          style={"button_width": "88px"},
                                          tooltips=["Keep the best modules within a memory budget",
                                                    "Keep every module scoring above a threshold"])
        self.budget = widgets.FloatSlider(value=min(max(start, 0.0), MAX_BUDGET), min=0.0, max=MAX_BUDGET, step=0.005,
                                          description="Budget", readout_format=".1%", continuous_update=False,
                                          style={"description_width": "80px"}, layout=widgets.Layout(width="420px"))
        self.threshold = _threshold_slider(table[score])
        self.footprint = widgets.HTML()
        self.prediction = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="100%", max_width="1040px"))
        self.filter_text = widgets.Text(placeholder="filter modules (text)", layout=widgets.Layout(width="260px"))
        self.group_filter = widgets.Dropdown(options=["all groups", *sorted(table["group"].dropna().unique())],
                                             layout=widgets.Layout(width="200px"))
        self.reset_button = widgets.Button(description="Reset picks", tooltip="Forget every manual tick and untick")
        self.table_info = widgets.HTML()
        self.table_rows = widgets.VBox()
        self.path = widgets.Text(value="dq_plan.json", description="Plan file", layout=widgets.Layout(width="380px"))
        self.save_button = widgets.Button(description="Save plan", icon="save", button_style="primary")
        self.load_button = widgets.Button(description="Load dynamic model", icon="download", disabled=model_ref is None,
                                          layout=widgets.Layout(width="190px"),
                                          tooltip="Pass model_ref= to LayerSelector to load the model from here"
                                          if model_ref is None else f"dq.load({str(model_ref)!r}, quant='dynamic', plan=selector.plan)")
        self.status = widgets.HTML()

        self.budget.observe(lambda _: self._switch("budget"), names="value")
        self.threshold.observe(lambda _: self._switch("threshold"), names="value")
        self.mode.observe(lambda _: self._replan(), names="value")
        self.filter_text.observe(lambda _: self._show_rows(), names="value")
        self.group_filter.observe(lambda _: self._show_rows(), names="value")
        self.reset_button.on_click(lambda _: self._reset())
        self.save_button.on_click(lambda button: self._run(button, self.save, "Could not save the plan"))
        self.load_button.on_click(lambda button: self._run(button, self.load_model, "Loading failed"))

        super().__init__(self._layout(), layout=widgets.Layout(width="100%"))
        self.add_class("dq-layer-selector")
        self._replan()

    # ---- public actions ----------------------------------------------------------------------

    def checkbox(self, module: str) -> widgets.Checkbox:
        """The "16-bit" checkbox of ``module`` (exact name); setting its value is a manual pick.

        Example:
            >>> selector.checkbox("model.language_model.layers.0.mlp.down_proj").value = True   # doctest: +SKIP
        """
        if module not in self._names:
            raise PlanError(f"No module {module!r} in this report (names look like {next(iter(self._names))!r}).")
        return self._row(module)[0]

    def choice(self, module: str) -> widgets.Dropdown:
        """The choice menu of ``module`` (reports with corrections): ``"auto"`` (the planner decides),
        ``"nf4"``, ``"r<rank>"`` (NF4 + that correction) or ``"16bit"``; setting its value is a manual pick.

        Example:
            >>> selector.choice("model.language_model.layers.0.mlp.down_proj").value = "r16"   # doctest: +SKIP
        """
        if not self._ranks:
            raise PlanError("This report has no corrections: re-run dq.analyze(..., corrections=True) to choose them here.")
        self.checkbox(module)
        return self._choices[module]

    def save(self) -> Path:
        """Write ``self.plan`` to the path in the "Plan file" box (atomic JSON) and return where it went.

        Example:
            >>> selector.path.value = "plans/qwen2vl.json"; selector.save()      # doctest: +SKIP
            PosixPath('plans/qwen2vl.json')
        """
        target = self.path.value.strip()
        if not target:
            raise PlanError("Type a file name in the “Plan file” box first.")
        saved = self.plan.save(Path(target).expanduser())
        self._say(f"Saved the plan ({len(self.plan.keep)} module(s) in 16-bit) to <code>{html.escape(str(saved.resolve()))}</code>.")
        return saved

    def load_model(self) -> Any:
        """``dq.load(model_ref, quant="dynamic", plan=self.plan)``; the model lands in ``self.model``.

        Example:
            >>> model = selector.load_model()                                   # doctest: +SKIP
        """
        if self.model_ref is None:
            raise DQError("No model to load: create the selector with model_ref=<hub id or folder>.")
        self._say(f"Loading {html.escape(str(self.model_ref))} in dynamic 4-bit…")
        self.model, self.processor = load(self.model_ref, quant="dynamic", plan=self.plan, report=self.report)
        self._say(f"Loaded: {len(self.plan.keep)} module(s) in 16-bit, {human_bytes(loaded_bytes(self.model))} in memory "
                  "— it is in <code>selector.model</code> (processor: <code>selector.processor</code>).")
        return self.model

    # ---- recomputation -----------------------------------------------------------------------

    def _switch(self, mode: str) -> None:
        """A slider moved: select its mode (which replans) or replan in the current one."""
        if self.mode.value != mode:
            self.mode.value = mode
        else:
            self._replan()

    def _replan(self) -> None:
        keep = [re.escape(n) for n, kept in self.overrides.items() if kept]
        # manual corrections leave the knapsack (as plain NF4) and are put back with their rank below
        quantize = [re.escape(n) for n, kept in self.overrides.items() if not kept] + [re.escape(n) for n in self.rank_overrides]
        selection = {"budget": self.budget.value} if self.mode.value == "budget" else {"threshold": self.threshold.value}
        self._note = ""
        try:
            chosen = make_plan(self.report, keep=keep, quantize=quantize, score=self.score, **selection)
        except PlanError as exc:
            chosen = make_plan(self.report, top_k=0, keep=keep, quantize=quantize, score=self.score)
            self._note = f"Only your manual picks are kept: {exc}"
        self.plan = chosen.with_corrections(self.rank_overrides) if self.rank_overrides else chosen
        self._refresh()

    def _refresh(self) -> None:
        memory = report_memory(self.report, self.plan)
        self.footprint.value = (
            f"{chip(COLORS['16bit'], '16-bit')} {human_bytes(memory.bytes_16bit)} &nbsp;·&nbsp; "
            f"{chip(COLORS['nf4'], 'NF4')} {human_bytes(memory.bytes_4bit)} &nbsp;·&nbsp; "
            f"{chip(COLORS['dynamic'], 'this plan')} <b class='dq-plan-size'>{human_bytes(memory.bytes_plan)}</b> "
            f"(<b>{_signed(memory.bytes_plan - memory.bytes_4bit)}</b>, {memory.plan_overhead:+.1%} over NF4; "
            f"{memory.bytes_plan / memory.bytes_16bit:.0%} of 16-bit) &nbsp;·&nbsp; {len(self.plan.keep)} module(s) in 16-bit"
            + (f", {len(self.plan.corrections)} NF4 + low-rank correction" if self.plan.corrections else "")
        )
        uniform = float(self.report.meta["kl_uniform"])
        predicted = predicted_kl(self.report, self.plan, score=self.score)
        closed = f" — {1 - predicted / uniform:.0%} of the gap closed" if uniform > 0 else ""
        note = f"<br><span style='color:#b35900'>{html.escape(self._note)}</span>" if self._note else ""
        shown = f"{predicted:.3g}" if predicted > 0 else "≈0"  # the estimate is clipped at 0
        self.prediction.value = (f"Predicted KL to 16-bit: <b>{shown}</b> nats/token "
                                 f"(all-NF4 measured: {uniform:.3g}){closed}{note}")
        threshold = self.threshold.value if self.mode.value == "threshold" else None
        size = f"{human_bytes(memory.bytes_plan)}, {memory.plan_overhead:+.1%} over NF4"
        title = f"{self.report.meta.get('model_type', 'model')}: {len(self.plan.keep)} module(s) kept in 16-bit ({size})"
        self.figure = selection_figure(self.report, self.plan, self.score, threshold=threshold, title=title)
        self.image.value = figure_png(self.figure)
        self._show_rows()

    # ---- module table ------------------------------------------------------------------------

    def _row(self, name: str) -> tuple[widgets.Checkbox, widgets.HTML, widgets.HBox]:
        """The (checkbox, text, row) widgets of one module, created on first display."""
        if name not in self._rows:
            box = widgets.Checkbox(value=name in self.plan.keep, indent=False, layout=widgets.Layout(width="28px"),
                                   description_allow_html=False)
            text = widgets.HTML(layout=widgets.Layout(width="100%"))
            box.observe(lambda change, name=name: self._pick(name, change["new"]), names="value")
            controls: list[widgets.Widget] = [box]
            if self._ranks:
                menu = widgets.Dropdown(options=[("auto", "auto"), ("NF4", "nf4"), *[(f"NF4 + r{r}", f"r{r}") for r in self._ranks],
                                                 ("16-bit", "16bit")], value="auto", layout=widgets.Layout(width="110px"))
                menu.observe(lambda change, name=name: self._choose(name, change["new"]), names="value")
                self._choices[name] = menu
                controls.append(menu)
            self._rows[name] = (box, text, widgets.HBox([*controls, text], layout=widgets.Layout(align_items="center")))
        return self._rows[name]

    def _manual_choice(self, name: str) -> str:
        if name in self.rank_overrides:
            return f"r{self.rank_overrides[name]}"
        if name in self.overrides:
            return "16bit" if self.overrides[name] else "nf4"
        return "auto"

    def _pick(self, name: str, kept: bool) -> None:
        if self._syncing:
            return
        self.overrides[name] = kept
        self.rank_overrides.pop(name, None)
        self._replan()

    def _choose(self, name: str, value: str) -> None:
        if self._syncing:
            return
        self.overrides.pop(name, None)
        self.rank_overrides.pop(name, None)
        if value in ("nf4", "16bit"):
            self.overrides[name] = value == "16bit"
        elif value != "auto":
            self.rank_overrides[name] = int(value.removeprefix("r"))
        self._replan()

    def _reset(self) -> None:
        self.overrides.clear()
        self.rank_overrides.clear()
        self._replan()

    def _show_rows(self) -> None:
        frame = self._by_score
        needle = self.filter_text.value.strip().lower()
        if needle:
            frame = frame[frame["module"].str.lower().str.contains(needle, regex=False)]
        if self.group_filter.value != "all groups":
            frame = frame[frame["group"] == self.group_filter.value]
        shown = frame.head(self.max_rows)
        kept = set(self.plan.keep)
        self._syncing = True
        try:
            rows = []
            for record in shown.to_dict("records"):
                box, text, row = self._row(record["module"])
                box.value = record["module"] in kept
                if record["module"] in self._choices:
                    self._choices[record["module"]].value = self._manual_choice(record["module"])
                text.value = self._row_html(record, kept)
                rows.append(row)
        finally:
            self._syncing = False
        indent = 32 + (116 if self._ranks else 0)  # past the checkbox (and the choice menu)
        header = widgets.HTML(f"<div style='{_ROW_GRID};font-weight:600;margin-left:{indent}px'>" + "".join(
            f"<span title='{tip}'>{label}</span>" for label, tip in (*_HEADER, (self.score.replace("_", " "), "the planner's score"),
                                                                      ("pick", "auto: chosen by the slider; manual: your tick"))
        ) + "</div>")
        self.table_rows.children = [header, *rows]
        more = f" — showing the top {len(shown)}; filter to see the others" if len(frame) > len(shown) else ""
        untick = " Untick = plain NF4; the menu picks NF4, a correction rank or 16-bit." if self._ranks else ""
        self.table_info.value = f"{len(frame)} of {len(self._by_score)} module(s) match{more}. Tick = keep in 16-bit.{untick}"

    def _row_html(self, record: dict[str, Any], kept: set[str]) -> str:
        name = record["module"]
        manual = self.overrides.get(name)
        corrected = self.plan.corrections.get(name)
        auto = "auto 16-bit" if name in kept else (f"auto NF4+r{corrected}" if corrected else "")
        pick = ("manual 16-bit" if manual else "manual NF4") if manual is not None else auto
        if name in self.rank_overrides:
            pick = f"manual NF4+r{self.rank_overrides[name]}"
        colour = COLORS["dynamic"] if name in kept else "transparent"
        cells = [
            html.escape(str(record["group"])),
            "" if pd.isna(record["layer"]) else str(record["layer"]),
            "+" + human_bytes(record["bytes_16bit"] - record["bytes_nf4"]),
            _percent(record.get("weight_error")),
            _percent(record.get("act_accum_error")),
            _number(record.get(self.score)),
            f"<b style='color:{COLORS['dynamic'] if name in kept else COLORS['nf4']}'>{pick}</b>",
        ]
        return (
            f"<div style='{_ROW_GRID};border-left:4px solid {colour};padding-left:4px'>"
            f"<span title='{html.escape(name)}' style='overflow:hidden;text-overflow:ellipsis;white-space:nowrap;"
            f"font-family:monospace'>{html.escape(name.removeprefix('model.'))}</span>" + "".join(f"<span>{c}</span>" for c in cells) + "</div>"
        )

    # ---- layout ------------------------------------------------------------------------------

    def _layout(self) -> list[widgets.Widget]:
        meta = self.report.meta
        title = widgets.HTML(f"<h3 style='margin:4px 0'>Choose the modules kept in 16-bit — {html.escape(str(meta.get('model_type', 'model')))}, "
                             f"{len(self.report.table)} quantizable modules</h3>")
        columns = [c for c, _ in _ERROR_TABS if c in self.report.table.columns and (self.report.table[c] > 0).any()]
        self.tabs = widgets.Tab(children=[self.image, *(widgets.Image(format="png", layout=self.image.layout) for _ in columns)],
                                titles=["Plan", *(dict(_ERROR_TABS)[c] for c in columns)])
        # The report's own figures never change: drawn once, when their tab is first opened.
        self.tabs.observe(lambda change: self._draw_tab(columns, change["new"]), names="selected_index")
        return [
            title,
            widgets.HBox([self.mode, self.budget, self.threshold], layout=widgets.Layout(flex_flow="row wrap")),
            self.footprint,
            self.prediction,
            self.tabs,
            widgets.HBox([self.filter_text, self.group_filter, self.reset_button]),
            self.table_info,
            self.table_rows,
            widgets.HBox([self.path, self.save_button, self.load_button], layout=widgets.Layout(flex_flow="row wrap")),
            self.status,
        ]

    def _draw_tab(self, columns: list[str], index: int | None) -> None:
        if index and not self.tabs.children[index].value:
            self.tabs.children[index].value = _error_png(self.report, columns[index - 1])

    def _run(self, button: widgets.Button, action: Any, failure: str) -> None:
        """Run a button's action; a failure goes to the status line (a callback's exception would be lost)."""
        button.disabled = True
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - shown to the user, who has no traceback in a widget callback
            self._say(f"{failure}: {html.escape(str(exc))}", error=True)
        finally:
            button.disabled = False

    def _say(self, message: str, error: bool = False) -> None:
        self.status.value = f"<span style='color:{'#b00020' if error else '#1b5e20'}'>{message}</span>"


def _check_report(report: Any, score: str) -> None:
    table = getattr(report, "table", None)
    if table is None or not hasattr(report, "meta"):
        raise AnalysisError(f"LayerSelector needs a dq_kit QuantReport (from dq.analyze), got {type(report).__name__}.")
    missing = [c for c in (*REQUIRED_COLUMNS, score) if c not in table.columns]
    if missing:
        hint = " Run dq.analyze with metrics including 'sensitivity'." if score in missing else ""
        raise AnalysisError(f"LayerSelector needs the report column(s) {missing}; the report has {sorted(table.columns)}.{hint}")
    missing_meta = [k for k in (*REPORT_META, "kl_uniform") if k not in report.meta]
    if missing_meta:
        raise AnalysisError(f"LayerSelector needs report.meta[{missing_meta}] (whole-model footprints and the measured "
                            "all-NF4 KL); re-run dq.analyze with metrics including 'sensitivity' on this dq_kit version.")
    if table.empty:
        raise AnalysisError("The report lists no module: there is nothing to select.")


def _threshold_slider(scores: Any) -> widgets.FloatLogSlider:
    positive = scores[scores > 0]
    if positive.empty:
        return widgets.FloatLogSlider(value=1.0, min=0, max=1, description="Threshold", disabled=True)
    low, high = math.floor(math.log10(positive.min())), math.ceil(math.log10(positive.max()))
    start = positive.sort_values(ascending=False).iloc[min(4, len(positive) - 1)]
    return widgets.FloatLogSlider(value=float(start), base=10, min=low, max=max(high, low + 1), step=(max(high, low + 1) - low) / 200,
                                  description="Threshold", readout_format=".2e", continuous_update=False,
                                  tooltip="keep every module whose score (nats/token) is at least this",
                                  style={"description_width": "80px"}, layout=widgets.Layout(width="420px"))


def _error_png(report: Any, column: str) -> bytes:
    """One of the report's own figures (dq_kit.viz.figures) as PNG."""
    import matplotlib.pyplot as plt

    draw = {"weight_error": figures.weight_error_figure, "act_accum_error": figures.activation_error_figure,
            "sensitivity": figures.sensitivity_figure}[column]
    fig = draw(report)
    try:
        return figure_png(fig)
    finally:
        plt.close(fig)


def _signed(n_bytes: int) -> str:
    return ("+" if n_bytes >= 0 else "−") + human_bytes(abs(n_bytes))


def _percent(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{100 * value:.1f}%"


def _number(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.2e}"
