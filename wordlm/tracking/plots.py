"""Learning curves as PNG pictures, drawn from a run's metrics with matplotlib.

Main names: ``plot_learning_curves`` (one run: train and validation perplexity against epoch and against
tokens seen, the learning rate on a second axis, the best epoch marked), ``plot_validation_curves``
(several recorded runs on one figure) and ``has_display``. Must not import Sacred. Figures are drawn on matplotlib's
Agg canvas, so no display is needed; pyplot is touched only to show a figure on a screen. matplotlib itself
is imported when a picture is drawn, so importing this module costs the commands that draw nothing nothing.

Metrics are ``Series`` keyed by the names ``train`` logs: ``train.ppl`` (step = tokens seen), ``valid.ppl``,
``lr`` and ``tokens_seen`` (step = epoch), ``test.ppl``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path

from wordlm.files import atomic_path
from wordlm.tracking.runs import RunRecord, Series, run_labels

__all__ = [
    "LEARNING_CURVES_PNG", "has_display", "epochs_at_tokens", "tokens_at_epochs", "plot_learning_curves",
    "plot_validation_curves"
]  # fmt: skip

LEARNING_CURVES_PNG = "learning_curves.png"
_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def has_display() -> bool:
    """Whether a figure can be shown on a screen: a display is there, and matplotlib has a GUI backend for it."""
    if sys.platform.startswith(("linux", "freebsd", "openbsd")) and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return False
    import matplotlib.pyplot as plt  # picks the backend

    return plt.get_backend().lower() not in _NON_INTERACTIVE


def epochs_at_tokens(tokens: Sequence[float], tokens_seen: Series) -> list[float] | None:
    """Turn counts of tokens seen into fractional epochs, from the tokens seen at the end of each epoch.

    Epoch ``e`` covers the tokens between the ends of epochs ``e - 1`` and ``e`` (training starts at 0);
    tokens past the last finished epoch are placed at the pace of that epoch.

    Args:
        tokens: counts of tokens seen, e.g. the steps of ``train.ppl``.
        tokens_seen: ``tokens_seen`` by epoch (steps = epochs, values = tokens seen at each epoch's end).

    Returns:
        One epoch coordinate per count, or ``None`` when no epoch finished (nothing to measure one by).
    """
    import numpy as np

    if not tokens_seen.values:
        return None
    ends = np.array([0.0, *tokens_seen.values])
    epochs = np.array([tokens_seen.steps[0] - 1.0, *tokens_seen.steps])
    last_epoch_tokens = ends[-1] - ends[-2]
    places = []
    for count in tokens:
        if count <= ends[-1] or last_epoch_tokens <= 0:
            places.append(float(np.interp(count, ends, epochs)))
        else:
            places.append(float(epochs[-1] + (count - ends[-1]) / last_epoch_tokens))
    return places


def tokens_at_epochs(epochs: Sequence[float], tokens_seen: Series) -> list[float]:
    """The tokens seen at the end of each of ``epochs`` (0 at the end of epoch 0; NaN where not logged)."""
    at_end = dict(zip(tokens_seen.steps, tokens_seen.values))
    return [0.0 if epoch == 0 else at_end.get(epoch, math.nan) for epoch in epochs]


def _finite(xs: Sequence[float] | None, ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """The points with finite coordinates and a positive y (for a log scale); none when ``xs`` is ``None``."""
    if xs is None:
        return [], []
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y) and y > 0]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _value_at(series: Series | None, step: float) -> float | None:
    if series is None:
        return None
    return next((v for s, v in zip(series.steps, series.values) if s == step), None)


def _new_figure(width: float, height: float, show: bool):
    if show:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=(width, height))
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _finish(figure, path: str | os.PathLike, show: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:  # whole or not at all; a device or FIFO is refused, not replaced
        figure.savefig(temporary, dpi=100)
    if show:
        import matplotlib.pyplot as plt

        plt.show()
        plt.close(figure)
    return path


def _perplexity_axis(axes, xlabel: str) -> None:
    from matplotlib.ticker import LogLocator, MaxNLocator, ScalarFormatter

    if xlabel == "epoch":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(ScalarFormatter() if _spans_under_a_decade(axes) else "")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("perplexity (log scale)")
    axes.grid(True, which="major", alpha=0.3)


def _spans_under_a_decade(axes) -> bool:
    low, high = axes.get_ylim()
    return low > 0 and high / low < 10


def plot_learning_curves(
    metrics: Mapping[str, Series], path: str | os.PathLike, *,
    title: str = "", best_epoch: int | None = None, test_ppl: float | None = None,
) -> Path:  # fmt: skip
    """Write a PNG of one run's learning curves: against epoch (left) and against tokens seen (right).

    Train perplexity (every ``log_interval`` batches) and validation perplexity (after each epoch) share a
    log scale; the learning rate is a dashed step line on a second axis; the best epoch gets a star and a
    dotted line, and the title says its validation perplexity and the test perplexity.

    Args:
        metrics: the run's metrics by name (see the module docstring); missing ones are left out.
        path: where to write the PNG (its folder is made if missing).
        title: the start of the title, e.g. which run this is.
        best_epoch: the epoch whose model was kept, if any.
        test_ppl: the test perplexity of that model, if known.

    Returns:
        ``path``.

    Raises:
        ValueError: there is no perplexity to draw.
    """
    train, valid = metrics.get("train.ppl", Series()), metrics.get("valid.ppl", Series())
    tokens_seen, lr = metrics.get("tokens_seen", Series()), metrics.get("lr", Series())
    if not any(math.isfinite(v) for v in train.values + valid.values):
        raise ValueError("no train or validation perplexity was logged")
    best_ppl = _value_at(valid, best_epoch) if best_epoch else None
    summary = [f"best epoch {best_epoch}: valid ppl {best_ppl:.1f}" if best_ppl else "no epoch finished"]
    if test_ppl is not None:
        summary.append(f"test ppl {test_ppl:.1f}")
    # lr at epoch e is the rate used during e: a step from the end of e - 1 to the end of e
    lr_epochs, lr_values = ([lr.steps[0] - 1, *lr.steps], [lr.values[0], *lr.values]) if lr.values else ([], [])
    best_epochs = [best_epoch] if best_ppl else []

    figure = _new_figure(11, 4.2, show=False)
    figure.suptitle(" · ".join(filter(None, [title, *summary])), fontsize=11)
    panels = figure.subplots(1, 2)
    for axes, xlabel, x_of, train_x in (
        (panels[0], "epoch", list, epochs_at_tokens(train.steps, tokens_seen)),
        (panels[1], "tokens seen", partial(tokens_at_epochs, tokens_seen=tokens_seen), train.steps),
    ):
        axes.plot(*_finite(train_x, train.values), color="C0", alpha=0.8, linewidth=1.2, label="train")
        axes.plot(*_finite(x_of(valid.steps), valid.values), color="C1", marker="o", markersize=4, label="validation")
        for best_x in _finite(x_of(best_epochs), [best_ppl] * len(best_epochs))[0]:
            axes.axvline(best_x, color="C2", linestyle=":", linewidth=1)
            axes.plot([best_x], [best_ppl], marker="*", markersize=14, color="C2", linestyle="none",
                      label=f"best (epoch {best_epoch})")  # fmt: skip
        _perplexity_axis(axes, xlabel)
        _draw_learning_rate(axes, *_finite(x_of(lr_epochs), lr_values))
    handles = {label: handle for axes in figure.axes for handle, label in zip(*axes.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.94), ncol=len(handles),
                  fontsize=9, frameon=False)  # fmt: skip
    figure.tight_layout(rect=(0, 0, 1, 0.88))
    return _finish(figure, path, show=False)


def _draw_learning_rate(axes, xs: list[float], rates: list[float]) -> None:
    """Draw the learning rate on a second y axis, as steps: ``rates[i]`` holds from ``xs[i - 1]`` to ``xs[i]``."""
    if len(xs) < 2:
        return
    rate_axes = axes.twinx()
    rate_axes.step(xs, rates, where="pre", color="0.45", linestyle="--", linewidth=1, label="learning rate")
    rate_axes.set_ylabel("learning rate")
    rate_axes.set_ylim(0, max(rates) * 1.15)


def plot_validation_curves(
    records: Sequence[RunRecord], path: str | os.PathLike, *,
    ignore_keys: Iterable[str] = (), title: str = "validation perplexity", show: bool = False,
) -> Path:  # fmt: skip
    """Write a PNG of several runs' validation perplexity against epoch (left) and tokens seen (right).

    Each run's best epoch gets a star; the legend names each run by its id and its values of the config
    keys that differ between the runs drawn. Runs without a validation curve are left out.

    Args:
        records: the runs to draw.
        path: where to write the PNG (its folder is made if missing).
        ignore_keys: config keys never used in the legend.
        title: the figure's title.
        show: also show the figure on screen (see ``has_display``) until its window is closed.

    Returns:
        ``path``.

    Raises:
        ValueError: no run has a validation curve.
    """
    runs = [r for r in records if r.has_validation_curve]
    if not runs:
        raise ValueError("none of the runs has a validation curve")
    legend_rows = math.ceil(len(runs) / 2) if len(runs) > 3 else len(runs)
    legend_inches = 0.25 * legend_rows + 0.15
    figure = _new_figure(11, 4.2 + legend_inches, show=show)
    figure.suptitle(title, fontsize=11)
    panels = figure.subplots(1, 2)
    for index, (label, run) in enumerate(zip(run_labels(runs, ignore_keys), runs)):
        valid, best_epoch = run.metrics["valid.ppl"], run.best_epoch
        best_ppl = _value_at(valid, best_epoch) if best_epoch else None
        best_epochs = [best_epoch] if best_ppl else []
        color = f"C{index % 10}"
        for axes, x_of in (
            (panels[0], list),
            (panels[1], partial(tokens_at_epochs, tokens_seen=run.metrics.get("tokens_seen", Series()))),
        ):
            axes.plot(*_finite(x_of(valid.steps), valid.values), color=color, marker="o", markersize=3, label=label)
            axes.plot(*_finite(x_of(best_epochs), [best_ppl] * len(best_epochs)), marker="*", markersize=12,
                      color=color, linestyle="none")  # fmt: skip
    for axes, xlabel in zip(panels, ("epoch", "tokens seen")):
        _perplexity_axis(axes, xlabel)
    figure.legend(*panels[0].get_legend_handles_labels(), loc="lower center", ncol=2 if len(runs) > 3 else 1,
                  fontsize=9, frameon=False)  # fmt: skip
    figure.tight_layout(rect=(0, legend_inches / (4.2 + legend_inches), 1, 1))
    return _finish(figure, path, show)
