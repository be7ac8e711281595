r"""BatchNorm and LIF as one autograd step that keeps only BatchNorm's input for the backward.

A hidden block computes ``s = LIF(BN(y))``. Run as two modules, autograd keeps two (T, B, C)
float32 tensors per block until the backward: BatchNorm's input ``y`` and the LIF's pre-reset
membrane ``h`` (28 MiB each on the SHD network at batch 256). Here the forward keeps ``y`` and
BatchNorm's (C,) statistics only. BatchNorm is folded into the LIF kernel as a per-channel
``y * scale + shift`` (``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``),
so no current tensor is written either; the backward runs the same kernel again for ``h``
(the same inputs, the same code: the same bits, so the surrogate sees exactly the membrane
the spikes came from) and writes the LIF's dL/d(current) over it, then BatchNorm's dL/dy over
that: dL/dgamma and dL/dbeta from ``aten.native_batch_norm_backward`` (the saved mean and
inverse deviation), then ``dL/dy = g a + y b + c`` per channel in two in-place passes.

The cost is one more LIF forward per hidden block in the backward (a pass over T) and
BatchNorm's normalised copy in the forward, dropped at once (its statistics and running
update come from BatchNorm's own op, ``torch.native_batch_norm``, so the running statistics
are those ``nn.BatchNorm1d`` keeps: momentum, or the cumulative average where it is None);
the saving is one (T, B, C) tensor per hidden block at every point after its forward.
Training only, for the fused LIF kernels (:meth:`SpikingNeurons.kernels` ``c``, ``torch`` or
``triton``) and BatchNorm with affine parameters and running statistics (the model's).
Evaluation on the C kernel (the CPU's) has its own fold, :func:`batchnorm_lif_eval`: the
running statistics' affine inside the LIF, no autograd.
Spikes equal the two modules' except where the folded affine's rounding moves a membrane
across the threshold (float32 rounding: rare; the gradients agree to float32 tolerance).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from snn_delays import fast_neurons
from snn_delays.fast_delays import first_derivative_only
from snn_delays.neurons import SpikingNeurons


def _batchnorm_before_hidden_lif(bn: nn.Module, neurons: nn.Module, y: Tensor) -> bool:
    """What both folds need: the model's BatchNorm (affine parameters, running statistics)
    before hidden LIF neurons, on a float32 (T, B, C) input of its width."""
    return (
        isinstance(bn, nn.BatchNorm1d)
        and bn.affine
        and bn.track_running_stats
        and isinstance(neurons, SpikingNeurons)
        and not neurons.readout
        and y.dim() == 3
        and y.shape[-1] == bn.num_features
        and y.dtype == torch.float32
    )


def fusable(bn: nn.Module, neurons: nn.Module, y: Tensor) -> bool:
    """:func:`batchnorm_lif` computes ``neurons(bn(y))`` for a training step."""
    return (
        _batchnorm_before_hidden_lif(bn, neurons, y) and bn.training and neurons.kernels(y) != "spikingjelly"
    )


def eval_fusable(bn: nn.Module, neurons: nn.Module, y: Tensor) -> bool:
    """:func:`batchnorm_lif_eval` computes ``neurons(bn(y))``: an evaluation step (BatchNorm
    on its running statistics, no gradients) on the C LIF kernel (the CPU's)."""
    return (
        _batchnorm_before_hidden_lif(bn, neurons, y)
        and not bn.training
        and bn.running_mean is not None
        and not torch.is_grad_enabled()
        and neurons.kernels(y) == "c"
    )


def batchnorm_lif_eval(y: Tensor, bn: nn.BatchNorm1d, neurons: SpikingNeurons) -> Tensor:
    """Spikes of ``neurons(bn(y))`` for ``y`` (T, B, C) in evaluation: BatchNorm's per-channel
    ``y * scale + shift`` folded into the LIF kernel, so the normalised (T, B, C) copy is
    neither written nor read (one pass over y, ~7 % of an SHD evaluation step on the CPU).
    aten's CPU BatchNorm rounds its multiply-adds differently (fused, where its build has FMA),
    so a current can differ in its last bit: a membrane within ~1e-7 of the threshold can
    spike in one and not the other. A review found no such flip in 24 seeded models (10.5 M
    hidden spikes) and over a thousand in inputs crafted to sit at the threshold."""
    invstd = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    scale = invstd * bn.weight
    shift = bn.bias - bn.running_mean * scale
    tau, thr = float(neurons.node.tau), float(neurons.threshold)
    return fast_neurons.lif_forward(y, tau, thr, (True, False, False), use_c=True, affine=(scale, shift))[0]


def batchnorm_lif(y: Tensor, bn: nn.BatchNorm1d, neurons: SpikingNeurons) -> Tensor:
    """Spikes of ``neurons(bn(y))`` for ``y`` (T, B, C) in training mode, keeping only ``y``
    (and (C,) statistics) for the backward; updates ``bn``'s running statistics. One value per
    channel (T B = 1) is refused, as BatchNorm refuses it (its variance would be NaN)."""
    if y.shape[0] * y.shape[1] <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}"
        )
    factor = 0.0 if bn.momentum is None else bn.momentum  # as nn.BatchNorm1d's forward
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average
            factor = 1.0 / float(bn.num_batches_tracked)
    lif = (neurons.kernels(y), float(neurons.node.tau), float(neurons.threshold), float(neurons.alpha))
    return _BatchNormLIF.apply(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, factor, bn.eps, lif)


