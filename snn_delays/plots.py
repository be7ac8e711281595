r"""Figures of a delay SNN: where the delays went, what the kernels look like, how it trained.

Every function builds a new :class:`matplotlib.figure.Figure` without pyplot (no global state,
nothing to close, safe on a headless node under any backend) and returns it. Times and delays
are in ms: a synapse at position ``p`` of a layer with kernel size ``K`` delays by
``d = K//2 - p`` steps, ``d * dt_ms`` ms, and the evaluated network uses ``round(p)``
(:mod:`snn_delays.delays`). "Layer ``i``" is the ``i``-th delay layer of the model: input ->
hidden 1, ..., hidden L -> output.

For the trainer: :func:`figures_for_run` builds every figure of a run, :func:`log_figures`
saves them as PNGs and hands them to the logger, :func:`log_epoch_figures` does both and never
raises. :class:`PositionTrace` records, once per epoch, where a fixed random subset of synapses
sits, for :func:`position_figure`.
"""

from __future__ import annotations

import inspect
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from snn_delays.delays import NORM_EPS, gaussian_kernel

log = logging.getLogger("snn_delays")
FIGURE_DPI = 110  # the training run's figures, in figures/ and in W&B
PANEL = (4.3, 3.1)  # inches per panel
DELAY_COLOR, MEAN_COLOR = "#3b6ea5", "#c0392b"


# --- what the figures read from a model ---------------------------------------------------
@dataclass(frozen=True)
class LayerView:
    """The synapses of one delay layer as numpy arrays ``(out, in)``."""

    name: str
    weight: np.ndarray
    positions: np.ndarray
    delays: np.ndarray  # integer delays in steps of the evaluated network
    kernel_size: int
    sigma: float
    dt_ms: float
    learned: bool = True

    @property
    def delays_ms(self) -> np.ndarray:
        return self.delays * self.dt_ms

    @property
    def max_delay_ms(self) -> float:
        return (self.kernel_size - 1) * self.dt_ms


def layer_names(n_layers: int) -> list[str]:
    """``input → hidden 1``, ..., ``hidden L → output`` for ``n_layers`` synaptic layers."""
    if n_layers == 0:
        return []
    ends = ["input"] + [f"hidden {i}" for i in range(1, n_layers)] + ["output"]
    return [f"{a} → {b}" for a, b in zip(ends[:-1], ends[1:], strict=True)]


def layer_views(model: nn.Module) -> list[LayerView]:
    layers = model.delay_layers()
    views = []
    for name, layer in zip(layer_names(len(layers)), layers, strict=True):
        views.append(
            LayerView(
                name,
                layer.weight.detach().float().cpu().numpy(),
                layer.positions.detach().float().cpu().numpy(),
                layer.delays().cpu().numpy(),
                layer.kernel_size,
                layer.sigma,
                float(model.dt_ms),
                bool(layer.dcls.P.requires_grad),
            )
        )
    return views


def _views(model_or_layers: nn.Module | Sequence[LayerView]) -> list[LayerView]:
    views = layer_views(model_or_layers) if isinstance(model_or_layers, nn.Module) else list(model_or_layers)
    if not views:
        raise ValueError("the model has no delay layers (model.delays=none): there are no delays to plot")
    return views


def delay_values_ms(model: nn.Module) -> dict[str, np.ndarray]:
    """The raw integer delays in ms per layer, for ``logger.log_histogram``."""
    return {f"delay/hist_ms/layer{i}": v.delays_ms.ravel() for i, v in enumerate(layer_views(model))}


def _grid(n: int, title: str, ncols: int = 3, panel: tuple[float, float] = PANEL) -> tuple[Figure, list]:
    ncols = min(n, ncols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows + 0.4), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    fig.suptitle(title, fontsize="large")
    return fig, axes[:n]


def _epoch_axis(ax: Any, epochs: np.ndarray) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(np.unique(epochs)) == 1:  # one point: an integer range around it, not ±0.05 epochs
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    ax.set_xlabel("epoch")


def _delay_axis(ax: Any, view: LayerView) -> None:
    half = view.dt_ms / 2
    ax.set_xlim(-half, view.max_delay_ms + half)
    ax.set_xlabel("delay (ms)")


