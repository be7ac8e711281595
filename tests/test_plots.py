"""Figures: one panel per layer, the right numbers in them, and the plot command on a real run."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from matplotlib.figure import Figure

from snn_delays import plot_cli, plots
from snn_delays.checkpoints import find_checkpoint, load_checkpoint, read_history, run_dir_of
from snn_delays.model import DelaySNN

N_LAYERS = 2  # hidden layers: 3 delay layers with the readout


def tiny_run(tmp_path_factory: pytest.TempPathFactory, model: str = "delays") -> Path:
    """A 2-epoch synthetic run (``model=delays|fixed_delays|no_delays``) through the real command
    line, trained once per test session."""
    run = tmp_path_factory.getbasetemp() / ("tiny_run" if model == "delays" else f"tiny_run_{model}")
    if not (run / "metrics.json").is_file():
        run_cli(
            "train",
            "experiment=synthetic",
            f"model={model}",
            "trainer.epochs=2",
            "logger=none",
            "trainer.progress=false",
            "dataset.n_train=128",
            "dataset.n_valid=32",
            "dataset.n_test=32",
            f"hydra.run.dir={run}",
        )
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture
def model() -> DelaySNN:
    torch.manual_seed(0)
    return DelaySNN(
        n_inputs=6, n_classes=3, n_hidden=8, n_layers=N_LAYERS, max_delay_ms=50.0, dt_ms=10.0, dropout=0.0
    ).eval()


def history(epochs: int = 3) -> list[dict[str, float]]:
    return [
        {
            "epoch": e,
            "train/loss": 1.0 / e,
            "train/acc": 0.5,
            "valid/loss": 1.2 / e,
            "valid/acc": 0.4 + e / 10,
            "test/loss": 1.1 / e,
            "test/acc": 0.45,
            "lr/weights": 1e-3,
            "lr/positions": 0.1,
            "sigma": 2.0 / e,
            **{f"delay/mean_ms/layer{i}": 20.0 for i in range(N_LAYERS + 1)},
            **{f"delay/std_ms/layer{i}": 5.0 for i in range(N_LAYERS + 1)},
        }
        for e in range(1, epochs + 1)
    ]


def labelled(fig: Figure) -> bool:
    return all(ax.get_xlabel() and ax.get_ylabel() and ax.get_title() for ax in fig.axes)


@pytest.mark.parametrize("make", [plots.delay_histogram, plots.weight_vs_delay])
def test_per_layer_figures_have_one_labelled_panel_per_layer(model, make):
    fig = make(model)
    assert isinstance(fig, Figure) and len(fig.axes) == N_LAYERS + 1 and labelled(fig)
    assert all(ax.get_xlabel() == "delay (ms)" for ax in fig.axes)


def test_histogram_counts_every_synapse_at_its_rounded_delay(model):
    fig = plots.delay_histogram(model)
    for ax, layer in zip(fig.axes, model.delay_layers(), strict=True):
        heights = [p.get_height() for p in ax.patches]
        expected = np.bincount(layer.delays().flatten().numpy(), minlength=layer.kernel_size)
        assert heights == expected.tolist()


def test_kernel_figure_shows_gaussian_and_rounded_kernel_at_the_right_delays(model):
    layer = model.delay_layers()[1]
    layer.set_sigma(0.0)  # Gaussian peak at the tap nearest the position
    fig = plots.kernel_figure(model, layer=1, neurons=[0, 5])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 4 and all(im.axes.get_xlabel() in ("delay (ms)", "") for im in images)
    delays = layer.delays().numpy()
    for row, o in enumerate([0, 5]):
        gauss, rounded = (np.asarray(im.get_array()) for im in images[2 * row : 2 * row + 2])
        assert gauss.shape == rounded.shape == (8, layer.kernel_size)  # presynaptic neuron x delay
        assert (np.count_nonzero(rounded, axis=1) <= 1).all()
        np.testing.assert_array_equal(np.abs(rounded).argmax(1), delays[o])
        np.testing.assert_array_equal(np.abs(gauss).argmax(1), delays[o])
        np.testing.assert_allclose(rounded.sum(1), layer.weight[o].detach().numpy(), rtol=1e-6)
    assert images[0].axes.get_xlim() == pytest.approx((-5.0, 45.0))  # 0..40 ms, K = 5 taps of 10 ms


def test_position_trace_records_saves_loads_and_rewinds(model, tmp_path):
    trace = plots.PositionTrace(n_synapses=10, seed=1)
    trace.record(model, 0)
    layers = model.delay_layers()
    with torch.no_grad():
        layers[0].dcls.P.add_(0.5)
    trace.record(model, 1)
    first = layers[0]
    expected = (first.kernel_size // 2 - first.positions.detach().flatten()[trace.index[0]].numpy()) * 10.0
    np.testing.assert_allclose(trace.layer_delays(0)[-1], expected, rtol=1e-6)
    assert trace.layer_delays(0).shape == (2, 10) and trace.layer_delays(2).shape == (
        2,
        10,
    )  # readout: 24 synapses
    assert trace.means[0][1] == pytest.approx(trace.means[0][0] - 5.0, abs=1e-4)  # +0.5 step = 5 ms earlier

    trace.save(tmp_path / "positions.npz")
    loaded = plots.PositionTrace.load(tmp_path / "positions.npz")
    assert loaded.epochs == [0, 1] and loaded.names == trace.names
    for i in range(N_LAYERS + 1):
        np.testing.assert_array_equal(loaded.index[i], trace.index[i])
        np.testing.assert_allclose(loaded.layer_delays(i), trace.layer_delays(i))
    loaded.record(model, 1)  # a resumed run re-records epoch 1: no duplicate
    assert loaded.epochs == [0, 1]
    fig = plots.position_figure(loaded)
    assert len(fig.axes) == N_LAYERS + 1 and labelled(fig)
    assert plots.PositionTrace(seed=1).index == []  # nothing chosen before the first record


def test_spike_raster_has_input_each_hidden_layer_and_output_on_one_time_axis(model):
    model.train()
    x = (torch.rand(12, 6) < 0.3).to(torch.uint8)
    fig = plots.spike_raster(model, x, label=1, class_names=["a", "b", "c"])
    assert model.training, "the model's mode is restored"
    assert len(fig.axes) == 1 + N_LAYERS + 1
    assert fig.axes[-1].get_xlabel() == "time (ms)"
    t_out = 12 + (N_LAYERS + 1) * (5 - 1) // 2  # each delay layer adds (K-1)//2 steps
    assert fig.axes[-1].get_xlim() == pytest.approx((0, t_out * 10.0))
    assert "label b" in fig.axes[-1].get_title()


class OnDevice(torch.Tensor):
    """A sample that lives on an accelerator, as the trainer's does (its data is moved to the
    GPU): numpy() refuses it, as torch does a CUDA tensor; cpu() gives the host copy."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