def _lif_kernels(kernels: str) -> tuple[Callable, Callable]:
    """``(lif_forward, lif_backward)`` of the fused LIF ``kernels`` (``c``, ``torch`` or
    ``triton``), with the signatures of :mod:`snn_delays.triton_neurons`' pair."""
    if kernels == "triton":
        from snn_delays import triton_neurons  # triton is optional: imported on first use

        return triton_neurons.lif_forward, triton_neurons.lif_backward
    use_c = kernels == "c"
    return (
        functools.partial(fast_neurons.lif_forward, use_c=use_c),
        functools.partial(fast_neurons.lif_backward, use_c=use_c),
    )


class _BatchNormLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, factor, eps, lif):  # noqa: ANN001, ANN205
        flat = y.reshape(-1, y.shape[-1])
        # BatchNorm's own statistics and running update; the normalised copy it also makes is
        # dropped at once (on the CPU this is ~8x faster than var_mean over the rows)
        _, mean, invstd = torch.native_batch_norm(
            flat, None, None, running_mean, running_var, True, factor, eps
        )
        scale = weight * invstd
        shift = bias - mean * scale
        kernels, tau, thr, _ = lif
        lif_forward, _ = _lif_kernels(kernels)
        spikes = lif_forward(y, tau, thr, (True, False, False), affine=(scale, shift))[0]
        ctx.save_for_backward(y, weight, mean, invstd, scale, shift)
        ctx.eps, ctx.lif = eps, lif
        return spikes

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_spikes):  # noqa: ANN001, ANN205
        y, weight, mean, invstd, scale, shift = ctx.saved_tensors
        kernels, tau, thr, alpha = ctx.lif
        lif_forward, lif_backward = _lif_kernels(kernels)
        h = lif_forward(y, tau, thr, (False, True, False), affine=(scale, shift))[1]  # the forward's again
        # dL/d(current) written over h, this backward's own tensor
        grad_current = lif_backward(grad_spikes, None, h, tau, thr, alpha, over_h=True)
        del h
        c = y.shape[-1]
        flat_y, grad = y.reshape(-1, c), grad_current.reshape(-1, c)
        _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, flat_y, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        grad_y = None
        if ctx.needs_input_grad[0]:  # BatchNorm's dL/dy, written over dL/d(current)
            # dL/dy = k (g - sum(g)/n - (y - mean) invstd sum(g xhat)/n), k = gamma invstd,
            # with sum(g) = dL/dbeta and sum(g xhat) = dL/dgamma: g a + y b + c per channel.
            n = grad.shape[0]
            a = weight * invstd
            b = -a * invstd * grad_w / n
            grad_y = torch.addcmul(-a * grad_b / n - mean * b, grad, a, out=grad)
            grad_y.addcmul_(flat_y, b)
            grad_y = grad_y.view(y.shape)
        grad_w = grad_w if ctx.needs_input_grad[1] else None
        grad_b = grad_b if ctx.needs_input_grad[2] else None
        return grad_y, grad_w, grad_b, None, None, None, None, None
