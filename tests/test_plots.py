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

from upo_ref.experiments.figure1 import accuracy_band  # noqa: E402
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