# --- delays -----------------------------------------------------------------------------
def delay_histogram(model_or_layers: nn.Module | Sequence[LayerView]) -> Figure:
    """Per layer, how many synapses have each (rounded) delay."""
    views = _views(model_or_layers)
    kind = "Learned" if views[0].learned else "Fixed random"
    fig, axes = _grid(len(views), f"{kind} delays per layer (rounded, as evaluated)")
    for ax, v in zip(axes, views, strict=True):
        edges = (np.arange(v.kernel_size + 1) - 0.5) * v.dt_ms
        d = v.delays_ms.ravel()
        ax.hist(d, bins=edges, color=DELAY_COLOR, edgecolor="white", linewidth=0.5)
        ax.axvline(d.mean(), color=MEAN_COLOR, ls="--", lw=1.5, label=f"mean {d.mean():.0f} ms")
        _delay_axis(ax, v)
        ax.set_ylabel("synapses")
        ax.set_title(f"{v.name}: {d.size} synapses", fontsize="medium")
        ax.legend(loc="upper right", fontsize="small", framealpha=0.85)
    return fig


def weight_vs_delay(
    model_or_layers: nn.Module | Sequence[LayerView], max_points: int = 20000, seed: int = 0
) -> Figure:
    """Per layer, every synapse's weight against its delay (a seeded subsample of large layers).

    Delays are integers, so points are spread by up to ±0.3 step horizontally to show density;
    the line is the mean weight of the synapses at each delay.
    """
    views = _views(model_or_layers)
    fig, axes = _grid(len(views), "Weight against delay per layer")
    rng = np.random.default_rng(seed)
    for ax, v in zip(axes, views, strict=True):
        d, w = v.delays.ravel(), v.weight.ravel()
        keep = rng.choice(d.size, max_points, replace=False) if d.size > max_points else slice(None)
        jitter = rng.uniform(-0.3, 0.3, d[keep].size)
        n = jitter.size  # fewer points: bigger and more opaque, so small layers stay visible
        ax.scatter(
            (d[keep] + jitter) * v.dt_ms,
            w[keep],
            s=float(np.clip(3e4 / n, 3, 14)),
            alpha=float(np.clip(2e3 / n, 0.15, 0.7)),
            color=DELAY_COLOR,
            lw=0,
            rasterized=True,
        )
        steps = np.unique(d)
        means = np.array([w[d == s].mean() for s in steps])
        ax.plot(steps * v.dt_ms, means, color=MEAN_COLOR, lw=1.5, marker=".", label="mean weight")
        ax.axhline(0, color="0.5", lw=0.6)
        _delay_axis(ax, v)
        ax.set_ylabel("weight")
        shown = "" if d.size <= max_points else f", {max_points} of {d.size} shown"
        ax.set_title(f"{v.name}{shown}", fontsize="medium")
        ax.legend(loc="upper right", fontsize="small", framealpha=0.85)
    return fig


def kernel_figure(
    model_or_layers: nn.Module | Sequence[LayerView],
    layer: int = 0,
    neurons: Sequence[int] | None = None,
    n_neurons: int = 3,
) -> Figure:
    """Dense kernels of a few postsynaptic neurons of one layer, presynaptic neuron by delay.

    Left: the Gaussian (DCLS) kernel at the current sigma, the one training uses. Right: the
    rounded kernel the evaluated network uses, one weight per synapse. ``neurons`` defaults to
    ``n_neurons`` evenly spaced indices, the same ones every epoch.
    """
    v = _views(model_or_layers)[layer]
    n_out, n_in = v.weight.shape
    if neurons is None:
        neurons = np.unique(np.linspace(0, n_out - 1, min(n_neurons, n_out)).round().astype(int))
    neurons = [int(o) for o in neurons]
    k = v.kernel_size
    gauss = gaussian_kernel(
        torch.from_numpy(v.weight[neurons]), torch.from_numpy(v.positions[neurons]), v.sigma, k
    ).numpy()[..., ::-1]  # tap n delays by K-1-n steps: index by delay
    rounded = np.zeros_like(gauss)
    rows = np.arange(n_in)
    for j, o in enumerate(neurons):
        rounded[j, rows, v.delays[o]] = v.weight[o] / (1 + NORM_EPS)
    fig = Figure(figsize=(9.5, 2.3 * len(neurons) + 0.6), layout="constrained")
    axes = fig.subplots(len(neurons), 2, squeeze=False, sharex=True, sharey=True)
    fig.suptitle(f"Kernels of {v.name} (layer {layer}), postsynaptic neurons {neurons}")
    extent = (-v.dt_ms / 2, v.max_delay_ms + v.dt_ms / 2, -0.5, n_in - 0.5)
    for j, o in enumerate(neurons):
        for ax, kern, what in (
            (axes[j, 0], gauss[j], f"Gaussian, σ = {v.sigma:.2f} steps"),
            (axes[j, 1], rounded[j], "rounded (evaluated)"),
        ):
            lim = float(np.abs(kern).max()) or 1.0
            im = ax.imshow(
                kern,
                aspect="auto",
                origin="lower",
                extent=extent,
                cmap="RdBu_r",
                vmin=-lim,
                vmax=lim,
                # nearest when zoomed in; when a panel has fewer pixel rows than presynaptic
                # neurons (512 at the published sizes), filtered rather than nearest, which would
                # drop most rows and the synapses in them. Filtered in colour, not in weight,
                # where a lone synapse averaged with its zero neighbours fades to white. (Matplotlib
                # 3.10 renamed this "auto" and keeps the name; "auto" is refused before 3.10.)
                interpolation="antialiased",
                interpolation_stage="rgba",
            )
            fig.colorbar(im, ax=ax, label="weight", fraction=0.05, pad=0.02)
            ax.set_title(f"neuron {o}: {what}", fontsize="medium")
            ax.set_ylabel("presynaptic neuron")
        for ax in axes[j]:
            ax.label_outer()
    for ax in axes[-1]:
        ax.set_xlabel("delay (ms)")
    return fig


