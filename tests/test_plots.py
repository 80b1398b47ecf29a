"""Plot helpers: the band drawn is the seed interval of upo_ref.utils.stats, figures land in
figures_dir at 110 dpi, and Figure 1's accuracy band is one binomial standard error."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from upo_ref.experiments.figure1 import accuracy_band, draw_figure1  # noqa: E402
from upo_ref.utils.plots import FIGURE_DPI, plot_mean_band, save_figure  # noqa: E402
from upo_ref.utils.stats import mean_interval  # noqa: E402


def test_plot_mean_band_draws_the_mean_and_the_student_t_interval():
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(5)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)  # (T, S)
    fig, ax = plt.subplots()
    line = plot_mean_band(ax, steps, x, "run")
    mean, lo, hi = mean_interval(x, dim=1)
    np.testing.assert_allclose(line.get_ydata(), mean.numpy(), rtol=0, atol=0)
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.min(), lo.min().item()) and np.isclose(ys.max(), hi.max().item())
    assert set(np.round(ys, 12)) >= set(np.round(np.concatenate([lo.numpy(), hi.numpy()]), 12))
    plt.close(fig)


def test_save_figure_writes_under_figures_dir_at_110_dpi(tmp_path, monkeypatch):
    monkeypatch.setenv("UPO_REF_FIGURES", str(tmp_path / "figs"))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, "00_test.png")
    plt.close(fig)
    assert path == tmp_path / "figs" / "00_test.png"
    dpi = Image.open(path).info["dpi"]
    assert [round(d) for d in dpi] == [FIGURE_DPI, FIGURE_DPI] == [110, 110]


def test_figure1_accuracy_band_is_one_binomial_standard_error():
    low, high = accuracy_band([0.5, 0.9, 1.0], 100)
    assert low == pytest.approx([0.45, 0.87, 1.0], abs=1e-15)
    assert high == pytest.approx([0.55, 0.93, 1.0], abs=1e-15)
    with pytest.raises(ValueError, match="n_eval must be the number of eval pairs"):
        accuracy_band([0.5], 0)


def test_figure1_leaves_the_panel_of_a_loss_not_run_at_a_beta_blank_and_says_so():
    def records(loss):
        rows = [{"split": "train", "examples_seen": 16 * i, "loss": loss} for i in range(1, 5)]
        evals = [
            {"split": "eval", "examples_seen": n, "loss": loss, "rewards/accuracies": 0.5 + n / 1e3,
             "rewards/margins": n / 1e4}
            for n in (0, 32, 64)
        ]  # fmt: skip
        return rows + evals

    runs = {("IPO", 0.1): records(25.0), ("IPO", 0.5): records(1.0), ("DPO", 0.1): records(0.69)}
    fig = draw_figure1(runs, n_eval=100)
    axes = fig.axes  # row-major: IPO loss, DPO loss, accuracy, margin; columns beta 0.1, 0.5
    assert len(axes) == 8
    dpo_at_05 = axes[3]
    assert not dpo_at_05.axison and [t.get_text() for t in dpo_at_05.texts] == [
        "no DPO run at β = 0.5"
    ]
    assert all(ax.axison for i, ax in enumerate(axes) if i != 3)
    # the accuracy row: both runs at beta 0.1 drawn, the y-range leaves the legend room above 0.6
    accuracy = axes[4]
    assert [line.get_label() for line in accuracy.get_lines()][:2] == ["IPO", "DPO"]
    assert accuracy.get_ylim()[1] > 0.6
