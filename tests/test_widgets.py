"""dq_kit.widgets without a browser: set widget values, check the plan, the labels and the figures."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

import dq_kit as dq
from dq_kit.analysis import QuantReport, analyze
from dq_kit.data.calibration import default_calibration
from dq_kit.errors import AnalysisError
from dq_kit.evaluation.compare import ComparisonResult
from dq_kit.viz.selection import KEPT_GID, kept_count, selection_figure
from dq_kit.viz.style import COLORS
from dq_kit.widgets import CompareView, LayerSelector, LiveLossCallback


@pytest.fixture(scope="module")
def report(tiny_path) -> QuantReport:
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="16bit")
    return analyze(model, processor, default_calibration(n=2), progress=False)


def kept_in_figure(selector: LayerSelector) -> int:
    table = selector.report.table
    return int((table["module"].isin(selector.plan.keep) & (table["sensitivity"] > 0)).sum())


def test_budget_slider_replans_and_updates_labels_and_figure(report):
    selector = LayerSelector(report)
    assert selector.plan.keep == dq.plan(report, budget=0.10).keep
    image, footprint = selector.image.value, selector.footprint.value
    assert kept_count(selector.figure) == kept_in_figure(selector) > 0

    selector.budget.value = 0.25
    expected = dq.plan(report, budget=0.25)
    assert selector.plan.keep == expected.keep and len(expected.keep) > 0
    assert selector.image.value != image and selector.footprint.value != footprint
    assert kept_count(selector.figure) == kept_in_figure(selector)
    extra = sum(int(r.bytes_16bit - r.bytes_nf4) for r in report.table.itertuples() if r.module in expected.keep)
    overhead = extra / report.meta["bytes_4bit"]
    assert f"{overhead:+.1%} over NF4" in selector.footprint.value
    assert f"{len(expected.keep)} module(s) in 16-bit" in selector.footprint.value
    predicted = dq.predicted_kl(report, expected)
    assert f"<b>{predicted:.3g}</b>" in selector.prediction.value if predicted > 0 else "<b>≈0</b>" in selector.prediction.value

    selector.budget.value = 0.0
    assert selector.plan.keep == () and kept_count(selector.figure) == 0
    assert "+0.0% over NF4" in selector.footprint.value


def test_threshold_slider_switches_mode(report):
    selector = LayerSelector(report)
    cut = float(report.table["sensitivity"].nlargest(3).iloc[-1])
    selector.threshold.value = cut
    assert selector.mode.value == "threshold"
    assert selector.plan.keep == dq.plan(report, threshold=selector.threshold.value).keep
    assert selector.plan.source == "threshold"
    lines = [line for ax in selector.figure.axes for line in ax.lines if line.get_label() == "threshold"]
    assert lines and lines[0].get_ydata()[0] == pytest.approx(selector.threshold.value)
    selector.budget.value = 0.2
    assert selector.mode.value == "budget" and selector.plan.source == "budget"


def test_manual_picks_survive_slider_moves(report):
    selector = LayerSelector(report)
    by_score = report.table.sort_values("sensitivity")
    forced = by_score[~by_score["module"].isin(selector.plan.keep)]["module"].iloc[0]
    selector.checkbox(forced).value = True
    dropped = next(name for name in selector.plan.keep if name != forced)
    selector.checkbox(dropped).value = False
    for budget in (0.3, 0.15):
        selector.budget.value = budget
        assert forced in selector.plan.keep and dropped not in selector.plan.keep
        assert selector.checkbox(forced).value and not selector.checkbox(dropped).value
    assert selector.overrides == {forced: True, dropped: False}
    selector.filter_text.value = forced
    assert "manual 16-bit" in selector.table_rows.children[1].children[1].value

    selector.reset_button.click()
    assert selector.overrides == {} and selector.plan.keep == dq.plan(report, budget=0.15).keep


def test_manual_picks_over_budget_keep_only_the_picks(report):
    selector = LayerSelector(report)
    biggest = report.table.sort_values("bytes_16bit")["module"].iloc[-1]
    selector.budget.value = 0.0
    selector.checkbox(biggest).value = True
    assert selector.plan.keep == (biggest,)
    assert "Only your manual picks are kept" in selector.prediction.value


def test_initial_plan_is_pinned(report):
    given = dq.Plan(keep=("model.visual.merger.mlp.0", "model.visual.merger.mlp.2"), model_type="qwen2_vl")
    selector = LayerSelector(report, plan=given)
    assert set(given.keep) <= set(selector.plan.keep)
    assert selector.budget.value == pytest.approx(min(dq.memory.report_memory(report, given).plan_overhead, 0.3))


def test_error_figure_tabs_draw_on_first_open(report):
    selector = LayerSelector(report)
    assert selector.tabs.titles == ("Plan", "Weight error", "Activation error", "Sensitivity")
    assert selector.tabs.children[1].value == b""
    selector.tabs.selected_index = 1
    assert selector.tabs.children[1].value[:4] == b"\x89PNG"


def test_table_filters(report):
    selector = LayerSelector(report, max_rows=5)
    assert len(selector.table_rows.children) == 1 + 5 and "showing the top 5" in selector.table_info.value
    selector.filter_text.value = "MERGER"
    assert len(selector.table_rows.children) == 1 + 2
    selector.filter_text.value = ""
    selector.group_filter.value = "language_mlp"
    rows = selector.table_rows.children[1:]
    assert rows and all("language_mlp" in row.children[1].value for row in rows)


def test_save_and_load_buttons(report, tiny_path, tmp_path):
    selector = LayerSelector(report)
    assert selector.load_button.disabled and "model_ref" in selector.load_button.tooltip
    selector.path.value = ""
    selector.save_button.click()
    assert "Could not save the plan" in selector.status.value

    selector = LayerSelector(report, model_ref=tiny_path("qwen2_vl"))
    selector.budget.value = 0.2
    selector.path.value = str(tmp_path / "plans" / "plan.json")
    selector.save_button.click()
    assert dq.Plan.load(tmp_path / "plans" / "plan.json").keep == selector.plan.keep
    assert "Saved the plan" in selector.status.value

    assert not selector.load_button.disabled
    selector.load_button.click()
    assert selector.model is not None, selector.status.value
    assert selector.model.dq_plan.keep == selector.plan.keep
    modules = dict(selector.model.named_modules())
    assert all(type(modules[name]) is torch.nn.Linear for name in selector.plan.keep)
    assert "Loaded" in selector.status.value


def test_clear_errors_for_incomplete_reports(report):
    no_score = QuantReport(report.table.drop(columns=["sensitivity"]), meta=report.meta)
    with pytest.raises(AnalysisError, match="sensitivity"):
        LayerSelector(no_score)
    no_sizes = QuantReport(report.table, meta={k: v for k, v in report.meta.items() if k != "bytes_4bit"})
    with pytest.raises(AnalysisError, match="bytes_4bit"):
        LayerSelector(no_sizes)
    with pytest.raises(AnalysisError, match="QuantReport"):
        LayerSelector(report.table)
    with pytest.raises(dq.PlanError, match="No module"):
        LayerSelector(report).checkbox("model.nope")


def test_selection_figure_colours_and_labels(report):
    plan = dq.plan(report, budget=0.2)
    fig = selection_figure(report, plan, threshold=1e-6)
    highlighted = [c for ax in fig.axes for c in ax.collections if c.get_gid() == KEPT_GID]
    assert highlighted and all(tuple(c.get_facecolor()[0][:3]) == pytest.approx(_rgb(COLORS["dynamic"])) for c in highlighted)
    assert [ax.get_title() for ax in fig.axes] == ["Vision tower", "Language model"]
    assert all(ax.get_ylabel() and ax.get_xlabel() and ax.get_yscale() == "log" for ax in fig.axes)


def _rgb(colour: str) -> tuple[float, ...]:
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))


# ---- CompareView ------------------------------------------------------------------------------


def _comparison() -> ComparisonResult:
    summary = pd.DataFrame({
        "variant": ["16bit", "4bit", "dynamic"], "GiB": [4.11, 1.36, 1.81], "KL mean": [0.0, 0.2, 0.05],
        "KL se": [float("nan"), 0.01, 0.005], "KL p99": [0.0, 1.0, 0.3], "top-1 agreement %": [100.0, 80.0, 95.0],
        "perplexity": [2.0, 2.6, 2.1], "gap closed %": [100.0, 0.0, 75.0],
    })
    answers = pd.DataFrame({
        "question": ["What is in the image?", "Which colour?"], "expected": ["A train.", "Red."],
        "16bit": ["A train.", "Red."], "4bit": ["A coastal scene.", "Red."], "dynamic": ["A train.", "Red."],
    })
    answers.index.name = "sample"
    return ComparisonResult(summary=summary, answers=answers, reference="16bit", descriptions={"4bit": "NF4"})


def test_compare_view_side_by_side():
    samples = [{"images": [dq.tiny.tiny_image(i)]} for i in range(2)]
    view = CompareView(_comparison(), samples)
    assert view.cards.value.count("data:image/png;base64,") == 2
    assert view.cards.value.count("✗ differs") == 1 and view.cards.value.count("✓ same") == 3
    assert "A coastal scene." in view.cards.value
    for name in ("16bit", "4bit", "dynamic"):
        assert COLORS["nf4" if name == "4bit" else name] in view.summary.value
    assert "1.81" in view.summary.value and "75%" in view.summary.value

    view.only_differences.value = True
    assert "Sample 0" in view.cards.value and "Sample 1" not in view.cards.value
    assert "1 sample(s)" in view.cards.value

    assert "<img" not in CompareView(_comparison()).cards.value
    with pytest.raises(dq.DQError, match="same samples"):
        CompareView(_comparison(), samples[:1])


# ---- LiveLossCallback ------------------------------------------------------------------------


def test_live_loss_callback_records_a_real_training_run(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = dq.tiny.build_tiny_model("llama")
    vocab = model.config.vocab_size
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, vocab, (16, 12))]
    callback = LiveLossCallback()
    assert callback.display is False  # no kernel here: it only records
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                             logging_steps=1, eval_strategy="steps", eval_steps=3, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4], callbacks=[callback])
    trainer.train()

    assert [step for step, _ in callback.train_loss] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in callback.eval_metric] == [3, 6]
    assert callback.train_loss[-1][1] < callback.train_loss[0][1]  # it learns the random batches
    train_line, eval_line = callback.figure.axes[0].lines
    assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(eval_line.get_ydata()) == pytest.approx([v for _, v in callback.eval_metric])
    assert any("train_runtime" in log for log in callback.history)
    ax = callback.figure.axes[0]
    assert ax.get_xlabel() == "optimizer step" and re.search("loss", ax.get_ylabel())


def test_live_loss_callback_non_loss_metric_gets_its_own_axis():
    callback = LiveLossCallback("eval_accuracy", display=False)
    state = type("State", (), {"global_step": 2})()
    callback.on_log(None, state, None, logs={"loss": 1.0, "eval_accuracy": 0.5})
    assert len(callback.figure.axes) == 2 and callback.figure.axes[1].get_ylabel() == "eval accuracy"
    assert callback.eval_metric == [(2, 0.5)]


def test_choice_menu_overrides_corrections(tiny_path):
    model, tokenizer = dq.load(tiny_path("llama"), quant="16bit")
    report = dq.analyze(model, tokenizer, ["A red circle.", "Two blue squares on a mat.", "The cat sat."], corrections=True,
                        ranks=(2, 4), progress=False)
    selector = LayerSelector(report, budget=0.2)
    assert selector.plan.corrections or selector.plan.keep
    name = report.table.sort_values("gain_r4")["module"].iloc[-1]  # the correction that helps most
    selector.choice(name).value = "r4"
    assert selector.plan.corrections[name] == 4 and name not in selector.plan.keep
    assert "manual NF4+r4" in selector._rows[name][1].value  # the tiny model's 14 modules are all in the table
    assert "NF4 + low-rank correction" in selector.footprint.value
    predicted_r4 = dq.predicted_kl(report, selector.plan)
    selector.choice(name).value = "16bit"
    assert name in selector.plan.keep and name not in selector.plan.corrections and selector.checkbox(name).value
    selector.choice(name).value = "nf4"
    assert name not in selector.plan.keep and name not in selector.plan.corrections
    assert dq.predicted_kl(report, selector.plan) != predicted_r4
    selector.choice(name).value = "auto"
    assert selector.overrides == {} and selector.rank_overrides == {}
    assert selector.plan == dq.plan(report, budget=0.2)
    with pytest.raises(dq.PlanError, match="no corrections"):
        LayerSelector(dq.analyze(model, tokenizer, ["A red circle."], progress=False)).choice(name)
