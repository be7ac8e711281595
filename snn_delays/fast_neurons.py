r"""Fused multi-step LIF (forward and backward) for the CPU: one C loop over T, no Python loop.

The same neuron as spikingjelly's ``LIFNode(decay_input=False, v_reset=0, detach_reset=True)``
with the ATan surrogate, computed with the same float32 operations in the same order, so the
spikes are identical:

    h[t] = v[t-1] - v[t-1] / tau + I[t],   s[t] = (h[t] >= thr),   v[t] = s[t] ? 0 : h[t]

Backward (detached reset), ``sg = (alpha/2) / (1 + (pi/2 alpha (h - thr))^2)``:

    gh[t] = gs[t] sg[t] + (gv[t] + c[t+1]) (1 - s[t]),   dL/dI[t] = gh[t],   c[t] = gh[t] - gh[t] / tau

where ``gv`` is the gradient of the (post-reset) membrane output ``v[t]`` (the readout's
output, as spikingjelly's ``v_seq``). The C kernel walks ``T`` for a chunk of neurons at a
time (the state stays in L1) and splits chunks over OpenMP threads; it is compiled once like
the delay kernels (:func:`snn_delays.fast_delays.compile_c`). Without a compiler the same
equations run as torch ops (a Python loop over T).
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch
from torch import Tensor

from snn_delays.fast_delays import compile_c, first_derivative_only, sync_threads

_C_SOURCE = r"""
#include <stdint.h>
#define CH 512

/* x (T, M) -> s, h (pre-reset membrane), v (post-reset membrane), each (T, M) or NULL.
   scale, shift (C,) or NULL: the current is x * scale[c] + shift[c], c = column % C. */
void lif_forward(const float* x, const float* scale, const float* shift, int64_t C, float* s,
                 float* h, float* v, int64_t T, int64_t M, float tau, float thr) {
    #pragma omp parallel for schedule(static)
    for (int64_t m0 = 0; m0 < M; m0 += CH) {
        const int64_t n = (M - m0) < CH ? (M - m0) : CH;
        float st[CH], a[CH], b[CH];
        for (int64_t j = 0; j < n; ++j) {
            st[j] = 0.0f;
            a[j] = scale ? scale[(m0 + j) % C] : 1.0f;
            b[j] = scale ? shift[(m0 + j) % C] : 0.0f;
        }
        for (int64_t t = 0; t < T; ++t) {
            const float* xr = x + t * M + m0;
            float* sr = s ? s + t * M + m0 : 0;
            float* hr = h ? h + t * M + m0 : 0;
            float* vr = v ? v + t * M + m0 : 0;
            for (int64_t j = 0; j < n; ++j) {
                const float cur = scale ? xr[j] * a[j] + b[j] : xr[j];
                const float hh = st[j] - st[j] / tau + cur;
                const float sp = hh >= thr ? 1.0f : 0.0f;
                st[j] = hh >= thr ? 0.0f : hh;
                if (sr) sr[j] = sp;
                if (hr) hr[j] = hh;
                if (vr) vr[j] = st[j];
            }
        }
    }
}