@pytest.mark.parametrize(
    "where",
    [
        "proxy",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
        ),
    ],
)
def test_spike_raster_of_a_sample_on_the_gpu(model, where):
    """On a GPU run the trainer's raster sample is a CUDA tensor (split.x[0] of the data moved to
    the device): the input panel called x.numpy() on it, so every figure epoch of a GPU run
    raised, and log_epoch_figures dropped all its figures with one warning."""
    x = (torch.rand(12, 6) < 0.3).float()
    if where == "cuda":
        model, sample = model.cuda(), x.cuda()
    else:
        sample = x.as_subclass(OnDevice)
    fig = plots.spike_raster(model, sample, label=1)
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), x.numpy().T)
    expected = plots.spike_raster(model, x, label=1)
    assert [ax.get_title() for ax in fig.axes] == [ax.get_title() for ax in expected.axes]


def test_spike_raster_of_analog_input_claims_no_spike_count(model):
    """GSC feeds log-mel dB values: the input panel titled them "total -1234 (counts per 10 ms
    bin)", the sum of decibels called a spike count."""
    x = torch.linspace(-80.0, 20.0, 12 * 6).reshape(12, 6)
    title = plots.spike_raster(model, x).axes[0].get_title()
    assert "count" not in title and "analog values per 10 ms bin, -80 to 20" in title
    counts = plots.spike_raster(model, torch.tensor([[0, 2, 1, 0, 0, 0]] * 12)).axes[0].get_title()
    assert counts == "input: 6 channels, total 36 (counts per 10 ms bin)"


