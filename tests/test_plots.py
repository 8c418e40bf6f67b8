"""The report's plots read each dimension as the spec searched it (report/plots.py)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from tl_sweep.contract import TrialConfig, TrialResult  # noqa: E402
from tl_sweep.report import plots  # noqa: E402

SPACE = {"batch_size": {"choices": [16, 32, 64]}, "lr_mult": {"low": 0.1, "high": 10, "log": True, "int": False},
         "epochs": {"low": 2, "high": 6, "log": False, "int": True}}


def trials():
    out = []
    for i, (bs, lr, ep) in enumerate([(16, 0.2, 2), (32, 3.0, 4), (64, 8.0, 6), (16, 1.0, 3)]):
        c = TrialConfig.of(arm="scratch", seed=0, unfrozen_blocks=5, batch_size=bs, lr_mult=lr, epochs=ep)
        out.append(TrialResult(c, "FINISHED", ep, best_val_acc=0.5 + i / 10))
    return out


def test_each_dimension_on_the_axis_it_was_searched_on_and_the_learning_rate_too():
    fig = plots.plot_dimensions(trials(), None, 0.2, SPACE)
    axes = {ax.get_xlabel(): ax for ax in fig.axes}
    assert set(axes) == {"batch_size", "lr_mult (log)", "epochs", "learning rate (log)"}
    assert [t.get_text() for t in axes["batch_size"].get_xticklabels()] == ["16", "32", "64"]  # not 16, 18 … 64
    assert axes["lr_mult (log)"].get_xscale() == "log" and axes["learning rate (log)"].get_xscale() == "log"
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "stopped early" not in labels and "ran its schedule" in labels  # no entry for what is not there


def test_parallel_coordinates_are_drawn_from_the_finished_trials(tmp_path):
    assert plots.plot_parallel(trials(), SPACE, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000
    assert not plots.plot_parallel(trials()[:2], SPACE, tmp_path / "q.png")  # fewer than three: no plot