# --- positions over training --------------------------------------------------------------
class PositionTrace:
    """Where a fixed, seeded random subset of synapses sits, recorded once per epoch.

    Per layer it keeps the continuous delay ``(K//2 - p) * dt_ms`` (ms; rounding it gives the
    evaluated delay) of up to ``n_synapses`` synapses, and the mean over all synapses. Recording
    reads ~100 numbers per layer, so it is cheap enough for every epoch. Saved as ``.npz``.
    """

    def __init__(self, n_synapses: int = 100, seed: int = 0) -> None:
        self.n_synapses, self.seed = n_synapses, seed
        self.epochs: list[int] = []
        self.names: list[str] = []
        self.max_delay_ms: list[float] = []
        self.index: list[np.ndarray] = []  # per layer, flat indices into (out, in)
        self.delays: list[list[np.ndarray]] = []  # per layer, per epoch, (n,) ms
        self.means: list[list[float]] = []  # per layer, per epoch, ms

    def __len__(self) -> int:
        return len(self.epochs)

    @torch.no_grad()
    def record(self, model: nn.Module, epoch: int) -> None:
        """Record the model's positions after ``epoch`` epochs (0: before training).

        Recording an epoch at or before the last one recorded (a resumed run) drops the later ones.
        """
        layers = getattr(model, "module", model).delay_layers()
        if not layers:  # no delays (model.delays=none): nothing to trace
            return
        if not self.index:
            self._choose(layers, float(model.dt_ms))
        if len(layers) != len(self.index):
            raise ValueError(
                f"PositionTrace was started with {len(self.index)} delay layers, model has {len(layers)}"
            )
        while self.epochs and self.epochs[-1] >= epoch:
            self.epochs.pop()
            for per_layer in (*self.delays, *self.means):
                per_layer.pop()
        self.epochs.append(int(epoch))
        dt = float(model.dt_ms)
        for i, layer in enumerate(layers):
            pos = layer.positions.reshape(-1)
            chosen = pos[torch.as_tensor(self.index[i], device=pos.device)]
            half = layer.kernel_size // 2
            self.delays[i].append(((half - chosen.float().cpu().numpy()) * dt).astype(np.float32))
            self.means[i].append(float((half - pos.float().mean()) * dt))

    def _choose(self, layers: list[nn.Module], dt_ms: float) -> None:
        rng = np.random.default_rng(self.seed)
        self.names = layer_names(len(layers))
        self.max_delay_ms = [(layer.kernel_size - 1) * dt_ms for layer in layers]
        sizes = [layer.positions.numel() for layer in layers]
        self.index = [np.sort(rng.choice(n, min(n, self.n_synapses), replace=False)) for n in sizes]
        self.delays = [[] for _ in layers]
        self.means = [[] for _ in layers]

    def layer_delays(self, layer: int) -> np.ndarray:
        """``(epochs, synapses)`` delays in ms of the traced synapses of one layer."""
        return np.stack(self.delays[layer]) if self.epochs else np.zeros((0, len(self.index[layer])))

    def save(self, path: str | Path) -> None:
        """Write ``path`` (``.npz``) through a temporary file, so a killed job leaves no half file."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "epochs": np.asarray(self.epochs, dtype=np.int64),
            "names": np.asarray(self.names, dtype=str),
            "max_delay_ms": np.asarray(self.max_delay_ms, dtype=np.float64),
            "n_synapses": np.asarray(self.n_synapses),
            "seed": np.asarray(self.seed),
        }
        for i in range(len(self.index)):
            arrays[f"index_{i}"] = self.index[i]
            arrays[f"delays_ms_{i}"] = self.layer_delays(i)
            arrays[f"mean_ms_{i}"] = np.asarray(self.means[i], dtype=np.float64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> PositionTrace:
        with np.load(Path(path), allow_pickle=False) as z:
            trace = cls(int(z["n_synapses"]), int(z["seed"]))
            trace.epochs = [int(e) for e in z["epochs"]]
            trace.names = [str(n) for n in z["names"]]
            trace.max_delay_ms = [float(m) for m in z["max_delay_ms"]]
            for i in range(len(trace.names)):
                trace.index.append(z[f"index_{i}"])
                trace.delays.append(list(z[f"delays_ms_{i}"]))
                trace.means.append([float(m) for m in z[f"mean_ms_{i}"]])
        return trace


def position_figure(trace: PositionTrace) -> Figure:
    """Per layer, the delay of each traced synapse (thin) and the layer mean (thick) by epoch."""
    if not trace.index:
        raise ValueError("the position trace is empty: record(model, epoch) at least once")
    fig, axes = _grid(len(trace.index), "How the delays moved during training")
    epochs = np.asarray(trace.epochs)
    marker = "o" if len(epochs) == 1 else None
    for i, ax in enumerate(axes):
        d = trace.layer_delays(i)
        ax.plot(epochs, d, color=DELAY_COLOR, lw=0.7, alpha=0.35, marker=marker, ms=2)
        ax.plot(epochs, trace.means[i], color=MEAN_COLOR, lw=2.2, marker=marker, label="mean of all synapses")
        ax.set_ylim(-0.02 * trace.max_delay_ms[i], 1.02 * trace.max_delay_ms[i])
        _epoch_axis(ax, epochs)
        ax.set_ylabel("delay (ms, unrounded)")
        ax.set_title(f"{trace.names[i]}: {d.shape[1]} random synapses", fontsize="medium")
        ax.legend(loc="upper right", fontsize="small", frameon=False)
    return fig


# --- activity ------------------------------------------------------------------------------
@torch.no_grad()
def spike_raster(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    label: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Input, every hidden layer's spikes and the output membrane for one sample ``x`` (T, C).

    The evaluated (integer-delay, no dropout) network runs on the sample; the model's train/eval
    mode is restored afterwards. Delays make each layer's output longer than its input; all
    panels share the time axis.
    """
    # on the host: the trainer's sample lives where its data does (the GPU), and the input panel
    # is drawn from numpy
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float().cpu()
    if x.dim() == 3:
        x = x[:, 0]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        u, spikes = model(x[:, None].to(device), return_spikes=True)
    finally:
        model.train(was_training)
    dt = float(model.dt_ms)
    u = u[:, 0].float().cpu().numpy()
    spikes = [s[:, 0].float().cpu().numpy() for s in spikes]
    n = 2 + len(spikes)
    fig = Figure(figsize=(10, 1.9 * n + 0.8), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, gridspec_kw={"height_ratios": [1.2] + [1.2] * len(spikes) + [1.0]})
    t_end = u.shape[0] * dt
    inp = x.numpy()
    axes[0].imshow(
        inp.T,
        aspect="auto",
        origin="lower",
        cmap="Greys",
        interpolation="nearest",
        extent=(0, inp.shape[0] * dt, -0.5, inp.shape[1] - 0.5),
    )
    if (inp >= 0).all() and (inp == np.round(inp)).all():  # spike counts (SHD, SSC, synthetic)
        what = f"total {inp.sum():.0f} (counts per {dt:g} ms bin)"
    else:  # analog features (GSC's log-mel dB): no spike count to sum
        what = f"analog values per {dt:g} ms bin, {inp.min():.3g} to {inp.max():.3g}"
    axes[0].set_title(f"input: {inp.shape[1]} channels, {what}", fontsize="medium")
    axes[0].set_ylabel("input channel")
    for i, (ax, s) in enumerate(zip(axes[1:-1], spikes, strict=True)):
        t, nrn = np.nonzero(s)
        tick = float(np.clip(120 / s.shape[1], 1.5, 8))  # marker height (points) ~ one neuron's row
        ax.scatter((t + 0.5) * dt, nrn, s=tick**2, marker="|", color="k", lw=1.2, rasterized=True)
        ax.set_ylim(-0.5, s.shape[1] - 0.5)
        rate = s.sum() / (s.shape[1] * s.shape[0] * dt / 1000)
        ax.set_title(f"hidden {i + 1}: {int(s.sum())} spikes, {rate:.1f} Hz per neuron", fontsize="medium")
        ax.set_ylabel("neuron")
    names = list(class_names) if class_names else [str(c) for c in range(u.shape[1])]
    pred = int(np.argmax(_softmax(u).sum(0)))
    times = (np.arange(u.shape[0]) + 0.5) * dt
    for c in range(u.shape[1]):
        strong = c in (pred, label)
        ax = axes[-1]
        ax.plot(
            times,
            u[:, c],
            lw=2 if strong else 0.7,
            alpha=1 if strong else 0.4,
            label=names[c] if strong or u.shape[1] <= 10 else None,
        )
    truth = f", label {names[label]}" if label is not None else ""
    axes[-1].set_title(f"output membrane potential (prediction {names[pred]}{truth})", fontsize="medium")
    axes[-1].set_ylabel("u")
    axes[-1].legend(loc="upper left", fontsize="x-small", ncol=min(u.shape[1], 10), frameon=False)
    axes[-1].set_xlabel("time (ms)")
    axes[-1].set_xlim(0, t_end)
    fig.suptitle("Activity for one sample (evaluated network)")
    return fig