/* gx (T, M) from h (T, M) and the gradients of s and v (either may be NULL). */
void lif_backward(const float* gs, const float* gv, const float* h, float* gx, int64_t T,
                  int64_t M, float tau, float thr, float half_alpha, float slope) {
    #pragma omp parallel for schedule(static)
    for (int64_t m0 = 0; m0 < M; m0 += CH) {
        const int64_t n = (M - m0) < CH ? (M - m0) : CH;
        float carry[CH];
        for (int64_t j = 0; j < n; ++j) carry[j] = 0.0f;
        for (int64_t t = T - 1; t >= 0; --t) {
            const int64_t o = t * M + m0;
            for (int64_t j = 0; j < n; ++j) {
                const float hh = h[o + j];
                const float keep = hh >= thr ? 0.0f : 1.0f;
                float gh = ((gv ? gv[o + j] : 0.0f) + carry[j]) * keep;
                if (gs) {
                    const float z = (hh - thr) * slope;
                    gh += gs[o + j] * (half_alpha / (1.0f + z * z));
                }
                gx[o + j] = gh;
                carry[j] = gh - gh / tau;
            }
        }
    }
}
"""

_LIB: ctypes.CDLL | None = None
_LIB_TRIED = False
_LIB_LOCK = threading.Lock()


def _load_lib() -> ctypes.CDLL | None:
    global _LIB, _LIB_TRIED
    with _LIB_LOCK:
        if not _LIB_TRIED:
            _LIB_TRIED = True
            lib = compile_c("fast_neurons", _C_SOURCE)
            if lib is not None:
                i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
                lib.lif_forward.argtypes = [ptr] * 3 + [i64] + [ptr] * 3 + [i64] * 2 + [f32] * 2
                lib.lif_backward.argtypes = [ptr] * 4 + [i64] * 2 + [f32] * 4
            _LIB = lib
        return _LIB


def c_kernels_available() -> bool:
    return _load_lib() is not None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _forward_torch(
    x: Tensor, tau: float, thr: float, want: tuple[bool, bool, bool], affine: tuple[Tensor, Tensor] | None
) -> list[Tensor | None]:
    outs = [torch.empty_like(x) if w else None for w in want]  # spikes, pre- and post-reset membranes
    v = x.new_zeros(x.shape[1:])  # x[0] would fail on zero steps
    for t, cur in enumerate(x):
        if affine is not None:
            cur = cur * affine[0] + affine[1]  # a multiply, then an add: the C loop's roundings
        h = v - v / tau + cur
        v = torch.where(h >= thr, torch.zeros_like(h), h)
        for out, step in zip(outs, ((h >= thr).to(x.dtype), h, v), strict=True):
            if out is not None:
                out[t] = step
    return outs


def _backward_torch(gs, gv, h, tau, thr, alpha, gx=None):  # noqa: ANN001, ANN202
    gx = torch.empty_like(h) if gx is None else gx
    carry = h.new_zeros(h.shape[1:])
    slope = math.pi / 2 * alpha
    for t in range(h.shape[0] - 1, -1, -1):
        keep = (~(h[t] >= thr)).to(h.dtype)  # 1 where no spike, NaN included (as spikingjelly's 1 - s)
        gh = ((gv[t] if gv is not None else 0.0) + carry) * keep
        if gs is not None:
            z = (h[t] - thr) * slope
            gh = gh + gs[t] * ((alpha / 2) / (1 + z * z))
        gx[t] = gh
        carry = gh - gh / tau
    return gx


def lif_forward(
    x: Tensor,
    tau: float,
    thr: float,
    want: tuple[bool, bool, bool],
    use_c: bool,
    affine: tuple[Tensor, Tensor] | None = None,
) -> list[Tensor | None]:
    """``[s, h, v]`` (spikes, pre- and post-reset membranes) of a LIF population, those in
    ``want`` computed (the others None), no autograd. ``affine = (scale, shift)``, each (C,):
    the current is ``x * scale + shift`` over the last dimension (BatchNorm folded in; C
    kernel: inside the loop, no current tensor)."""
    x = x.contiguous()
    if not use_c:
        return _forward_torch(x, tau, thr, want, affine)
    t_len, m = x.shape[0], math.prod(x.shape[1:])
    outs = [torch.empty_like(x) if w else None for w in want]
    scale, shift = (None, None) if affine is None else (t.contiguous() for t in affine)
    sync_threads()
    _LIB.lif_forward(_ptr(x), _ptr(scale), _ptr(shift), x.shape[-1], *map(_ptr, outs), t_len, m, tau, thr)
    return outs


def lif_backward(
    gs: Tensor | None,
    gv: Tensor | None,
    h: Tensor,
    tau: float,
    thr: float,
    alpha: float,
    use_c: bool,
    over_h: bool = False,
) -> Tensor:
    """dL/d(current) from the pre-reset membrane ``h`` and the gradients of the spikes and the
    post-reset membrane (either may be None), no autograd. ``over_h``: written over ``h`` (a
    contiguous tensor nothing else reads; each element is read before it is written)."""
    gs = None if gs is None else gs.contiguous()
    gv = None if gv is None else gv.contiguous()
    if not use_c:
        return _backward_torch(gs, gv, h, tau, thr, alpha, h if over_h else None)
    gx = h if over_h else torch.empty_like(h)
    t_len, m = h.shape[0], math.prod(h.shape[1:])
    sync_threads()
    _LIB.lif_backward(
        _ptr(gs), _ptr(gv), _ptr(h), _ptr(gx), t_len, m, tau, thr, alpha / 2, math.pi / 2 * alpha
    )
    return gx


class _LIF(torch.autograd.Function):
    """(spikes, post-reset membrane) from the input current; both differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, tau: float, thr: float, alpha: float, use_c: bool, want_v: bool):  # noqa: ANN001, ANN205
        need_h = ctx.needs_input_grad[0]
        s, h, v = lif_forward(x, tau, thr, (True, need_h, want_v), use_c)
        # an unused output (the spikes of a readout) gives None, not zeros: no surrogate term
        # (whose 0 * surrogate(NaN) would spread a NaN membrane to every step's gradient)
        ctx.set_materialize_grads(False)
        ctx.tau, ctx.thr, ctx.alpha, ctx.use_c = tau, thr, alpha, use_c
        if need_h:
            ctx.save_for_backward(h)
        if v is None:
            v = x.new_empty(0)
        return s, v

    @staticmethod
    @first_derivative_only
    def backward(ctx, gs: Tensor | None, gv: Tensor | None):  # noqa: ANN205
        (h,) = ctx.saved_tensors
        gs = None if gs is None or gs.numel() == 0 else gs
        gv = None if gv is None or gv.numel() == 0 else gv
        gx = lif_backward(gs, gv, h, ctx.tau, ctx.thr, ctx.alpha, ctx.use_c)
        return gx, None, None, None, None, None


def usable(x: Tensor) -> bool:
    """The fused path applies: a CPU float32 tensor."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def lif_multi_step(
    x: Tensor,
    tau: float,
    threshold: float = 1.0,
    alpha: float = 5.0,
    return_v: bool = False,
    use_c: bool | None = None,
) -> Tensor:
    """Spikes ``(T, ...)`` of a LIF population driven by ``x``; ``return_v``: the membrane instead.

    ``use_c=None`` takes the C kernel where it compiled, else the torch loop.
    """
    if use_c is None:
        use_c = _load_lib() is not None
    elif use_c and _load_lib() is None:
        raise RuntimeError("fast_neurons: the C kernels are not available")
    use_c = bool(use_c) and usable(x)
    s, v = _LIF.apply(x, float(tau), float(threshold), float(alpha), use_c, return_v)
    return v if return_v else s
