r"""Fused multi-step LIF on the GPU (Triton): one kernel each way, the state in registers.

The neuron and its equations are those of :mod:`snn_delays.fast_neurons` (spikingjelly's
``LIFNode(decay_input=False, v_reset=0, detach_reset=True)``, ATan surrogate); each program
walks ``T`` for a block of neurons (columns of the time-major input), forward then backward.
The division by ``tau`` is IEEE-rounded (``div_rn``), as on the CPU, so the spikes are those
of spikingjelly's CPU op bit for bit. One launch per direction, no Python per call beyond
it: on CUDA the step's host time and its capture in a CUDA graph do not depend on
spikingjelly's kernels. ``auto`` runs it for ``lif`` on float32 CUDA tensors where Triton
imports (:func:`snn_delays.neurons.triton_lif_usable`); ``SNN_DELAYS_NEURON_IMPL=triton``
forces it. With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, which is how the tests
check them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from snn_delays.fast_delays import first_derivative_only
from snn_delays.triton_delays import check_tensors, device_of

BLOCK = 256  # neurons per program


@triton.jit
def _lif_fwd_kernel(
    x,
    bn_scale,
    bn_shift,
    C,
    spk,
    h,
    v,
    T,
    M,
    tau,
    thr,
    AFFINE: tl.constexpr,
    WANT_S: tl.constexpr,
    WANT_H: tl.constexpr,
    WANT_V: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < M
    off = cols.to(tl.int64)  # of step t: t M + cols, advanced by M (no 32-bit product)
    state = tl.zeros((BLOCK,), dtype=tl.float32)
    if AFFINE:  # BatchNorm folded in: the current is x * scale[c] + shift[c], c = column % C
        a = tl.load(bn_scale + cols % C, mask=ok, other=1.0)
        b = tl.load(bn_shift + cols % C, mask=ok, other=0.0)
    for _ in range(T):
        cur = tl.load(x + off, mask=ok, other=0.0)
        if AFFINE:
            cur = cur * a + b
        hh = state - tl.math.div_rn(state, tau) + cur
        fire = hh >= thr
        state = tl.where(fire, 0.0, hh)
        if WANT_S:
            tl.store(spk + off, tl.where(fire, 1.0, 0.0), mask=ok)
        if WANT_H:
            tl.store(h + off, hh, mask=ok)
        if WANT_V:
            tl.store(v + off, state, mask=ok)
        off += M


@triton.jit
def _lif_bwd_kernel(
    gs,
    gv,
    h,
    gx,
    T,
    M,
    tau,
    thr,
    half_alpha,
    slope,
    HAS_GS: tl.constexpr,
    HAS_GV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < M
    carry = tl.zeros((BLOCK,), dtype=tl.float32)
    off = tl.full((BLOCK,), T - 1, tl.int64) * M + cols  # the last step first
    for _ in range(T):
        hh = tl.load(h + off, mask=ok, other=0.0)
        keep = tl.where(hh >= thr, 0.0, 1.0)
        gh = carry
        if HAS_GV:
            gh = tl.load(gv + off, mask=ok, other=0.0) + carry
        gh = gh * keep
        if HAS_GS:
            z = (hh - thr) * slope
            gh = gh + tl.load(gs + off, mask=ok, other=0.0) * (half_alpha / (1.0 + z * z))
        tl.store(gx + off, gh, mask=ok)
        carry = gh - tl.math.div_rn(gh, tau)
        off -= M


def lif_forward(
    x: Tensor,
    tau: float,
    thr: float,
    want: tuple[bool, bool, bool],
    affine: tuple[Tensor, Tensor] | None = None,
) -> list[Tensor | None]:
    """:func:`snn_delays.fast_neurons.lif_forward` in one Triton kernel (``affine`` folded in)."""
    check_tensors("the Triton LIF kernels (SNN_DELAYS_NEURON_IMPL=triton)", x)
    x = x.contiguous()
    t_len, m = x.shape[0], math.prod(x.shape[1:])
    outs = [torch.empty_like(x) if w else None for w in want]
    scale, shift = (x, x) if affine is None else (t.contiguous() for t in affine)
    placeholder = x  # for the outputs not wanted: the kernel does not write them
    with device_of(x):
        if x.numel():  # Triton refuses an empty grid
            _lif_fwd_kernel[(triton.cdiv(m, BLOCK),)](
                x,
                scale,
                shift,
                x.shape[-1],
                *(placeholder if t is None else t for t in outs),
                t_len,
                m,
                tau,
                thr,
                AFFINE=affine is not None,
                WANT_S=want[0],
                WANT_H=want[1],
                WANT_V=want[2],
                BLOCK=BLOCK,
            )
    return outs


def lif_backward(
    gs: Tensor | None,
    gv: Tensor | None,
    h: Tensor,
    tau: float,
    thr: float,
    alpha: float,
    over_h: bool = False,
) -> Tensor:
    """:func:`snn_delays.fast_neurons.lif_backward` in one Triton kernel (each element of ``h``
    is loaded before dL/d(current) is stored there, so ``over_h`` is safe)."""
    gx = h if over_h else torch.empty_like(h)
    t_len, m = h.shape[0], math.prod(h.shape[1:])
    if not h.numel():
        return gx
    with device_of(h):
        _lif_bwd_kernel[(triton.cdiv(m, BLOCK),)](
            h if gs is None else gs.contiguous(),
            h if gv is None else gv.contiguous(),
            h,
            gx,
            t_len,
            m,
            tau,
            thr,
            alpha / 2,
            math.pi / 2 * alpha,
            HAS_GS=gs is not None,
            HAS_GV=gv is not None,
            BLOCK=BLOCK,
        )
    return gx


class LIF(torch.autograd.Function):
    """(spikes, post-reset membrane or an empty tensor) from the current ``x`` (T, ...)."""

    @staticmethod
    def forward(ctx, x: Tensor, tau: float, thr: float, alpha: float, want_v: bool):  # noqa: ANN001, ANN205
        need_h = ctx.needs_input_grad[0]
        s, h, v = lif_forward(x, tau, thr, (True, need_h, want_v))
        ctx.set_materialize_grads(False)  # an unused output's gradient is None (as fast_neurons)
        ctx.args = (tau, thr, alpha)
        if need_h:
            ctx.save_for_backward(h)
        return s, v if want_v else x.new_empty(0)

    @staticmethod
    @first_derivative_only
    def backward(ctx, gs: Tensor | None, gv: Tensor | None):  # noqa: ANN205
        (h,) = ctx.saved_tensors
        gs = None if gs is None or gs.numel() == 0 else gs
        gv = None if gv is None or gv.numel() == 0 else gv
        return lif_backward(gs, gv, h, *ctx.args), None, None, None, None


def lif_multi_step(
    x: Tensor, tau: float, threshold: float = 1.0, alpha: float = 5.0, return_v: bool = False
) -> Tensor:
    """Spikes ``(T, ...)`` of a LIF population driven by ``x``; ``return_v``: the membrane instead."""
    s, v = LIF.apply(x, float(tau), float(threshold), float(alpha), return_v)
    return v if return_v else s
