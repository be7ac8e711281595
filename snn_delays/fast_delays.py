"""Fast delay convolutions: the same function as the DCLS reference, computed cheaply.

Shapes are time-major: ``x`` (T, B, in) -> ``y`` (T + (K-1)//2, B, out).
See :mod:`snn_delays.delays` for the equations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SIGMA_OFFSET = 0.27
NORM_EPS = 1e-7


def _pad(x: Tensor, kernel_size: int) -> Tensor:
    return F.pad(x, (0, 0, 0, 0, kernel_size - 1, (kernel_size - 1) // 2))


def delay_conv(x: Tensor, weight: Tensor, pos: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """Training path: Gaussian-interpolated kernel, dense convolution."""
    taps = torch.arange(kernel_size, device=weight.device, dtype=weight.dtype)
    s = abs(float(sigma)) + SIGMA_OFFSET
    g = torch.exp(-0.5 * ((taps - (pos.unsqueeze(-1) + kernel_size // 2)) / s) ** 2)
    kernel = weight.unsqueeze(-1) * g / (g.sum(-1, keepdim=True) + NORM_EPS)
    y = F.conv1d(_pad(x, kernel_size).permute(1, 2, 0), kernel)
    return y.permute(2, 0, 1).contiguous()


def integer_delay_conv(x: Tensor, weight: Tensor, delays: Tensor, kernel_size: int) -> Tensor:
    """Evaluation path: ``y[t,b,o] = sum_i weight[o,i] x[t - delays[o,i], b, i]``."""
    taps = kernel_size - 1 - delays  # tap index of each synapse
    kernel = torch.zeros(*weight.shape, kernel_size, device=weight.device, dtype=weight.dtype)
    kernel.scatter_(-1, taps.unsqueeze(-1), weight.unsqueeze(-1))
    y = F.conv1d(_pad(x, kernel_size).permute(1, 2, 0), kernel)
    return y.permute(2, 0, 1).contiguous()
