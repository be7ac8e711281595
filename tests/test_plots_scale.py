"""Figures at the published sizes (SSC/GSC: 140 inputs, 3 x 512 LIF, K = 31, 60-100 epochs): every
synapse shows, and what is drawn does not grow with the number of synapses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from snn_delays import plots
from snn_delays.model import DelaySNN

N_IN, N_HIDDEN, K = 140, 512, 31


@pytest.fixture(scope="module")
def ssc_model() -> DelaySNN:
    torch.manual_seed(0)
    return DelaySNN(N_IN, 35, n_hidden=N_HIDDEN, n_layers=3, kernel_size=K, dropout=0.25).eval()


def rendered(fig, dpi: int) -> np.ndarray:
    """The figure as drawn at ``dpi``: (H, W, 3) in [0, 1]; axes' window extents match it."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3] / 255.0


@pytest.mark.parametrize("dpi", [72, plots.FIGURE_DPI])
def test_rounded_kernel_of_512_presynaptic_neurons_shows_every_synapse(dpi):
    """One synapse at each delay, each on its own presynaptic row of 512: the panel has fewer pixel
    rows than that, and each synapse still colours its delay's column (nearest-neighbour
    resampling drew one row in ~2.5 and dropped most of them)."""
    rows = 20 + 15 * np.arange(K)  # one presynaptic neuron per delay, spread over 20..470 of 0..511
    weight = np.zeros((2, N_HIDDEN), np.float32)
    weight[0, rows] = np.where(np.arange(K) % 2, 0.1, -0.1)
    delays = np.zeros((2, N_HIDDEN), np.int64)
    delays[0, rows] = np.arange(K)
    view = plots.LayerView(
        "hidden 1 → hidden 2", weight, (K // 2 - delays).astype(np.float32), delays, K, 0.3, 10.0
    )
    fig = plots.kernel_figure([view], layer=0, neurons=[0])
    img = rendered(fig, dpi)
    ax = [a for a in fig.axes if a.images][1]  # the rounded (evaluated) kernel
    assert np.count_nonzero(np.asarray(ax.images[0].get_array())) == K
    box = ax.get_window_extent()
    h = img.shape[0]
    panel = img[int(h - box.y1) + 2 : int(h - box.y0) - 2, int(box.x0) + 2 : int(box.x1) - 2]
    assert panel.shape[0] < N_HIDDEN / 2  # the case in question: fewer pixel rows than synapse rows
    coloured = panel.min(-1) < 0.85  # the colour map's 0 is near white (0.97)
    width = panel.shape[1] / K
    centres = ((np.arange(K) + 0.5) * width).astype(int)
    shown = [bool(coloured[:, c - int(width / 4) : c + int(width / 4) + 1].any()) for c in centres]
    assert all(shown), f"synapses at delays {[k for k in range(K) if not shown[k]]} are not drawn"


def test_figures_at_the_published_size_draw_a_bounded_number_of_points(ssc_model, tmp_path):
    """614k synapses: the weight-delay scatter draws a seeded 20000 per layer, the position figure
    100 traced synapses per layer over 100 epochs, and positions.npz stays small."""
    views = plots.layer_views(ssc_model)
    assert [v.weight.size for v in views] == [N_IN * N_HIDDEN, N_HIDDEN**2, N_HIDDEN**2, N_HIDDEN * 35]
    fig = plots.weight_vs_delay(views)
    assert len(fig.axes) == 4
    for ax, v in zip(fig.axes, views, strict=True):
        assert len(ax.collections[0].get_offsets()) == min(v.weight.size, 20000)
        assert ax.get_xlabel() == "delay (ms)" and ax.get_title().startswith(v.name)

    trace = plots.PositionTrace()
    for epoch in range(101):
        trace.record(ssc_model, epoch)
    trace.save(tmp_path / "positions.npz")
    assert (tmp_path / "positions.npz").stat().st_size < 500_000
    fig = plots.position_figure(trace)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == 101 and all(len(line.get_xdata()) == 101 for line in lines)
