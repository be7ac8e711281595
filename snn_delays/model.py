"""The feedforward delay SNN of the paper, time-major ``(T, B, C)``.

``L`` hidden blocks ``delay layer -> BatchNorm (over channels) -> LIF -> Dropout`` (one mask
per sample and neuron, shared over time), then a readout ``delay layer -> LIF`` with an
infinite threshold whose membrane potential ``u[t, b, c]`` is the output. Every delay layer
lengthens the sequence by ``(K-1)//2`` steps. ``delays="none"`` replaces the delay layers by
plain fully connected ones (the paper's no-delay baseline).

While training, a hidden block's BatchNorm and LIF run as one step wherever the fused LIF
kernels run (:mod:`snn_delays.bn_lif`: the same function, BatchNorm's input the only (T, B, C)
tensor kept for the backward), and the dropout outputs the next layer saves are kept as bytes
(:class:`SavedSpikes`). In evaluation on the CPU's C LIF kernel, BatchNorm's affine is folded
into the LIF (:func:`~snn_delays.bn_lif.batchnorm_lif_eval`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from snn_delays.bn_lif import batchnorm_lif, batchnorm_lif_eval, eval_fusable, fusable
from snn_delays.delays import DelayLayer, max_delay_steps
from snn_delays.neurons import SpikingNeurons

DELAY_MODES = ("learned", "fixed", "none")


class Dense(nn.Module):
    """A synaptic layer without delays: ``y[t] = W x[t]``, Kaiming-uniform (ReLU gain)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        nn.init.kaiming_uniform_(self.linear.weight, nonlinearity="relu")

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class TimeDropout(nn.Module):
    """Dropout with one mask per sample and channel, shared by every time step."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return self.masked(x)[0]

    def masked(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(x * mask, mask)``; ``(x, None)`` where nothing is dropped (evaluation, p = 0)."""
        if not self.training or self.p == 0.0:
            return x, None
        mask = torch.empty_like(x[0]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask, mask


class _PackedSpikes:
    def __init__(self, fired: Tensor, mask: Tensor) -> None:
        self.fired, self.mask = fired, mask


class SavedSpikes:
    """Saved-tensor hooks: a dropout output of binary spikes ``x = s * mask`` that a later
    layer saves for its backward (the next delay layer's input) is kept as ``x != 0`` (one
    byte an element) and the (B, C) mask, which dropout keeps anyway, instead of float32; the
    backward gets ``where(x != 0, mask, 0)``, the same bits. On the SHD network at batch 256
    those tensors shrink from 59 to 15 MiB (the step's counted peak from 284 to 257 MiB, with
    the outputs no longer listed through the forward; see experiments/FAST_DELAYS.md). Every
    other saved tensor passes through unchanged. Two elementwise passes per layer, the same on
    every device (on the CPU within the timing noise of a step)."""

    def __init__(self) -> None:
        self.known: list[tuple[weakref.ref, Tensor]] = []

    def add(self, out: Tensor, mask: Tensor) -> None:
        self.known.append((weakref.ref(out), mask))

    def pack(self, t: Tensor) -> Tensor | _PackedSpikes:
        for ref, mask in self.known:
            out = ref()
            if out is not None and _same_view(t, out):
                return _PackedSpikes(t != 0, mask)
        return t

    @staticmethod
    def unpack(packed: Tensor | _PackedSpikes) -> Tensor:
        if isinstance(packed, _PackedSpikes):
            return torch.where(packed.fired, packed.mask, 0.0)
        return packed


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


class TimeBatchNorm(nn.BatchNorm1d):
    """BatchNorm over channels, statistics over time and batch: (T, B, C) in and out."""

    def forward(self, x: Tensor) -> Tensor:
        t, b, c = x.shape
        return super().forward(x.reshape(t * b, c)).reshape(t, b, c)


class DelaySNN(nn.Module):
    """Feedforward LIF network with learnable (or fixed, or no) synaptic delays.

    The kernel size K is ``max_delay_ms / dt_ms`` made odd (``kernel_size`` overrides it);
    ``dt_ms`` comes from the data at build time.
    """

    def __init__(
        self,
        n_inputs: int,
        n_classes: int,
        n_hidden: int = 256,
        n_layers: int = 2,
        max_delay_ms: float = 250.0,
        dt_ms: float = 10.0,
        kernel_size: int | None = None,
        tau: float = 1.005,
        dropout: float = 0.4,
        delays: str = "learned",
        delay_backend: str = "fast",
        neuron: str = "lif",
        surrogate_alpha: float = 5.0,
        sigma_init: float | None = None,
        round_eval: bool = True,
    ) -> None:
        super().__init__()
        if delays not in DELAY_MODES:
            raise ValueError(f"model.delays must be one of {DELAY_MODES}, got {delays!r}")
        for key, value in (("n_layers", n_layers), ("n_hidden", n_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"model.{key} must be a whole number >= 1 (L hidden layers of N neurons, then the "
                    f"readout), got {value!r}"
                )
        for key, value in (("n_inputs", n_inputs), ("n_classes", n_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{key} (from the data) must be a whole number >= 1, got {value!r}")
        n_inputs, n_classes = int(n_inputs), int(n_classes)
        if not (isinstance(dt_ms, numbers.Real) and math.isfinite(dt_ms) and dt_ms > 0):
            raise ValueError(f"dt_ms (the data's time step in ms) must be a number > 0, got {dt_ms!r}")
        if kernel_size is None and not (isinstance(max_delay_ms, numbers.Real) and max_delay_ms >= 0):
            raise ValueError(f"model.max_delay_ms must be a number >= 0, got {max_delay_ms!r}")
        if kernel_size is None:
            kernel_size = max_delay_steps(max_delay_ms, dt_ms)
        self.delays_mode, self.dt_ms = delays, dt_ms
        self.kernel_size = kernel_size if delays != "none" else 1

        def synapses(n_in: int, n_out: int) -> nn.Module:
            if delays == "none":
                return Dense(n_in, n_out)
            return DelayLayer(
                n_in,
                n_out,
                kernel_size,
                learn_positions=delays == "learned",
                backend=delay_backend,
                sigma_init=sigma_init,
                round_eval=round_eval,
            )

        sizes = [n_inputs] + [n_hidden] * n_layers
        self.blocks = nn.ModuleList(
            nn.Sequential(
                synapses(n_in, n_out),
                TimeBatchNorm(n_out),
                SpikingNeurons(tau, neuron, surrogate_alpha),
                TimeDropout(dropout),
            )
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.readout = nn.Sequential(
            synapses(n_hidden, n_classes), SpikingNeurons(tau, neuron, surrogate_alpha, readout=True)
        )
        for later in [*self.blocks[1:], self.readout]:  # fed by a block's spikes
            if isinstance(later[0], DelayLayer):
                later[0].spikes_in = True

    compact_saved_spikes = True  # SavedSpikes while training (False: float32, for comparisons)
    # snn_delays.bn_lif while training and in CPU evaluation (False: two modules, for comparisons)
    fuse_batchnorm_lif = True

    def forward(self, x: Tensor, return_spikes: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``x`` (T, B, n_inputs) -> membrane ``u`` (T + (L+1)(K-1)//2, B, n_classes)."""
        if x.dim() != 3 or x.shape[-1] != self.n_inputs:
            if x.dim() == 2:
                hint = "one sample (T, C)? x.unsqueeze(1)"
            elif x.dim() == 3:
                hint = f"the last dimension holds the channels: {x.shape[-1]}, built for {self.n_inputs}"
            else:
                hint = "batch-first (B, T, C) is x.transpose(0, 1)"
            raise ValueError(
                f"DelaySNN takes time-major input (T, B, n_inputs={self.n_inputs}), "
                f"got shape {tuple(x.shape)} ({hint})"
            )
        spikes = []
        training = self.training and torch.is_grad_enabled()
        store = SavedSpikes() if self.compact_saved_spikes and training else None
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(store.pack, store.unpack)
            if store is not None
            else contextlib.nullcontext()
        )
        with hooks:
            for synapses, bn, neurons, dropout in self.blocks:
                x = synapses(x)
                if training and self.fuse_batchnorm_lif and fusable(bn, neurons, x):
                    x = batchnorm_lif(x, bn, neurons)
                elif self.fuse_batchnorm_lif and eval_fusable(bn, neurons, x):
                    x = batchnorm_lif_eval(x, bn, neurons)
                else:
                    x = bn(x)  # one statement each: the delay output dies before the LIF runs
                    x = neurons(x)
                x, mask = dropout.masked(x)  # binary spikes in
                if mask is not None and store is not None:
                    store.add(x, mask)
                if return_spikes:  # kept only when asked: the float outputs die with their layer
                    spikes.append(x)
            u = self.readout(x)
        return (u, spikes) if return_spikes else u

    # --- what the training loop and the plots need ------------------------------------
    def delay_layers(self) -> list[DelayLayer]:
        return [m for m in self.modules() if isinstance(m, DelayLayer)]

    def synapse_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (DelayLayer, Dense))]

    def delay_parameters(self) -> list[nn.Parameter]:
        """Positions (their own optimizer); empty unless delays are learned."""
        return [layer.dcls.P for layer in self.delay_layers() if layer.dcls.P.requires_grad]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Synaptic weights (weight decay applies to these only)."""
        return [
            layer.dcls.weight if isinstance(layer, DelayLayer) else layer.weight
            for layer in self.synapse_layers()
        ]

    def other_parameters(self) -> Iterator[nn.Parameter]:
        """BatchNorm affine parameters and PLIF time constants: trained, no weight decay."""
        taken = {id(p) for p in self.weight_parameters()} | {id(p) for p in self.delay_parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in taken)

    def set_sigma(self, value: float) -> None:
        for layer in self.delay_layers():
            layer.set_sigma(value)

    def clamp_positions(self) -> None:
        for layer in self.delay_layers():
            layer.clamp_positions()

    @property
    def n_inputs(self) -> int:
        first = self.blocks[0][0]
        return first.in_features if isinstance(first, DelayLayer) else first.linear.in_features

    @property
    def sigma(self) -> float | None:
        layers = self.delay_layers()
        return layers[0].sigma if layers else None
