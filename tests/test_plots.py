"""Learning-curve pictures: exact epoch placement, real PNGs from real tiny runs, and a plot that never costs a run."""

from __future__ import annotations

import json
import logging
import math

import pytest
from matplotlib.image import imread

import wordlm.experiment as experiment
import wordlm.run
from wordlm.tracking.plots import (
    LEARNING_CURVES_PNG,
    epochs_at_tokens,
    has_display,
    plot_learning_curves,
    plot_validation_curves,
    tokens_at_epochs,
)
from wordlm.tracking.runs import RunRecord, Series, read_run_folder, run_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path, width: int, height: int) -> None:
    """A real PNG picture of ``width`` x ``height`` pixels, small, and not blank."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 10_000 < len(data) < 200_000
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # a blank (one-colour) picture has 0; these curves give about 0.2


def synthetic_metrics() -> dict[str, Series]:
    """Three epochs of 100 tokens, train ppl every 50 tokens, the rate quartered after a worse epoch 2."""
    return {
        "train.ppl": Series([50, 100, 150, 200, 250, 300], [900.0, 500.0, 400.0, 380.0, 300.0, 280.0]),
        "valid.ppl": Series([1, 2, 3], [450.0, 470.0, 320.0]),
        "tokens_seen": Series([1, 2, 3], [100, 200, 300]),
        "lr": Series([1, 2, 3], [20.0, 20.0, 5.0]),
    }


def test_epochs_at_tokens_interpolates_within_epochs_and_extrapolates_past_the_last():
    ends = Series([1, 2], [100, 300])  # epoch 1: 100 tokens, epoch 2: 200 tokens
    assert epochs_at_tokens([0, 50, 100, 200, 300, 400], ends) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert epochs_at_tokens([10], Series()) is None  # no epoch finished: nothing to measure an epoch by
    assert tokens_at_epochs([0, 1, 2], ends) == [0, 100, 300]
    assert math.isnan(tokens_at_epochs([3], ends)[0])


def test_learning_curves_png_has_both_panels_drawn(tmp_path):
    path = plot_learning_curves(synthetic_metrics(), tmp_path / "deep" / "curves.png", title="run 7",
                                best_epoch=3, test_ppl=333.0)  # fmt: skip
    check_png(path, 1100, 420)


def test_learning_curves_refuse_metrics_without_perplexity(tmp_path):
    with pytest.raises(ValueError, match="no train or validation perplexity"):
        plot_learning_curves({"lr": Series([1], [20.0])}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_validation_curves_of_several_runs_on_one_png(tmp_path):
    slower = {**synthetic_metrics(), "valid.ppl": Series([1, 2, 3], [600.0, 500.0, 450.0])}
    runs = [RunRecord("1", config={"lr": 20.0}, metrics=synthetic_metrics()),
            RunRecord("2", config={"lr": 5.0}, metrics=slower),
            RunRecord("3", config={"lr": 1.0}, notes=["no metrics.json"])]  # fmt: skip
    path = plot_validation_curves(runs, tmp_path / "both.png")
    check_png(path, 1100, 420 + 65)  # two legend lines below the panels: run 3 has no curve
    with pytest.raises(ValueError, match="none of the runs"):
        plot_validation_curves(runs[2:], tmp_path / "none.png")


def test_legend_labels_name_the_config_keys_that_differ():
    runs = [RunRecord("1", config={"lr": 20.0, "nhid": 32, "seed": 1}), RunRecord("2", config={"lr": 5.0, "nhid": 32}),
            RunRecord("3", config={"lr": 5.0, "nhid": 64, "seed": 1})]  # fmt: skip
    assert run_labels(runs, ignore_keys={"seed"}) == ["run 1, lr=20.0, nhid=32", "run 2, lr=5.0, nhid=32",
                                                      "run 3, lr=5.0, nhid=64"]  # fmt: skip
    assert run_labels(runs) == ["run 1, lr=20.0, nhid=32, seed=1", "run 2, lr=5.0, nhid=32, seed=-",
                                "run 3, lr=5.0, nhid=64, seed=1"]  # fmt: skip


def test_no_display_means_no_window(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    assert has_display() is False


def train_in_process(corpus, tmp_path, observed: bool = True, **updates):
    """Run `train` in this process on the smoke config; observed runs are recorded in ``tmp_path/runs``."""
    config = {"dataset": str(corpus), "save": str(tmp_path / "model.pt"), "epochs": 2, "max_batches": 4,
              "log_interval": 2, **updates}  # fmt: skip
    options = {"--loglevel": "WARNING"}
    options.update({"--file_storage": str(tmp_path / "runs")} if observed else {"--unobserved": True})
    return experiment.ex.run(config_updates=config, named_configs=["smoke"], options=options)


def test_a_real_run_leaves_its_learning_curves_in_its_folder(tiny_corpus, tmp_path):
    run = train_in_process(tiny_corpus, tmp_path)
    folder = tmp_path / "runs" / str(run._id)
    check_png(folder / LEARNING_CURVES_PNG, 1100, 420)
    assert LEARNING_CURVES_PNG in json.loads((folder / "run.json").read_text())["artifacts"]
    record = read_run_folder(folder)  # the picture shows what the records hold
    assert record.metrics["valid.ppl"].steps == [1, 2]
    assert len(record.metrics["train.ppl"].values) == 4  # every 2 of 4 batches, 2 epochs


def test_unobserved_runs_draw_nothing(tiny_corpus, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        train_in_process(tiny_corpus, tmp_path, observed=False, epochs=1)
    assert not list(tmp_path.rglob("*.png"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_failing_plot_is_one_warning_line_and_the_run_completes(tiny_corpus, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts here\nsecond line of a long story")

    monkeypatch.setattr(wordlm.run, "plot_learning_curves", broken)
    with caplog.at_level(logging.WARNING):
        run = train_in_process(tiny_corpus, tmp_path, epochs=1)
    assert run.status == "COMPLETED" and math.isfinite(run.result)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["learning curves not drawn: no fonts here"]
    assert not (tmp_path / "runs" / str(run._id) / LEARNING_CURVES_PNG).exists()