def test_training_curves_draw_the_panels_with_data():
    fig = plots.training_curves(history())
    assert len(fig.axes) == 5 and labelled(fig)  # loss, accuracy, sigma, learning rates, mean delays
    assert fig.axes[3].get_yscale() == "log"
    acc = fig.axes[1].get_lines()[1].get_ydata()  # valid accuracy in %
    np.testing.assert_allclose(acc, [50, 60, 70])
    no_delays = [
        {k: v for k, v in row.items() if not k.startswith(("delay/", "sigma", "lr/positions"))}
        for row in history()
    ]
    assert len(plots.training_curves(no_delays).axes) == 3
    with pytest.raises(ValueError, match="empty"):
        plots.training_curves([])


class RecordingLogger:
    def __init__(self) -> None:
        self.figures, self.histograms = [], {}

    def log_figure(self, name, figure, step):
        assert figure.axes, "figures are logged before they are closed"
        self.figures.append((name, step))

    def log_histogram(self, name, values, step):
        self.histograms[name] = values


def test_figures_for_run_and_log_figures_save_and_log_everything(model, tmp_path):
    trace = plots.PositionTrace()
    trace.record(model, 0)
    figures = plots.figures_for_run(model, history(), trace, torch.ones(10, 6))
    assert set(figures) == {
        "training/curves",
        "delays/histogram",
        "delays/weight_vs_delay",
        "delays/positions",
        "spikes/raster",
        *(f"delays/kernels_layer{i}" for i in range(N_LAYERS + 1)),
    }
    logger = RecordingLogger()
    assert plots.log_figures(logger, figures, 7, None, plots.delay_values_ms(model)) == []
    assert logger.figures == [(n, 7) for n in figures]
    assert set(logger.histograms) == {f"delay/hist_ms/layer{i}" for i in range(N_LAYERS + 1)}
    np.testing.assert_array_equal(
        logger.histograms["delay/hist_ms/layer0"], model.delay_layers()[0].delays().flatten().numpy() * 10.0
    )
    saved = plots.figures_for_run(model, sample_x=torch.ones(10, 6))
    saved = {k: saved[k] for k in ("delays/histogram", "spikes/raster")}
    paths = plots.log_figures(None, saved, 7, tmp_path / "figures", dpi=30)
    assert [p.name for p in paths] == ["delays_histogram.png", "spikes_raster.png"]
    assert all(p.stat().st_size > 0 and p.parent == tmp_path / "figures" for p in paths)
    assert all(not fig.axes for fig in figures.values()), "figures are closed after logging"


def count_renders(figures: dict) -> dict[str, int]:
    """Each figure's ``savefig`` calls, counted into the returned dict as they happen."""
    renders: dict[str, int] = {}
    for name, fig in figures.items():

        def counting(*args, _save=fig.savefig, _name=name, **kwargs):
            renders[_name] = renders.get(_name, 0) + 1
            return _save(*args, **kwargs)

        fig.savefig = counting
    return renders


def test_each_figure_is_rendered_once_for_its_file_and_the_logger(model, tmp_path):
    """A figure epoch rendered every figure twice (figures/, then the logger: ~45 % of a figure
    epoch of the SSC network, ~10 s on this CPU); the logger now gets the same PNG bytes."""
    from snn_delays.loggers import CSVLogger

    figures = plots.figures_for_run(model, history(), None, torch.ones(10, 6))
    renders = count_renders(figures)
    paths = plots.log_figures(CSVLogger(tmp_path), figures, 3, tmp_path / "figures")
    assert renders == dict.fromkeys(figures, 1)
    for name, path in zip(figures, paths, strict=True):
        logged = tmp_path / "logs" / "figures" / f"{name.replace('/', '_')}_0003.png"
        assert logged.read_bytes() == path.read_bytes()

    # no folder, and a logger of the older interface (no png) that draws each figure itself:
    # rendered by that logger alone, not also for bytes nobody reads
    class DrawsItself(RecordingLogger):
        def log_figure(self, name, figure, step):
            figure.savefig(io.BytesIO(), format="png")
            super().log_figure(name, figure, step)

    figures = plots.figures_for_run(model, history(), None, torch.ones(10, 6))
    renders = count_renders(figures)
    logger = DrawsItself()
    assert plots.log_figures(logger, figures, 4) == []
    assert renders == dict.fromkeys(figures, 1) and [n for n, _ in logger.figures] == list(figures)