def _softmax(u: np.ndarray) -> np.ndarray:
    e = np.exp(u - u.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- training curves --------------------------------------------------------------------
def training_curves(history: Sequence[Mapping[str, float]]) -> Figure:
    """Loss, accuracy, sigma, learning rates and mean delays by epoch (the panels with data)."""
    if not history:
        raise ValueError("the history is empty: nothing to plot")
    epochs = np.array([row.get("epoch", i + 1) for i, row in enumerate(history)], dtype=float)

    def series(key: str) -> np.ndarray | None:
        values = np.array([float(row.get(key, math.nan)) for row in history])
        return None if np.all(np.isnan(values)) else values

    keys = sorted({k for row in history for k in row})
    layers = sorted({int(k.rsplit("layer", 1)[1]) for k in keys if k.startswith("delay/mean_ms/layer")})
    panels = [
        ("loss", "loss", [(f"{s}/loss", s) for s in ("train", "valid", "test")], False),
        ("accuracy", "accuracy (%)", [(f"{s}/acc", s) for s in ("train", "valid", "test")], False),
        ("sigma (Gaussian kernel width)", "σ (steps)", [("sigma", "σ")], False),
        (
            "learning rates",
            "learning rate",
            [(k, k.split("/", 1)[1]) for k in keys if k.startswith("lr/")],
            True,
        ),
        (
            "mean delay per layer (dashed: ± std)",
            "delay (ms)",
            [(f"delay/mean_ms/layer{i}", f"layer {i}") for i in layers],
            False,
        ),
    ]
    panels = [p for p in panels if any(series(k) is not None for k, _ in p[2])]
    if not panels:
        raise ValueError(f"the history has none of the metrics plotted (its keys: {keys})")
    fig, axes = _grid(len(panels), "Training curves")
    best, chosen_on = _best_epoch(history, epochs)
    for ax, (title, ylabel, lines, logy) in zip(axes, panels, strict=True):
        for key, name in lines:
            y = series(key)
            if y is None:
                continue
            y = y * 100 if key.endswith("/acc") else y
            line = ax.plot(epochs, y, marker="." if len(epochs) < 30 else None, label=name)[0]
            std = series(key.replace("/mean_ms/", "/std_ms/")) if "/mean_ms/" in key else None
            if std is not None:  # the spread as dashed lines: bands of several layers would hide each other
                ax.plot(epochs, y - std, epochs, y + std, color=line.get_color(), ls="--", lw=0.8)
        if best is not None:
            ax.axvline(best, color="0.4", ls=":", lw=1)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize="medium")
        _epoch_axis(ax, epochs)
        ax.set_ylabel(ylabel)
        if len(lines) > 1:
            ax.legend(fontsize="small", frameon=False)
    if best is not None:
        fig.suptitle(f"Training curves (dotted: epoch {best:g}, best on {chosen_on})")
    return fig


