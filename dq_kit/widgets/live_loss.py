"""``LiveLossCallback``: the training loss (and an eval metric) drawn live in the notebook while a
``transformers``/TRL trainer runs, next to the trainer's own progress bar.

Without a notebook display (a script, a test, a CI job) the callback only records.

Example:
    >>> from dq_kit.widgets import LiveLossCallback
    >>> callback = LiveLossCallback(display=False)
    >>> trainer = dq.sft_trainer(peft_model, processor, train_ds, eval_ds, callbacks=[callback])   # doctest: +SKIP
    >>> trainer.train(); callback.train_loss[-1]                                                 # doctest: +SKIP
    (40, 0.52)
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure
from transformers import TrainerCallback

from ..viz.style import COLORS, rc
from .formatting import figure_png

__all__ = ["LiveLossCallback"]


class LiveLossCallback(TrainerCallback):
    """Record every log of a trainer and redraw the loss curve at each logging step.

    Args:
        metric: the eval metric drawn with the training loss (``"eval_loss"``; any key the trainer
            logs, e.g. ``"eval_accuracy"``, which then gets its own y axis on the right).
        display: draw in the notebook; ``None`` (default) draws when an IPython kernel is running.
        color: colour of the curves (default: the dynamic 4-bit colour, the usual fine-tuning target).

    Attributes:
        history: every dict the trainer logged, with its ``step``.
        train_loss, eval_metric: ``(step, value)`` pairs drawn on the figure.
        figure: the matplotlib figure (also kept up to date headless). ``output``: the
            ``ipywidgets.Output`` it is drawn into (``None`` headless).

    Example:
        >>> callback = LiveLossCallback(display=False)
        >>> callback.on_log(None, type("State", (), {"global_step": 5})(), None, logs={"loss": 1.25})
        >>> callback.train_loss, list(callback.figure.axes[0].lines[0].get_ydata())
        ([(5, 1.25)], [1.25])
    """

    def __init__(self, metric: str = "eval_loss", *, display: bool | None = None, color: str = COLORS["dynamic"]) -> None:
        self.metric = metric
        self.display = _in_kernel() if display is None else display
        self.color = color
        self.history: list[dict[str, Any]] = []
        self.train_loss: list[tuple[int, float]] = []
        self.eval_metric: list[tuple[int, float]] = []
        self.output: Any = None
        self.figure, self._train_line, self._eval_line = self._new_figure()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Show the (empty) figure under the cell when a notebook display is available."""
        if self.display and self.output is None:
            import ipywidgets as widgets
            from IPython.display import display

            self.output = widgets.Output()
            display(self.output)
            self._draw()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the logged values and redraw."""
        logs = dict(logs or {})
        step = int(state.global_step)
        self.history.append({"step": step, **logs})
        if "loss" in logs:
            self.train_loss.append((step, float(logs["loss"])))
        if self.metric in logs:
            self.eval_metric.append((step, float(logs[self.metric])))
        self._update()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Final redraw (the last logs may have come after the last logging step)."""
        self._update()

    def _new_figure(self) -> tuple[Figure, Any, Any]:
        import matplotlib

        with matplotlib.rc_context(rc()):
            fig = Figure(figsize=(7.5, 3.4), layout="constrained")
            ax = fig.add_subplot()
            ax.set_title("Training progress")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss (nats / token)")
            train_line, = ax.plot([], [], color=self.color, lw=1.8, label="training loss")
            same_axis = self.metric.endswith("loss")
            eval_ax = ax if same_axis else ax.twinx()
            eval_line, = eval_ax.plot([], [], "o--", color=self.color, mfc="white", ms=5, lw=1.2,
                                      label=self.metric.replace("_", " "))
            if not same_axis:
                eval_ax.set_ylabel(self.metric.replace("_", " "))
            ax.legend(handles=[train_line, eval_line], loc="upper right", frameon=False)
        return fig, train_line, eval_line

    def _update(self) -> None:
        for line, points in ((self._train_line, self.train_loss), (self._eval_line, self.eval_metric)):
            line.set_data([s for s, _ in points], [v for _, v in points])
            line.axes.relim()
            line.axes.autoscale_view()
        self._draw()

    def _draw(self) -> None:
        if self.output is None:
            return
        from IPython.display import Image, display

        with self.output:
            self.output.clear_output(wait=True)
            display(Image(data=figure_png(self.figure)))


def _in_kernel() -> bool:
    """True inside a Jupyter/Colab kernel (where widgets and images can be shown)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