def test_a_figure_that_fails_to_log_costs_only_itself(model, tmp_path, caplog):
    """A logger that refuses one figure: a warning naming it; every figure is still saved, the
    others logged, all closed."""

    class Refusing(RecordingLogger):
        def log_figure(self, name, figure, step):
            if name == "delays/histogram":
                raise AttributeError("module 'matplotlib' has no attribute 'pyplot'")
            super().log_figure(name, figure, step)

    figures = plots.figures_for_run(model, history(), None, torch.ones(10, 6))
    logger = Refusing()
    paths = plots.log_figures(logger, figures, 3, tmp_path, plots.delay_values_ms(model), dpi=30)
    assert {p.name for p in paths} == {plots.figure_path(tmp_path, n).name for n in figures}
    assert [n for n, _ in logger.figures] == [n for n in figures if n != "delays/histogram"]
    assert logger.histograms, "the histograms are logged after a failed figure"
    assert "figure delays/histogram (epoch 3) failed: AttributeError" in caplog.text
    assert all(not fig.axes for fig in figures.values())


def test_a_model_without_delays_gets_the_figures_that_apply(tmp_path, caplog):
    model = DelaySNN(n_inputs=4, n_classes=2, n_hidden=5, n_layers=1, delays="none").eval()
    assert set(plots.figures_for_run(model, history(), None, torch.ones(6, 4))) == {
        "training/curves",
        "spikes/raster",
    }
    with pytest.raises(ValueError, match="no delay layers"):
        plots.delay_histogram(model)
    # The trainer's hook never raises: a broken figure costs a warning, not the run.
    assert plots.log_epoch_figures(None, model, [{"epoch": 1}], 1, tmp_path, sample_x=torch.ones(3, 99)) == []
    assert "figures for epoch 1 failed" in caplog.text


