r"""Synaptic delay layer: a temporal convolution with one learnable tap per synapse (DCLS).

Shapes are time-major throughout: ``x`` is ``(T, B, in)``, ``y`` is ``(T + (K-1)//2, B, out)``.

Every synapse ``(o, i)`` has a weight ``w[o,i]`` and a continuous position ``p[o,i]`` in
``[-(K//2), K//2]``. Its dense kernel, built by DCLS Gaussian interpolation, is

    k[o,i,n] = w[o,i] g(n - (p[o,i] + K//2)) / (sum_n g(n - (p[o,i] + K//2)) + 1e-7),
    g(z) = exp(-z^2 / (2 s^2)),   s = |sigma| + 0.27,

the input is zero-padded by ``K-1`` steps on the left and ``(K-1)//2`` on the right, and
cross-correlated with ``k``. A tap at index ``n`` delays by ``K-1-n`` steps, so a synapse at
position ``p`` delays by ``d = K//2 - p`` steps (K odd): every delay in ``0..K-1`` is reachable.

At evaluation positions are rounded and the kernel becomes the DCLS ``max`` (triangle)
interpolation with sigma 0: one weight at one integer delay per synapse,

    y[t, b, o] = sum_i w[o,i] / (1 + 1e-7) * x[t - d[o,i], b, i].

Two backends compute the same function from the same parameters (held by a ``dcls.Dcls1d``):
``dcls`` is the reference (the published code path) and ``fast`` the default
(:mod:`snn_delays.fast_delays`).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from DCLS.construct.modules import Dcls1d
from torch import Tensor, nn

from snn_delays import fast_delays
from snn_delays.fast_delays import NORM_EPS, gaussian_kernel, pad_time  # one copy of each formula

BACKENDS = ("fast", "dcls")


def integer_delays(pos: Tensor, kernel_size: int) -> Tensor:
    """Delay in steps, ``K//2 - round(p)``, of every synapse ``(out, in)`` at evaluation."""
    return (kernel_size // 2 - torch.round(pos.detach())).long()


class DelayLayer(nn.Module):
    """Learnable-delay synapses between ``in_features`` and ``out_features`` neurons.

    ``learn_positions=False`` keeps the random initial delays fixed (the paper's "fixed
    delays" variant): rounded to whole steps at initialisation, as the published code's
    ``round_pos``, and with ``sigma_init=None`` a sigma of 0, so that training runs the
    integer-delay network that is evaluated (to DCLS's floor of 0.27 steps, which leaks 1e-3 of
    a tap to each neighbour); sigma ``K // 2`` would blur every fixed delay over the kernel
    while it decays. ``round_eval`` evaluates the integer-delay network in ``eval()`` mode.
    ``spikes_in`` (set by :class:`snn_delays.model.DelaySNN` on every delay layer after the
    first): the input is spikes, which ``SNN_DELAYS_EVAL_FP16=1`` may multiply as float16 in
    CUDA's evaluation (:func:`snn_delays.fast_delays.eval_fp16`).
    """

    spikes_in = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        learn_positions: bool = True,
        backend: str = "fast",
        sigma_init: float | None = None,
        round_eval: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(kernel_size, numbers.Integral) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size (max delay in steps) must be odd and >= 1, got {kernel_size!r}")
        kernel_size = int(kernel_size)
        if backend not in BACKENDS:
            raise ValueError(f"model.delay_backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features, self.kernel_size = in_features, out_features, kernel_size
        self.backend, self.round_eval = backend, round_eval
        self.dcls = Dcls1d(
            in_features,
            out_features,
            kernel_count=1,
            dilated_kernel_size=kernel_size,
            bias=False,
            version="gauss",
        )
        lim = kernel_size // 2
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.dcls.weight, nonlinearity="relu")
            nn.init.uniform_(self.dcls.P, -lim, lim)
            if not learn_positions:
                self.dcls.P.round_()
            if sigma_init is None:
                sigma_init = lim if learn_positions else 0.0
            if not (isinstance(sigma_init, numbers.Real) and sigma_init >= 0):  # NaN too
                raise ValueError(f"model.sigma_init must be a number >= 0 (or null), got {sigma_init!r}")
            self.dcls.SIG.fill_(sigma_init)
        self.dcls.SIG.requires_grad_(False)  # sigma is scheduled, never learned
        self._sigma_key: tuple[int, int] | None = None  # (storage, version) of the cached value
        self._sigma_value = 0.0
        self.dcls.P.requires_grad_(learn_positions)

    # --- parameters seen as (out, in) matrices -------------------------------------------
    @property
    def weight(self) -> Tensor:
        return self.dcls.weight.squeeze(-1)

    @property
    def positions(self) -> Tensor:
        return self.dcls.P.squeeze(0).squeeze(-1)

    @property
    def sigma(self) -> float:
        """The layer's sigma as a Python float (the fast backend's one sigma for every synapse).

        Every forward needs it on the host (the kernel width, the tap count). On the CPU it is
        read each time. On another device it is read only when the parameter changed (its
        storage or version): reading it each time would synchronise with the GPU once per layer
        and batch. There, change it with :meth:`set_sigma`, ``load_state_dict`` or an in-place
        op on the parameter, not through ``.data`` (whose changes no version counter records).
        DCLS's ``SIG`` holds one value per synapse; the fast backend refuses unequal ones
        (``model.delay_backend=dcls`` computes those) and a NaN.
        """
        sig = self.dcls.SIG
        key = (sig.data_ptr(), sig._version)
        if sig.device.type == "cpu" or self._sigma_key != key:
            values = sig.detach()
            low, high = float(values.min()), float(values.max())
            if math.isnan(low) or math.isnan(high):
                raise ValueError(f"{self.extra_repr()}: sigma is NaN")
            if low != high:
                raise ValueError(
                    f"{self.extra_repr()}: sigma differs between synapses ({low:g} .. {high:g}); the fast "
                    "backend takes one sigma per layer (set_sigma sets one): use model.delay_backend=dcls"
                )
            self._sigma_value, self._sigma_key = low, key
        return self._sigma_value

    def set_sigma(self, value: float) -> None:
        with torch.no_grad():
            self.dcls.SIG.fill_(value)

    def clamp_positions(self) -> None:
        with torch.no_grad():
            lim = self.kernel_size // 2
            self.dcls.P.clamp_(-lim, lim)

    def delays(self) -> Tensor:
        """Integer delays in steps ``(out, in)`` of the evaluated network."""
        return integer_delays(self.positions, self.kernel_size)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch signature
        # Dcls1d caches index tensors on the device of its first call; drop them on moves.
        self.dcls.DCK.IDX = self.dcls.DCK.lim = None
        return super()._apply(fn, recurse)

    # --- forward ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_features:  # the C kernels would read out of bounds
            raise ValueError(
                f"DelayLayer({self.extra_repr()}) takes time-major input (T, B, {self.in_features}), "
                f"got shape {tuple(x.shape)}"
            )
        rounded = self.round_eval and not self.training
        if self.backend == "dcls":
            return self._forward_dcls(x, rounded)
        if rounded:
            return fast_delays.integer_delay_conv(
                x, self.weight / (1 + NORM_EPS), self.delays(), self.kernel_size, spikes_in=self.spikes_in
            )
        return fast_delays.delay_conv(x, self.weight, self.positions, self.sigma, self.kernel_size)

    def _forward_dcls(self, x: Tensor, rounded: bool) -> Tensor:
        xp = pad_time(x, self.kernel_size).permute(1, 2, 0)  # (B, in, T')
        if rounded:
            dck = self.dcls.DCK
            dck.__init_tmp_variables__(x.device)
            pos = torch.round(self.dcls.P)
            kernel = dck.forward_vmax(self.dcls.weight, pos, torch.zeros_like(self.dcls.SIG))
            y = F.conv1d(xp, kernel)
        else:
            y = self.dcls(xp)
        return y.permute(2, 0, 1).contiguous()

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, "
            f"backend={self.backend}, learn_positions={self.dcls.P.requires_grad}"
        )


def reference_delay_conv(x: Tensor, weight: Tensor, pos: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """Training-mode delay convolution written with plain torch ops, for tests."""
    kernel = gaussian_kernel(weight, pos, sigma, kernel_size)
    y = F.conv1d(pad_time(x, kernel_size).permute(1, 2, 0), kernel)
    return y.permute(2, 0, 1)


def max_delay_steps(max_delay_ms: float, dt_ms: float) -> int:
    """Kernel size K: the max delay in steps, made odd (250 ms / 10 ms -> 25, 300 -> 31)."""
    k = int(math.ceil(max_delay_ms / dt_ms - 1e-9))
    return k if k % 2 == 1 else k + 1
