r"""Leaky integrate-and-fire neurons (spikingjelly), time-major ``(T, B, N)``.

With ``decay_input=False``, hard reset to 0 and a detached reset (spikingjelly ``LIFNode``):

    v[t] = v[t-1] - v[t-1] / tau + I[t],     s[t] = H(v[t] - 1),     v[t] <- 0 where s[t] = 1

``tau`` is in time steps. The surrogate gradient is ATan with ``alpha``:
``ds/dv = (alpha/2) / (1 + (pi/2 * alpha * (v - 1))^2)``. The readout is the same neuron with
an infinite threshold: it never spikes and its membrane potential is the network's output.
``neuron=plif`` learns ``tau`` (spikingjelly ``ParametricLIFNode``).

Implementation (``impl``, default from the environment variable ``SNN_DELAYS_NEURON_IMPL``,
else ``auto``): ``auto`` runs ``lif`` on float32 tensors through fused kernels that keep one
tensor (the pre-reset membrane) for the backward: on the CPU the C kernel of
:mod:`snn_delays.fast_neurons` (its torch loop without a compiler), on CUDA the Triton kernels
of :mod:`snn_delays.triton_neurons` where Triton imports (spikes equal to spikingjelly's,
gradients to float32 rounding; on an H200 as fast as spikingjelly's own kernels inside a
CUDA graph and ~60 MiB less peak memory on the SHD network). Everything else (PLIF, other
dtypes, CUDA without Triton) runs spikingjelly, which picks its implementation from the
tensor's device; ``spikingjelly`` forces spikingjelly everywhere (the published code path);
``triton`` forces the Triton kernels (an error where they cannot run). State is reset at the
start of every call, so nothing leaks between batches.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

# spikingjelly probes for Triton at import and torch warns once per kernel where it is absent
# (any CPU-only install): the CPU path does not need it, so keep that out of every run's log.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)

from spikingjelly.activation_based import neuron, surrogate  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from snn_delays import fast_neurons  # noqa: E402

NEURONS = ("lif", "plif")
NEURON_IMPLS = ("auto", "spikingjelly", "triton")
READOUT_THRESHOLD = 1e9


class SpikingNeurons(nn.Module):
    """A population of LIF (or PLIF) neurons, multi-step. ``readout=True``: membrane out."""

    def __init__(
        self,
        tau: float,
        kind: str = "lif",
        alpha: float = 5.0,
        readout: bool = False,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        impl = impl or os.environ.get("SNN_DELAYS_NEURON_IMPL") or "auto"
        if impl not in NEURON_IMPLS:
            raise ValueError(f"neuron implementation must be one of {NEURON_IMPLS}, got {impl!r}")
        if kind not in NEURONS:
            raise ValueError(f"model.neuron must be one of {NEURONS}, got {kind!r}")
        if impl == "triton" and kind != "lif":
            raise ValueError(f"SNN_DELAYS_NEURON_IMPL=triton runs the lif neuron only, got {kind!r}")
        tau = float(tau)  # an int from a config override is fine (spikingjelly asserts a float)
        if not tau > 1.0:
            raise ValueError(f"{kind} needs tau > 1 (time steps; its decay is 1/tau), got {tau}")
        # spikingjelly's GPU kernels refuse an infinite threshold; as in the published code, a
        # threshold no membrane reaches stands for it.
        threshold = READOUT_THRESHOLD if readout else 1.0
        common = dict(
            decay_input=False,
            v_threshold=threshold,
            v_reset=0.0,
            surrogate_function=surrogate.ATan(alpha=alpha),
            detach_reset=True,
            step_mode="m",
            store_v_seq=readout,
        )
        if kind == "lif":
            self.node = neuron.LIFNode(tau=tau, **common)
        else:
            self.node = neuron.ParametricLIFNode(init_tau=tau, **common)
        self.readout, self.impl, self.alpha, self.threshold = readout, impl, alpha, threshold

    def kernels(self, current: Tensor) -> str:
        """Which implementation runs on ``current``: ``c`` or ``torch`` (the fused CPU LIF, with
        or without its compiled kernel), ``triton``, or ``spikingjelly``."""
        auto_lif = self.impl == "auto" and isinstance(self.node, neuron.LIFNode)
        if auto_lif and fast_neurons.usable(current):
            return "c" if fast_neurons.c_kernels_available() else "torch"
        if self.impl == "triton" or (auto_lif and triton_lif_usable(current)):
            return "triton"
        return "spikingjelly"

    def forward(self, current: Tensor) -> Tensor:
        kernels = self.kernels(current)
        if kernels in ("c", "torch"):
            return fast_neurons.lif_multi_step(
                current,
                self.node.tau,
                self.threshold,
                self.alpha,
                return_v=self.readout,
                use_c=kernels == "c",
            )
        if kernels == "triton":
            from snn_delays import triton_neurons  # triton is optional: imported on first use

            return triton_neurons.lif_multi_step(
                current, self.node.tau, self.threshold, self.alpha, return_v=self.readout
            )
        self.node.reset()
        out = self.node(current.contiguous())
        if self.readout:
            out = self.node.v_seq
        self.node.reset()  # drop the stored state: no tensors kept between calls
        return out

    @property
    def tau(self) -> float:
        if isinstance(self.node, neuron.ParametricLIFNode):
            return float(1.0 / self.node.w.detach().sigmoid())
        return float(self.node.tau)


@functools.cache
def triton_available() -> bool:
    """Triton imports (it ships with CUDA builds of torch on Linux; absent on most CPU installs)."""
    try:
        from snn_delays import triton_neurons  # noqa: F401
    except ImportError:
        return False
    except Exception as err:  # noqa: BLE001 - a broken install: spikingjelly's LIF still runs
        logging.getLogger(__name__).warning(
            "Triton LIF unavailable (%r): spikingjelly's LIF runs instead", err
        )
        return False
    return True


def triton_lif_usable(x: Tensor) -> bool:
    """``auto`` runs the Triton LIF on ``x``: a float32 CUDA tensor, Triton importable."""
    return x.device.type == "cuda" and x.dtype == torch.float32 and triton_available()


def lif_reference(current: Tensor, tau: float, threshold: float = 1.0) -> tuple[Tensor, Tensor]:
    """Step-by-step LIF of the module docstring, for tests: returns (spikes, membrane)."""
    v = torch.zeros_like(current[0])
    spikes, membrane = [], []
    for i_t in current:
        v = v - v / tau + i_t
        membrane.append(v)
        s = (v >= threshold).to(current.dtype)
        spikes.append(s)
        v = v * (1 - s)
    return torch.stack(spikes), torch.stack(membrane)