def test_checkpoint_loads_back_into_the_same_network(run_dir):
    ckpt = find_checkpoint(run_dir, "last")
    assert ckpt == run_dir / "checkpoints" / "last.pt" and run_dir_of(ckpt) == run_dir.resolve()
    model, config, data = load_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["model"]
    assert not model.training and data["name"] == "synthetic" and config["trainer"]["epochs"] == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    rows = read_history(run_dir)
    assert [r["epoch"] for r in rows] == [1.0, 2.0] and not math.isnan(rows[-1]["test/acc"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(run_dir / "nowhere")


def test_plot_command_writes_every_figure_of_a_trained_run(run_dir, tmp_path):
    if not (run_dir / "positions.npz").is_file():  # until the trainer records one itself
        trace = plots.PositionTrace()
        model = load_checkpoint(find_checkpoint(run_dir, "last"))[0]
        trace.record(model, 2)
        trace.save(run_dir / "positions.npz")
    proc = run_cli("plot_cli", str(run_dir), "--checkpoint", "last", "--dpi", "40")
    pngs = sorted((run_dir / "figures").glob("*.png"))
    names = {p.stem for p in pngs}
    assert {
        "training_curves",
        "delays_histogram",
        "delays_weight_vs_delay",
        "delays_positions",
        "spikes_raster",
        "delays_kernels_layer0",
        "delays_kernels_layer1",
    } <= names
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert all(str(p) in proc.stdout for p in pngs)


def test_plot_command_options(run_dir, tmp_path, monkeypatch, capsys):
    written = {}

    def fake_log_figures(logger, figures, step, out_dir, dpi):
        written.update(names=set(figures), out=out_dir, step=step, dpi=dpi)
        return [plots.figure_path(out_dir, name) for name in figures]  # as if all were written

    monkeypatch.setattr(plot_cli, "log_figures", fake_log_figures)
    out = tmp_path / "elsewhere"
    assert plot_cli.main([str(run_dir / "checkpoints" / "best.pt"), "--no-data", "--out", str(out)]) == 0
    assert "spikes/raster" not in written["names"] and "delays/histogram" in written["names"]
    assert written["out"] == out and written["step"] >= 1
    assert plot_cli.main([str(tmp_path / "no_run")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_plot_command_explains_missing_data_and_never_downloads(tmp_path, capsys):
    config = {
        "dataset": {
            "_target_": "snn_delays.data.spikes.load_shd",
            "root": str(tmp_path / "shd"),
            "download": True,
        }
    }
    assert plot_cli.raster_sample(config, 0) is None
    err = capsys.readouterr().err
    assert "skipping the spike raster" in err and "--no-data" in err and "shd_train.h5" in err
    assert not (tmp_path / "shd").exists() or not any((tmp_path / "shd").rglob("*.h5*"))


def _copy_run(run_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("figures"))
    return dest


def _fake_log_figures(written: dict):
    def fake(logger, figures, step, out_dir, dpi):
        written.update(names=set(figures))
        return [plots.figure_path(out_dir, name) for name in figures]  # as if all were written

    return fake


@pytest.mark.parametrize("content", [b"", b"\x00garbage\x00" * 10, "truncated"])
def test_an_unreadable_checkpoint_is_named_with_what_to_do(run_dir, tmp_path, capsys, content):
    from snn_delays.checkpoints import UnreadableCheckpointError, read_checkpoint

    run = _copy_run(run_dir, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    data = best.read_bytes()
    best.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    with pytest.raises(UnreadableCheckpointError, match="unreadable checkpoint") as err:
        read_checkpoint(best)
    assert str(best) in str(err.value) and "truncated or corrupt" in str(err.value)
    assert "last.pt" in str(err.value)  # the way out: the run's other checkpoint
    assert plot_cli.main([str(run), "--no-data"]) == 2
    message = capsys.readouterr().err
    assert str(best) in message and "last.pt" in message


def test_plot_survives_a_corrupt_trace_and_an_empty_metrics_csv(run_dir, tmp_path, monkeypatch, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "positions.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (run / "metrics.csv").write_text("")
    written: dict = {}
    monkeypatch.setattr(plot_cli, "log_figures", _fake_log_figures(written))
    assert plot_cli.main([str(run), "--no-data"]) == 0
    err = capsys.readouterr().err
    assert "positions.npz" in err and "warning" in err
    # the other figures are drawn; the curves come from the checkpoint's history
    assert {"training/curves", "delays/histogram", "delays/weight_vs_delay"} <= written["names"]
    payload = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert read_history(run, payload) == payload["state"]["history"] != []
    written.clear()
    (run / "metrics.csv").write_text("epoch,train/loss\n")  # a header and no rows: the same
    assert plot_cli.main([str(run), "--no-data"]) == 0 and "training/curves" in written["names"]
    written.clear()
    (run / "metrics.csv").write_bytes(b"epoch,train/loss\n\xff\xfe\x00garbage\n")  # not UTF-8: the same
    with pytest.warns(UserWarning, match="metrics.csv is unreadable"):
        assert plot_cli.main([str(run), "--no-data"]) == 0
    assert "training/curves" in written["names"]


def applied_delays(layer) -> np.ndarray:
    """The delay in steps ``(out, in)`` the evaluated layer applies, read from its output: an
    impulse on input ``i`` at t = 0 (batch element ``i``) comes out of neuron ``o`` at t = d[o, i]."""
    k, n_in = layer.kernel_size, layer.in_features
    x = torch.zeros(k, n_in, n_in)
    x[0, torch.arange(n_in), torch.arange(n_in)] = 1.0
    with torch.no_grad():
        y = layer.eval()(x)  # (T, in, out)
    return y.abs().argmax(0).T.numpy()


def test_figures_show_the_delays_the_evaluated_network_applies_in_ms(model):
    """Known positions, the kernel edges and ties among them: the histogram's bars (their place in
    ms and their heights), the weight-delay line and the rounded kernels agree with the delays
    the evaluated layers apply to an impulse, d = K//2 - round(p) steps of dt = 10 ms."""
    lim = 2  # K = 5
    chosen = torch.tensor([lim, -lim, 1.5, -1.5, 0.5, -0.5, 0.49, -1.51, 0.0, 1.0, -1.0, lim])
    for layer in model.delay_layers():
        n = layer.positions.numel()
        with torch.no_grad():
            layer.dcls.P.copy_(chosen.repeat(n // len(chosen) + 1)[:n].reshape(layer.dcls.P.shape))
            layer.dcls.weight.copy_(torch.linspace(0.1, 1.0, n).reshape(layer.dcls.weight.shape))
    first = model.delay_layers()[0]
    d0 = applied_delays(first)
    # the convention itself, by hand: p = +K//2 -> 0 ms, p = -K//2 -> (K-1) steps, ties to even
    assert [d0.ravel()[j] for j in range(6)] == [0, 4, 0, 4, 2, 2]

    hist = plots.delay_histogram(model)
    wd = plots.weight_vs_delay(model)
    for i, layer in enumerate(model.delay_layers()):
        d = applied_delays(layer)
        bars = hist.axes[i].patches
        centres = [b.get_x() + b.get_width() / 2 for b in bars]
        np.testing.assert_allclose(centres, np.arange(5) * 10.0, atol=1e-9)  # 0, 10, ..., 40 ms
        assert [b.get_height() for b in bars] == np.bincount(d.ravel(), minlength=5).tolist()
        assert hist.axes[i].get_title().endswith(f"{d.size} synapses")
        line = wd.axes[i].get_lines()[0]
        w = layer.weight.detach().numpy()
        steps = np.unique(d)
        np.testing.assert_allclose(line.get_xdata(), steps * 10.0)
        np.testing.assert_allclose(line.get_ydata(), [w[d == s].mean() for s in steps], rtol=1e-6)
        kernels = plots.kernel_figure(model, layer=i, neurons=[0, layer.out_features - 1])
        rounded = [np.asarray(ax.images[0].get_array()) for ax in kernels.axes if ax.images][1::2]
        for kern, o in zip(rounded, [0, layer.out_features - 1], strict=True):
            np.testing.assert_array_equal(np.abs(kern).argmax(1), d[o])


def test_figures_of_a_run_plot_what_it_saved(run_dir):
    """The position figure draws positions.npz, the curves draw metrics.csv, and the histogram
    of last.pt has the mean delay metrics.csv logged for the last epoch."""
    trace = plots.PositionTrace.load(run_dir / "positions.npz")
    rows = read_history(run_dir)
    model = load_checkpoint(find_checkpoint(run_dir, "last"))[0]
    with np.load(run_dir / "positions.npz") as saved:
        fig = plots.position_figure(trace)
        for i, ax in enumerate(fig.axes):
            delays, mean = saved[f"delays_ms_{i}"], saved[f"mean_ms_{i}"]
            lines = ax.get_lines()
            assert len(lines) == delays.shape[1] + 1
            for j, line in enumerate(lines[:-1]):
                np.testing.assert_array_equal(line.get_xdata(), saved["epochs"])
                np.testing.assert_allclose(line.get_ydata(), delays[:, j])
            np.testing.assert_allclose(lines[-1].get_ydata(), mean)
            layer = model.delay_layers()[i]  # the last epoch's trace is last.pt's positions
            p = layer.positions.detach().numpy().ravel()[saved[f"index_{i}"]]
            np.testing.assert_allclose(delays[-1], (layer.kernel_size // 2 - p) * 10.0, rtol=1e-5, atol=1e-4)
    curves = plots.training_curves(rows)
    panels = {ax.get_title(): ax for ax in curves.axes}
    sigma = panels["sigma (Gaussian kernel width)"].get_lines()[0]
    np.testing.assert_allclose(sigma.get_ydata(), [r["sigma"] for r in rows])
    np.testing.assert_allclose(sigma.get_xdata(), [1, 2])
    means = panels["mean delay per layer (dashed: ± std)"].get_lines()
    hist = plots.delay_histogram(model)
    for i, ax in enumerate(hist.axes):
        logged = rows[-1][f"delay/mean_ms/layer{i}"]
        assert means[3 * i].get_ydata()[-1] == pytest.approx(logged)  # each layer: mean, mean ± std
        assert ax.get_lines()[0].get_xdata()[0] == pytest.approx(logged, rel=1e-6)  # the dashed mean


def test_training_curves_name_the_split_the_best_epoch_was_chosen_on():
    rows = history()
    assert "epoch 3, best on validation" in plots.training_curves(rows)._suptitle.get_text()
    for row, acc in zip(rows, (0.3, 0.9, 0.5), strict=True):  # no validation split: chosen on test
        row.update({"valid/acc": math.nan, "valid/loss": math.nan, "test/acc": acc})
    fig = plots.training_curves(rows)
    assert "epoch 2, best on test" in fig._suptitle.get_text()
    assert [ax.get_lines()[-1].get_xdata()[0] for ax in fig.axes] == [2] * len(fig.axes)  # the dotted line


def test_a_history_of_nan_costs_only_the_curves(model, caplog):
    rows = [{"epoch": e, "train/loss": math.nan, "valid/acc": math.nan} for e in (1, 2)]
    figures = plots.figures_for_run(model, rows)
    assert "training/curves" not in figures and "delays/histogram" in figures
    assert "no training curves: the history has none of the metrics plotted" in caplog.text


def test_plot_command_refuses_an_output_folder_it_cannot_write(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker, blocker / "figures"):
        assert plot_cli.main([str(run_dir), "--no-data", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"cannot write the figures into {out}" in err and "--out" in err
    # a figure that cannot be saved (its name taken by a folder) is an error once the others are written
    out = tmp_path / "figures"
    (out / "delays_histogram.png").mkdir(parents=True)
    assert plot_cli.main([str(run_dir), "--no-data", "--out", str(out), "--dpi", "20"]) == 1
    assert "1 of " in capsys.readouterr().err and (out / "training_curves.png").is_file()


def test_plot_command_names_a_checkpoint_of_another_network(run_dir, tmp_path, capsys):
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    payload["config"]["model"]["n_hidden"] = 5  # the weights are of 64 hidden neurons
    bad = tmp_path / "other.pt"
    torch.save(payload, bad)
    assert plot_cli.main([str(bad), "--no-data", "--out", str(tmp_path / "figures")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "cannot rebuild the network" in err and "size mismatch" in err


def test_plot_command_refuses_a_bad_device_or_dpi_with_a_usage_error(run_dir, capsys):
    """An unusable ``--device`` or a dpi <= 0 is a one-line usage error naming the option (exit 2),
    not a traceback from torch or a warning per figure."""
    for option, value in (("--device", "nodevice"), ("--device", "cuda:99"), ("--dpi", "0")):
        with pytest.raises(SystemExit) as exit_:
            plot_cli.main([str(run_dir), "--no-data", option, value])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}: " in err and "Traceback" not in err


def test_plot_command_refuses_a_sample_beyond_the_test_set(capsys):
    config = {
        "dataset": {
            "_target_": "snn_delays.data.synthetic.make_synthetic",
            "n_train": 8,
            "n_valid": 0,
            "n_test": 4,
        }
    }
    assert plot_cli.raster_sample(config, 3) is not None and plot_cli.raster_sample(config, -4) is not None
    assert plot_cli.raster_sample(config, 4) is None  # not sample 0 again, wrapped round
    assert (
        "--sample 4 is out of range: the run's test split has 4 samples (0 to 3)" in capsys.readouterr().err
    )


def test_plot_command_expands_a_tilde_in_out(run_dir, tmp_path, monkeypatch):
    written: dict = {}

    def fake_log_figures(logger, figures, step, out_dir, dpi):
        written.update(out=out_dir)
        return [plots.figure_path(out_dir, name) for name in figures]

    monkeypatch.setattr(plot_cli, "log_figures", fake_log_figures)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert plot_cli.main([str(run_dir), "--no-data", "--out", "~/figs"]) == 0  # as from --out=~/figs
    assert written["out"] == tmp_path / "figs" and not (tmp_path / "~").exists()


def test_spike_raster_draws_each_layers_spikes_and_the_membrane_in_ms(model):
    """Each hidden panel draws its own layer's spikes in the middle of their 10 ms bins (neuron on
    the y axis), titled with that layer's count and rate in Hz per neuron; the input panel spans
    the input's duration in ms; the output panel draws each class's membrane potential in the
    middle of its bins."""
    import re

    dt = 10.0
    torch.manual_seed(1)
    x = (torch.rand(12, 6) < 0.3).float() * 3
    with torch.no_grad():
        u, spikes = model(x[:, None], return_spikes=True)
    fig = plots.spike_raster(model, x)
    assert fig.axes[0].images[0].get_extent() == pytest.approx([0, 12 * dt, -0.5, 5.5])
    assert len(fig.axes) == len(spikes) + 2
    for ax, s in zip(fig.axes[1:-1], spikes, strict=True):
        s = s[:, 0].numpy()
        t, neuron = np.nonzero(s)
        assert t.size > 0, "a panel with spikes to place"
        np.testing.assert_allclose(ax.collections[0].get_offsets(), np.column_stack([(t + 0.5) * dt, neuron]))
        count, rate = re.search(r": (\d+) spikes, ([0-9.]+) Hz per neuron$", ax.get_title()).groups()
        seconds = s.shape[0] * dt / 1000
        assert int(count) == s.sum() and float(rate) == pytest.approx(
            s.sum() / s.shape[1] / seconds, abs=0.05
        )
    lines = fig.axes[-1].get_lines()
    assert len(lines) == u.shape[2]
    for c, line in enumerate(lines):
        np.testing.assert_allclose(line.get_xdata(), (np.arange(u.shape[0]) + 0.5) * dt)
        np.testing.assert_allclose(line.get_ydata(), u[:, 0, c].numpy())


def test_weight_vs_delay_puts_each_synapse_at_its_delay_in_ms(model):
    """Every synapse of a small layer is a point: its weight at its rounded delay in ms (dt = 10
    ms), spread by at most 0.3 step."""
    fig = plots.weight_vs_delay(model)
    for ax, layer in zip(fig.axes, model.delay_layers(), strict=True):
        d, w = layer.delays().numpy().ravel(), layer.weight.detach().numpy().ravel()
        x, y = np.asarray(ax.collections[0].get_offsets()).T
        np.testing.assert_allclose(y, w)
        assert np.abs(x / 10.0 - d).max() <= 0.3 + 1e-9


def test_training_curves_draw_each_layers_spread_around_its_mean():
    """The mean delay panel: per layer, its mean and, dashed, its mean minus and plus its own std."""
    rows = history()
    for e, row in enumerate(rows):
        for i in range(N_LAYERS + 1):
            row[f"delay/mean_ms/layer{i}"] = 20.0 + 5 * i + e
            row[f"delay/std_ms/layer{i}"] = 1.0 + i
    fig = plots.training_curves(rows)
    (ax,) = [a for a in fig.axes if a.get_title().startswith("mean delay per layer")]
    lines = ax.get_lines()
    for i in range(N_LAYERS + 1):
        mean = np.array([r[f"delay/mean_ms/layer{i}"] for r in rows])
        mean_line, low, high = lines[3 * i : 3 * i + 3]
        np.testing.assert_allclose(mean_line.get_ydata(), mean)
        np.testing.assert_allclose(low.get_ydata(), mean - (1.0 + i))
        np.testing.assert_allclose(high.get_ydata(), mean + (1.0 + i))
        assert low.get_linestyle() == high.get_linestyle() == "--"


def test_plot_command_draws_the_sample_it_is_given_at_its_dpi(run_dir, tmp_path, monkeypatch):
    """``--sample 1 --dpi 37``: the raster draws test sample 1 and names its label; the PNGs are
    written at 37 dpi."""
    from snn_delays.checkpoints import build_data

    written: dict = {}

    def fake_log_figures(logger, figures, step, out_dir, dpi):
        raster = figures["spikes/raster"]
        written.update(dpi=dpi, title=raster.axes[-1].get_title(), x=raster.axes[0].images[0].get_array())
        return [plots.figure_path(out_dir, name) for name in figures]

    monkeypatch.setattr(plot_cli, "log_figures", fake_log_figures)
    assert plot_cli.main([str(run_dir), "--out", str(tmp_path), "--dpi", "37", "--sample", "1"]) == 0
    config = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)["config"]
    test = build_data(config).test
    length, label = int(test.lengths[1]), int(test.y[1])
    assert written["dpi"] == 37
    np.testing.assert_array_equal(np.asarray(written["x"]), test.x[1, :length].float().numpy().T)
    assert f"label {build_data(config).class_names[label]})" in written["title"]


def test_training_curves_mark_the_first_of_tied_best_epochs():
    """The trainer keeps best.pt at the first epoch reaching the best validation accuracy (a later
    epoch that only ties it does not replace it): the dotted line marks that epoch."""
    rows = history()
    for row, acc in zip(rows, (0.5, 0.7, 0.7), strict=True):
        row["valid/acc"] = acc
    fig = plots.training_curves(rows)
    assert "epoch 2, best on validation" in fig._suptitle.get_text()
    assert all(ax.get_lines()[-1].get_xdata()[0] == 2 for ax in fig.axes)