def _best_epoch(history: Sequence[Mapping[str, float]], epochs: np.ndarray) -> tuple[float | None, str]:
    """The epoch the trainer keeps as best.pt and the split it was chosen on: validation, or the
    test set when the run had no validation split (its ``valid/acc`` all NaN)."""
    for key, split in (("valid/acc", "validation"), ("test/acc", "test")):
        acc = np.array([float(row.get(key, math.nan)) for row in history])
        if not np.all(np.isnan(acc)):
            return float(epochs[int(np.nanargmax(acc))]), split
    return None, ""


# --- a run's figures, for the trainer and the command line -------------------------------
def figures_for_run(
    model: nn.Module,
    history: Sequence[Mapping[str, float]] | None = None,
    trace: PositionTrace | None = None,
    sample_x: torch.Tensor | np.ndarray | None = None,
    sample_label: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Figure]:
    """Every figure that applies to this run, by logger key (``delays/histogram``, ...)."""
    figures: dict[str, Figure] = {}
    if history:
        try:
            figures["training/curves"] = training_curves(history)
        except ValueError as err:  # e.g. a metrics.csv of NaN only: the other figures are still drawn
            log.warning("no training curves: %s", err)
    views = layer_views(model)
    if views:
        figures["delays/histogram"] = delay_histogram(views)
        figures["delays/weight_vs_delay"] = weight_vs_delay(views)
        for i in range(len(views)):
            figures[f"delays/kernels_layer{i}"] = kernel_figure(views, layer=i)
    if trace is not None and len(trace) > 0 and trace.index:
        figures["delays/positions"] = position_figure(trace)
    if sample_x is not None:
        figures["spikes/raster"] = spike_raster(model, sample_x, sample_label, class_names)
    return figures


def figure_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name.replace('/', '_')}.png"


def png_bytes(fig: Figure, dpi: int = FIGURE_DPI) -> bytes:
    """``fig`` rendered as a PNG file's bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _takes_png(logger: Any) -> bool:
    """The logger's ``log_figure`` takes the rendered ``png`` (ours do; a logger of one's own
    written for the older interface is called without it and renders the figure itself)."""
    params = inspect.signature(logger.log_figure).parameters.values()
    return any(p.name == "png" or p.kind is p.VAR_KEYWORD for p in params)


def log_figures(
    logger: Any,
    figures: Mapping[str, Figure],
    step: int,
    out_dir: str | Path | None = None,
    histograms: Mapping[str, np.ndarray] | None = None,
    dpi: int = FIGURE_DPI,
) -> list[Path]:
    """Save each figure as ``out_dir/<name>.png`` (overwritten: the latest), log it, then close it.
    A figure that fails to save or log is a warning; the others are still saved and logged.

    ``histograms`` (name -> raw values, e.g. :func:`delay_values_ms`) go to ``logger.log_histogram``.
    ``logger`` may be ``None`` (only save). Returns the PNG paths.
    """
    paths = []
    pass_png = logger is not None and _takes_png(logger)
    for name, fig in figures.items():
        try:
            # rendered once, for the file and the logger (half a figure epoch); not at all where
            # neither reads it (no folder, and a logger that draws the figure itself)
            png = png_bytes(fig, dpi) if out_dir is not None or pass_png else None
            if out_dir is not None:
                path = figure_path(out_dir, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(png)
                paths.append(path)
            if logger is not None:
                logger.log_figure(name, fig, step, **({"png": png} if pass_png else {}))
        except Exception as err:  # noqa: BLE001 - one figure's failure does not cost the others
            log.warning("figure %s (epoch %d) failed: %s: %s", name, step, type(err).__name__, err)
        finally:
            fig.clear()  # pyplot never saw these figures: clearing frees them without global state
    if logger is not None:
        for name, values in (histograms or {}).items():
            logger.log_histogram(name, np.asarray(values), step)
    return paths


def log_epoch_figures(
    logger: Any,
    model: nn.Module,
    history: Sequence[Mapping[str, float]],
    step: int,
    run_dir: str | Path,
    trace: PositionTrace | None = None,
    sample_x: torch.Tensor | np.ndarray | None = None,
    sample_label: int | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """For ``on_epoch_end``: every figure into ``run_dir/figures`` and the logger.

    A plotting error is logged as a warning and never stops training.
    """
    try:
        figures = figures_for_run(model, history, trace, sample_x, sample_label, class_names)
        hist = delay_values_ms(model) if model.delay_layers() else None
        return log_figures(logger, figures, step, Path(run_dir) / "figures", hist)
    except Exception as err:  # noqa: BLE001 - a figure is never worth a lost training run
        log.warning("figures for epoch %d failed: %s: %s", step, type(err).__name__, err)
        return []
