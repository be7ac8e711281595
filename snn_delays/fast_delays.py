r"""Fast delay convolutions: the same function as the DCLS reference, computed cheaply.

Shapes are time-major: ``x`` (T, B, in) -> ``y`` (T + (K-1)//2, B, out). See
:mod:`snn_delays.delays` for the equations. With ``xp`` the input padded by ``K-1`` steps
before and ``(K-1)//2`` after, every path computes

    y[t, b, o] = sum_i sum_n k[o, i, n] xp[t + n, b, i]

and differs only in which terms it visits and in what order it sums them:

- **Events** (CPU, sparse input: spikes): each nonzero ``x[t, b, i]`` adds ``x * k[:, i, n]``
  to the ``K`` rows ``y[t + K-1-n, b, :]``; ``dL/dk`` is the same loop reading ``dL/dy``.
  Cost ``nnz(x) K out`` instead of ``T B in out K``; exact (the whole kernel is used).
- **Taps** (CPU, ``dL/dx`` and dense inputs): only the ``J`` taps of each synapse whose
  Gaussian weight is above ``TAP_TOL`` relative to its peak are visited. The dropped taps
  carry less than ``TAP_TOL`` each (float32 rounding is ``6e-8``): see :func:`n_taps`.
- **Spectral** (CPU: wide Gaussians and dense inputs; CUDA: the default training path): one
  complex product per frequency of a DFT over time; every tap is used. The transforms into
  frequencies are direct sums: in C on the CPU, elsewhere float32 products with cached DFT
  matrices (x, dL/dy, the kernel, and dL/dk's K rows back), so no zero-padded copy is made;
  y and dL/dx come back through ``irfft`` (``SNN_DELAYS_DFT=fft``: x and dL/dy go in through
  ``rfft`` too, see :func:`dft_impl`).
- **Scatter** (CPU evaluation, sparse input): integer delays, one add per input spike and
  output channel.
- **GEMM** (CUDA evaluation, opt-in ``impl="gemm"``): the kernel unfolded over its taps, one
  matrix product per pass, in time blocks.
- **Triton** (CUDA, opt-in ``impl="triton"``): the same products as implicit GEMMs that read
  the shifted rows in place, without the unfold copy (:mod:`snn_delays.triton_delays`).
- **Dense** (fallback, any device): the DCLS kernel and one ``conv1d``, as the reference.

On the CPU a cost model (:func:`_forward_path`) picks the cheapest path per layer and call.
The CPU kernels are C compiled once with the system C compiler and loaded with ``ctypes``,
the Gaussian kernel and its weight and position gradients included (:class:`_GaussKernelCPU`);
without a compiler every call takes the dense path, whose kernel is built with torch ops
(:func:`gaussian_kernel`, autograd for ``dL/dw`` and ``dL/dp``). The tests hold every path to
the ``dcls`` reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import math
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SIGMA_OFFSET = 0.27
NORM_EPS = 1e-7
TAP_TOL = 1e-8  # a dropped tap weighs less than this times its synapse's peak tap
FREQ_CHUNKS = 4  # spectrum-sized work in this many blocks (products written over an operand, copies)
SCATTER_DENSITY_MAX = 0.1  # evaluation: scalar adds per input spike below this density, else taps
DENSITY_SAMPLES = 16  # evaluation: samples of a batch whose nonzeros pick the path above

# --------------------------------------------------------------------------------------
# Pure functions shared by every path
# --------------------------------------------------------------------------------------


def first_derivative_only(backward: Callable) -> Callable:
    """For the ``backward`` of an autograd Function whose backward is not itself differentiable
    (fused and C kernels): with ``create_graph=True`` (grad mode on inside a backward) it raises,
    naming what to use instead, rather than return a gradient whose own derivative autograd
    would silently take as zero (``once_differentiable`` raises only when the incoming
    gradient requires grad)."""

    @functools.wraps(backward)
    def checked(ctx, *grads):  # noqa: ANN001, ANN002, ANN202
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(ctx).__name__.removesuffix('Backward')}: snn-delays' fused kernels give first "
                "derivatives only, and create_graph=True asks for a second: run with "
                "SNN_DELAYS_CONV_IMPL=dense (or model.delay_backend=dcls) and SNN_DELAYS_NEURON_IMPL=spikingjelly"
            )
        return backward(ctx, *grads)

    return checked


def pad_time(x: Tensor, kernel_size: int) -> Tensor:
    return F.pad(x, (0, 0, 0, 0, kernel_size - 1, (kernel_size - 1) // 2))


def gaussian_kernel(weight: Tensor, pos: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """Dense DCLS gauss kernel ``(out, in, K)`` (same formula as :mod:`snn_delays.delays`)."""
    taps = torch.arange(kernel_size, device=weight.device, dtype=weight.dtype)
    s = abs(float(sigma)) + SIGMA_OFFSET
    g = torch.exp(-0.5 * ((taps - (pos.unsqueeze(-1) + kernel_size // 2)) / s) ** 2)
    return weight.unsqueeze(-1) * g / (g.sum(-1, keepdim=True) + NORM_EPS)


class _GaussKernelRecomputed(torch.autograd.Function):
    """:func:`gaussian_kernel` whose backward recomputes it rather than keeping its autograd
    graph: that graph holds four (out, in, K) intermediates per layer from the forward to the
    backward, ~38 MB for the SHD network whatever the batch (29 MiB off its counted peak).
    Recomputed with the same operators, the gradients are the same bits."""

    @staticmethod
    def forward(ctx, weight: Tensor, pos: Tensor, sigma: float, ksize: int) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(weight, pos)
        ctx.sigma, ctx.ksize = sigma, ksize
        return gaussian_kernel(weight, pos, sigma, ksize)

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_k: Tensor):  # noqa: ANN001, ANN205
        weight, pos = ctx.saved_tensors
        need = ctx.needs_input_grad[:2]
        inputs = [t.detach().requires_grad_(n) for t, n in zip((weight, pos), need, strict=True)]
        with torch.enable_grad():
            kernel = gaussian_kernel(*inputs, ctx.sigma, ctx.ksize)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(kernel, wanted, grad_k) if wanted else ())
        return *(next(grads) if t.requires_grad else None for t in inputs), None, None


def recomputed_gaussian_kernel(weight: Tensor, pos: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """:func:`gaussian_kernel`, recomputed in the backward (:class:`_GaussKernelRecomputed`)."""
    if not (torch.is_grad_enabled() and (weight.requires_grad or pos.requires_grad)):
        return gaussian_kernel(weight, pos, sigma, kernel_size)
    return _GaussKernelRecomputed.apply(weight, pos, sigma, kernel_size)


def n_taps(sigma: float, kernel_size: int, tol: float = TAP_TOL) -> int:
    r"""Taps per synapse that hold all of its kernel above ``tol`` times its peak.

    ``g(z) = exp(-z^2 / 2s^2) < tol`` for ``|z| > R = s sqrt(2 ln(1/tol))``; the integers of
    ``[c - R, c + R]`` number at most ``floor(2R) + 1``. With ``tol = 1e-8``: ``R = 6.07 s``,
    ``J = 7`` at sigma 0.23 (s = 0.5), and every tap (``J = K``) once ``s > (K-1) / 12.1``.
    A dropped tap changes ``y`` by under ``tol |w x|`` and ``dL/dp`` by under ``tol R / s^2``
    relative, below float32 rounding of the sums they enter.
    """
    return min(kernel_size, int(math.floor(2.0 * _radius(sigma, tol))) + 1)


def _radius(sigma: float, tol: float = TAP_TOL) -> float:
    return (abs(float(sigma)) + SIGMA_OFFSET) * math.sqrt(2.0 * math.log(1.0 / tol))


def tap_window(pos: Tensor, sigma: float, kernel_size: int) -> tuple[Tensor, int]:
    """First tap ``(out, in)`` (int32) of each synapse's ``J``-tap window, and ``J``.

    The window starts at ``ceil(c - R)``, ``c = p + K//2``, and its ``floor(2R) + 1`` taps
    reach ``floor(c + R)``; near the ends of the kernel it is shifted to stay inside.
    """
    j = n_taps(sigma, kernel_size)
    centre = pos.detach() + kernel_size // 2
    # a non-finite position (a diverged run) gets a window inside the kernel too: its taps are
    # then NaN, as the reference's, and no kernel indexes outside the window
    start = torch.ceil(centre - _radius(sigma)).nan_to_num_(0.0).clamp_(0, kernel_size - j)
    return start.to(torch.int32), j


# --------------------------------------------------------------------------------------
# The C kernels (CPU)
# --------------------------------------------------------------------------------------

_C_SOURCE = r"""
#include <stdint.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16 __attribute__((vector_size(64)));  /* 16 float lanes (one 512-bit vector) */
static inline v16 ld16(const float* p) { v16 v; memcpy(&v, p, sizeof(v)); return v; }
static inline void st16(float* p, v16 v) { memcpy(p, &v, sizeof(v)); }

/* ---- Events (the nonzeros of a spike input x (T, B, I)), in two orders -------------------
   by row: (b, t, i), rptr[b * T + t] = first event of row (b, t): the forward's order;
   by channel: (block of BB samples, i, b, t), cptr[blk * I + i] = first event of the group:
   dL/dk's order. Counting first, then filling at the prefix sums (computed by the caller). */
void row_count(const float* x, int64_t T, int64_t B, int64_t I, int64_t* cnt) {
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t)
        for (int64_t b = 0; b < B; ++b) {
            const float* r = x + (t * B + b) * I;
            int64_t c = 0;
            for (int64_t i = 0; i < I; ++i) c += r[i] != 0.0f;
            cnt[b * T + t] = c;
        }
}

/* Rows are independent (each starts at its prefix sum): threads take time steps. A row is
   compacted without branches (every entry written, the cursor moved by a comparison: a
   data-dependent branch mispredicts on random spikes) into the thread's own buffer, whose
   first n entries are then the row's events, in channel order. The scan stops in the block
   of 16 channels where the row's count (row_count's) is reached: an empty row reads nothing. */
void row_fill(const float* x, int64_t T, int64_t B, int64_t I, const int64_t* ptr,
              int32_t* ev_i, float* ev_v) {
    #pragma omp parallel
    {
        int32_t* ri = (int32_t*)malloc(I * sizeof(int32_t));
        float* rv = (float*)malloc(I * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t b = 0; b < B; ++b) {
                const float* r = x + (t * B + b) * I;
                const int64_t e = ptr[b * T + t], n_row = ptr[b * T + t + 1] - e;
                int64_t n = 0;
                for (int64_t i0 = 0; i0 < I && n < n_row; i0 += 16) {  /* to the row's last event */
                    const int64_t i1 = i0 + 16 < I ? i0 + 16 : I;
                    for (int64_t i = i0; i < i1; ++i) {
                        ri[n] = (int32_t)i;
                        rv[n] = r[i];
                        n += r[i] != 0.0f;
                    }
                }
                if (n == 0) continue;  /* the lists may be empty (NULL): no memcpy at all */
                memcpy(ev_i + e, ri, n * sizeof(int32_t));
                memcpy(ev_v + e, rv, n * sizeof(float));
            }
        free(ri);
        free(rv);
    }
}

/* The channel order from the row order: cnt[(b / BB) * I + i] counts, then fill at pos. */
void chan_count(const int64_t* rptr, const int32_t* ev_i, int64_t T, int64_t B, int64_t I,
                int64_t BB, int64_t* cnt) {
    for (int64_t b = 0; b < B; ++b) {
        int64_t* c = cnt + (b / BB) * I;
        for (int64_t e = rptr[b * T]; e < rptr[(b + 1) * T]; ++e) ++c[ev_i[e]];
    }
}

void chan_fill(const int64_t* rptr, const int32_t* ev_i, const float* ev_v, int64_t T, int64_t B,
               int64_t I, int64_t BB, int64_t* pos, int32_t* cb, int32_t* ct, float* cv) {
    for (int64_t b = 0; b < B; ++b) {
        int64_t* p = pos + (b / BB) * I;
        for (int64_t t = 0; t < T; ++t)
            for (int64_t e = rptr[b * T + t]; e < rptr[b * T + t + 1]; ++e) {
                const int64_t k = p[ev_i[e]]++;
                cb[k] = (int32_t)b; ct[k] = (int32_t)t; cv[k] = ev_v[e];
            }
    }
}

/* ---- Event convolution and its kernel gradient (taps padded to Kp = NCH * C) -------------
   Shapes: kernel k (NOB, I, Kp, 16): output channels in blocks of 16 lanes, the taps padded
   at the front with Kp - K zeros; y and g (B, R, NOB * 16) with R = T + Kp - 1 rows per sample
   (tap n of an input at time t lands in row t + Kp - 1 - n); dL/dk gk (I, Kp, NOB * 16).
   Register blocking: C taps x 16 lanes are accumulated in registers, in the forward over the
   events of one row (b, t) (they all land in the same C output rows), in dL/dk over the
   events of one channel in a block of samples (they all read the same C kernel rows). */
static inline __attribute__((always_inline)) void evconv_row(
        const int32_t* ev_i, const float* ev_v, int64_t e0, int64_t e1, const float* kb,
        float* yt, int64_t ys, int64_t Kp, const int C) {
    for (int64_t n0 = 0; n0 < Kp; n0 += C) {
        v16 acc[16];
        for (int q = 0; q < C; ++q) acc[q] = (v16){0};
        for (int64_t e = e0; e < e1; ++e) {
            const float v = ev_v[e];
            const float* kr = kb + ((int64_t)ev_i[e] * Kp + n0) * 16;
            #pragma GCC unroll 16
            for (int q = 0; q < C; ++q) acc[q] += v * ld16(kr + q * 16);
        }
        float* yr = yt + (Kp - 1 - n0) * ys;
        #pragma GCC unroll 16
        for (int q = 0; q < C; ++q) st16(yr - q * ys, ld16(yr - q * ys) + acc[q]);
    }
}

static inline __attribute__((always_inline)) void evgrad_chan(
        const int32_t* ev_b, const int32_t* ev_t, const float* ev_v, int64_t e0, int64_t e1,
        const float* g, float* gki, int64_t R, int64_t Os, int64_t Kp, const int C) {
    for (int64_t n0 = 0; n0 < Kp; n0 += C) {
        v16 acc[16];
        for (int q = 0; q < C; ++q) acc[q] = (v16){0};
        for (int64_t e = e0; e < e1; ++e) {
            const float v = ev_v[e];
            const float* gr = g + ((int64_t)ev_b[e] * R + ev_t[e] + Kp - 1 - n0) * Os;
            #pragma GCC unroll 16
            for (int q = 0; q < C; ++q) acc[q] += v * ld16(gr - q * Os);
        }
        #pragma GCC unroll 16
        for (int q = 0; q < C; ++q) st16(gki + (n0 + q) * Os, ld16(gki + (n0 + q) * Os) + acc[q]);
    }
}

#define EV_CASES(CALL) \
    switch (C) { case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
    case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; \
    case 8: CALL(8); break; case 9: CALL(9); break; case 10: CALL(10); break; case 11: CALL(11); break; \
    case 12: CALL(12); break; case 13: CALL(13); break; case 14: CALL(14); break; \
    case 15: CALL(15); break; default: CALL(16); }

/* y (B, R, NOB*16) += events (row order) x k. Threads take (block of 16 channels, sample). */
void event_conv(const int64_t* rptr, const int32_t* ev_i, const float* ev_v, const float* k,
                float* y, int64_t B, int64_t T, int64_t I, int64_t NOB, int64_t Kp, int64_t C) {
    const int64_t R = T + Kp - 1, Os = NOB * 16;
    #pragma omp parallel for collapse(2) schedule(dynamic, 4)
    for (int64_t ob = 0; ob < NOB; ++ob)
        for (int64_t b = 0; b < B; ++b) {
            const float* kb = k + ob * I * Kp * 16;
            for (int64_t t = 0; t < T; ++t) {
                const int64_t e0 = rptr[b * T + t], e1 = rptr[b * T + t + 1];
                if (e0 == e1) continue;
                float* yt = y + (b * R + t) * Os + ob * 16;
#define EVC(CC) evconv_row(ev_i, ev_v, e0, e1, kb, yt, Os, Kp, CC)
                EV_CASES(EVC)
#undef EVC
            }
        }
}

/* gk (I, Kp, NOB*16) += events (channel order) x g. Threads take channels within a block. */
void event_grad(const int64_t* cptr, const int32_t* ev_b, const int32_t* ev_t, const float* ev_v,
                const float* g, float* gk, int64_t NBLK, int64_t T, int64_t I, int64_t NOB,
                int64_t Kp, int64_t C) {
    const int64_t R = T + Kp - 1, Os = NOB * 16;
    #pragma omp parallel
    for (int64_t blk = 0; blk < NBLK; ++blk) {
        #pragma omp for collapse(2) schedule(static) nowait
        for (int64_t i = 0; i < I; ++i)
            for (int64_t ob = 0; ob < NOB; ++ob) {
                const int64_t e0 = cptr[blk * I + i], e1 = cptr[blk * I + i + 1];
                if (e0 == e1) continue;
                float* gki = gk + i * Kp * Os + ob * 16;
#define EVG(CC) evgrad_chan(ev_b, ev_t, ev_v, e0, e1, g + ob * 16, gki, R, Os, Kp, CC)
                EV_CASES(EVG)
#undef EVG
            }
    }
}

/* Layouts of the tap kernel: pack src (Ts, B, I) into (NB, I, Tp, 16) at row offset lo (zero
   rows and lanes elsewhere); unpack dst (NB, O, Td, 16) into (Td, B, O). One (nb, t) at a time:
   16 rows of I floats against I lines of 16 lanes, both in L1. */
void tap_pack(const float* src, float* dst, int64_t Ts, int64_t B, int64_t I, int64_t NB,
              int64_t Tp, int64_t lo) {
    #pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < NB; ++nb) {
        const int64_t nq = (B - nb * 16) < 16 ? (B - nb * 16) : 16;
        for (int64_t t = 0; t < Tp; ++t) {
            const int64_t ts = t - lo;
            float* d = dst + (nb * I * Tp + t) * 16;
            if (ts < 0 || ts >= Ts) {
                for (int64_t i = 0; i < I; ++i) memset(d + i * Tp * 16, 0, 16 * sizeof(float));
                continue;
            }
            const float* s = src + (ts * B + nb * 16) * I;
            for (int64_t i = 0; i < I; ++i) {
                float line[16];
                for (int64_t q = 0; q < 16; ++q) line[q] = q < nq ? s[q * I + i] : 0.0f;
                memcpy(d + i * Tp * 16, line, sizeof(line));
            }
        }
    }
}

void tap_unpack(const float* dst, float* out, int64_t NB, int64_t O, int64_t Td, int64_t B) {
    #pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < NB; ++nb) {
        const int64_t nq = (B - nb * 16) < 16 ? (B - nb * 16) : 16;
        for (int64_t t = 0; t < Td; ++t) {
            float* o_rows = out + (t * B + nb * 16) * O;
            for (int64_t o = 0; o < O; ++o) {
                const float* line = dst + ((nb * O + o) * Td + t) * 16;
                for (int64_t q = 0; q < nq; ++q) o_rows[q * O + o] = line[q];
            }
        }
    }
}

/* Integer delays (evaluation): y[t + d[i, o], b, o] += x[t, b, i] w[i, o] where t + d < Ty.
   x (T, B, I), y (Ty, B, O), w (I, O), idx[i, o] = d[i, o] * O + o with 0 <= d < K. Each
   thread takes whole samples and accumulates one sample in a private (T + K, O) buffer: the
   rows an input spike touches (t .. t + K-1) stay in L1, adds need no bounds check and never
   alias across threads; rows past Ty are dropped when the sample is copied out. */
void delay_scatter(const float* x, const float* w, const int32_t* idx, float* y,
                   int64_t T, int64_t B, int64_t I, int64_t Ty, int64_t O, int64_t K) {
    const int64_t rows = (T + K > Ty) ? T + K : Ty;
    #pragma omp parallel
    {
        float* yb = (float*)malloc(rows * O * sizeof(float));
        #pragma omp for schedule(dynamic, 2)
        for (int64_t b = 0; b < B; ++b) {
            memset(yb, 0, rows * O * sizeof(float));
            for (int64_t t = 0; t < T; ++t) {
                const float* xr = x + (t * B + b) * I;
                float* restrict yt = yb + t * O;
                for (int64_t i = 0; i < I; ++i) {
                    const float v = xr[i];
                    if (v == 0.0f) continue;
                    const float* restrict wi = w + i * O;
                    const int32_t* restrict ii = idx + i * O;
                    #pragma GCC unroll 8
                    for (int64_t o = 0; o < O; ++o) yt[ii[o]] += v * wi[o];
                }
            }
            for (int64_t r = 0; r < Ty; ++r) memcpy(y + (r * B + b) * O, yb + r * O, O * sizeof(float));
        }
        free(yb);
    }
}

/* The DCLS Gaussian kernel, one synapse (row r) at a time, with c = p + K/2, s = |sigma| + 0.27:
   g[n] = exp(-0.5 ((n - c) / s)^2), Z = sum g + eps, gn = g / Z (kept), k = w g / Z.
   Values below FLT_MIN (1.2e-38) are written as 0: a narrow Gaussian's far taps are
   subnormal, and every product with a subnormal operand takes a microcode assist on Intel
   CPUs (an SHD training step at sigma 0.23 took 3.8x as long on a Xeon); each term so
   dropped is below 1e-38, where the reference's sums are O(1e-3) and more. */
void gauss_kernel(const float* w, const float* p, float* k, float* gn, int64_t S, int64_t K,
                  float s, float eps) {
    const float c0 = (float)(K / 2);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < S; ++r) {
        const float c = p[r] + c0;
        float* g = gn + r * K;
        float z = 0.0f;
        for (int64_t n = 0; n < K; ++n) {
            const float d = ((float)n - c) / s;
            const float e = expf(-0.5f * (d * d));
            g[n] = e < FLT_MIN ? 0.0f : e;
            z += g[n];
        }
        z += eps;
        for (int64_t n = 0; n < K; ++n) {
            const float kn = w[r] * g[n] / z, gn_ = g[n] / z;
            k[r * K + n] = fabsf(kn) < FLT_MIN ? 0.0f : kn;
            g[n] = gn_ < FLT_MIN ? 0.0f : gn_;
        }
    }
}

/* From dL/dk: dL/dw = sum_n dk gn; dL/dp = (w / s^2) (sum_n dk gn (n - c) - A sum_m gn (m - c)),
   A = sum_n dk gn (d gn[n] / dp = gn[n] ((n - c) - sum_m gn[m] (m - c)) / s^2, eps constant). */
void gauss_kernel_grad(const float* w, const float* p, const float* gn, const float* dk,
                       float* dw, float* dp, int64_t S, int64_t K, float s) {
    const float c0 = (float)(K / 2), is2 = 1.0f / (s * s);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < S; ++r) {
        const float c = p[r] + c0;
        const float* g = gn + r * K;
        const float* d = dk + r * K;
        float a = 0.0f, b = 0.0f, m = 0.0f;
        for (int64_t n = 0; n < K; ++n) {
            const float u = (float)n - c;
            a += d[n] * g[n];
            b += d[n] * g[n] * u;
            m += g[n] * u;
        }
        if (dw) dw[r] = a;
        if (dp) dp[r] = w[r] * is2 * (b - a * m);
    }
}

/* Real DFTs as direct sums, 16 columns m per vector (the columns of a time-major tensor are
   contiguous: b and channel). Forward: out[f, m] (complex, re/im interleaved) =
   sum_{n < L} x[n sn + m sm] basis[n, f] (basis (L, F, 2)); the L x 16 block of x is copied to
   L1 first. Inverse: out[t, m] = sum_f basis[t, f, 0] re S[f, m] + basis[t, f, 1] im S[f, m]
   (basis (T, F, 2) carries the 1/N and the Hermitian weights). */
void dft_cols(const float* x, int64_t sn, int64_t sm, const float* basis, float* out, int64_t M,
              int64_t L, int64_t F) {
    #pragma omp parallel
    {
        float* h = (float*)malloc(L * 16 * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
            const int64_t nm = (M - m0) < 16 ? (M - m0) : 16;
            for (int64_t n = 0; n < L; ++n)
                for (int64_t q = 0; q < 16; ++q) h[n * 16 + q] = q < nm ? x[n * sn + (m0 + q) * sm] : 0.0f;
            for (int64_t f0 = 0; f0 < F; f0 += 4) {  /* 4 frequencies: 8 independent sums */
                const int64_t nf = (F - f0) < 4 ? (F - f0) : 4;
                v16 re[4], im[4];
                for (int u = 0; u < 4; ++u) { re[u] = (v16){0}; im[u] = (v16){0}; }
                for (int64_t n = 0; n < L; ++n) {
                    const v16 hn = ld16(h + n * 16);
                    const float* b = basis + (n * F + f0) * 2;
                    for (int u = 0; u < 4; ++u) {
                        if (u < nf) { re[u] += b[2 * u] * hn; im[u] += b[2 * u + 1] * hn; }
                    }
                }
                for (int64_t u = 0; u < nf; ++u) {
                    float* o = out + ((f0 + u) * M + m0) * 2;
                    for (int64_t q = 0; q < nm; ++q) { o[2 * q] = re[u][q]; o[2 * q + 1] = im[u][q]; }
                }
            }
        }
        free(h);
    }
}

void idft_cols(const float* S, const float* basis, float* out, int64_t M, int64_t F, int64_t T) {
    #pragma omp parallel
    {
        float* sr = (float*)malloc(F * 32 * sizeof(float));  /* per f: 16 re then 16 im */
        #pragma omp for schedule(static)
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
            const int64_t nm = (M - m0) < 16 ? (M - m0) : 16;
            for (int64_t f = 0; f < F; ++f)
                for (int64_t q = 0; q < 16; ++q) {
                    sr[f * 32 + q] = q < nm ? S[(f * M + m0 + q) * 2] : 0.0f;
                    sr[f * 32 + 16 + q] = q < nm ? S[(f * M + m0 + q) * 2 + 1] : 0.0f;
                }
            for (int64_t t0 = 0; t0 < T; t0 += 4) {  /* 4 output rows: 8 independent sums */
                const int64_t nt = (T - t0) < 4 ? (T - t0) : 4;
                v16 ar[4], ai[4];
                for (int u = 0; u < 4; ++u) { ar[u] = (v16){0}; ai[u] = (v16){0}; }
                for (int64_t f = 0; f < F; ++f) {
                    const v16 re = ld16(sr + f * 32), im = ld16(sr + f * 32 + 16);
                    for (int u = 0; u < 4; ++u) {
                        if (u < nt) {
                            const float* b = basis + ((t0 + u) * F + f) * 2;
                            ar[u] += b[0] * re;
                            ai[u] += b[1] * im;
                        }
                    }
                }
                for (int64_t u = 0; u < nt; ++u) {
                    const v16 acc = ar[u] + ai[u];
                    float* o = out + (t0 + u) * M + m0;
                    if (nm == 16) st16(o, acc);
                    else for (int64_t q = 0; q < nm; ++q) o[q] = acc[q];
                }
            }
        }
        free(sr);
    }
}

/* The kernels' OpenMP runtime is the system's, not torch's: follow torch's thread count. */
void set_threads(int n) {
    #ifdef _OPENMP
    omp_set_num_threads(n);
    #endif
}

/* dst[nb, o, t, :] = sum_i sum_j coef[o, i, j] src[nb, i, t + start[o, i] + j, :]
   src (NB, I, Ts, 16), dst (NB, O, Td, 16): batch in chunks of 16 lanes (one 512-bit vector).
   The caller pads src so that every row read exists.
   Register blocking: one tile of TT output steps x 16 lanes is accumulated in registers over
   all (i, j); the TT + J - 1 source rows of a synapse are loaded once and reused by its J taps.
   Threads take (nb, tile) pairs and loop over o inside, so the source rows of one tile
   (I x (TT + K - 1) rows) stay in L2 while the coefficients stream. */
#define TT 8
#define BW 16
#define JMAX 8

static inline __attribute__((always_inline)) void tap_tile(
        const float* sb, const float* coef, const int32_t* start, float* db,
        int64_t I, int64_t Ts, int64_t o, int64_t t0, int64_t nt, const int64_t J) {
    v16 acc[TT];
    for (int tt = 0; tt < TT; ++tt) acc[tt] = (v16){0};
    const float* c = coef + o * I * J;
    const int32_t* st = start + o * I;
    for (int64_t i = 0; i < I; ++i, c += J) {
        const float* s = sb + (i * Ts + t0 + st[i]) * BW;
        v16 r[TT + JMAX - 1];
        #pragma GCC unroll 16
        for (int q = 0; q < TT + J - 1; ++q) r[q] = ld16(s + q * BW);
        #pragma GCC unroll 8
        for (int j = 0; j < J; ++j) {
            const float cj = c[j];
            #pragma GCC unroll 8
            for (int tt = 0; tt < TT; ++tt) acc[tt] += cj * r[tt + j];
        }
    }
    memcpy(db + t0 * BW, acc, nt * BW * sizeof(float));
}

/* Any J (the generic loop, no register reuse of the source rows). */
static inline void tap_tile_any(
        const float* sb, const float* coef, const int32_t* start, float* db,
        int64_t I, int64_t Ts, int64_t o, int64_t t0, int64_t nt, int64_t J) {
    v16 acc[TT];
    for (int tt = 0; tt < TT; ++tt) acc[tt] = (v16){0};
    for (int64_t i = 0; i < I; ++i) {
        const float* c = coef + (o * I + i) * J;
        const float* s = sb + (i * Ts + t0 + start[o * I + i]) * BW;
        for (int64_t j = 0; j < J; ++j) {
            const float cj = c[j];
            for (int tt = 0; tt < TT; ++tt) acc[tt] += cj * ld16(s + (j + tt) * BW);
        }
    }
    memcpy(db + t0 * BW, acc, nt * BW * sizeof(float));
}

#define TAP_CASE(JJ) case JJ: for (int64_t o = 0; o < O; ++o) \
    tap_tile(sb, coef, start, dst + (nb * O + o) * Td * BW, I, Ts, o, t0, nt, JJ); break;

void tap_conv(const float* src, const float* coef, const int32_t* start, float* dst,
              int64_t NB, int64_t I, int64_t Ts, int64_t O, int64_t Td, int64_t J) {
    const int64_t ntile = (Td + TT - 1) / TT;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t nb = 0; nb < NB; ++nb) {
        for (int64_t tile = 0; tile < ntile; ++tile) {
            const float* sb = src + nb * I * Ts * BW;
            const int64_t t0 = tile * TT;
            const int64_t nt = (Td - t0) < TT ? (Td - t0) : TT;
            switch (J) {
                TAP_CASE(1) TAP_CASE(2) TAP_CASE(3) TAP_CASE(4)
                TAP_CASE(5) TAP_CASE(6) TAP_CASE(7) TAP_CASE(8)
                default:
                    for (int64_t o = 0; o < O; ++o)
                        tap_tile_any(sb, coef, start, dst + (nb * O + o) * Td * BW, I, Ts, o, t0, nt, J);
            }
        }
    }
}
"""

_LIB: ctypes.CDLL | None = None
_LIB_TRIED = False
_LIB_LOCK = threading.Lock()


def _cache_dir() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")  # Windows: no uid
    root = os.environ.get("SNN_DELAYS_CACHE") or os.path.join(tempfile.gettempdir(), f"snn_delays_{user}")
    return Path(root)


def c_disabled(name: str) -> bool:
    """``SNN_DELAYS_NO_C`` turns off the C library ``name``: a comma list of library names
    turns off those, ``1`` (any other value but ``0`` or empty) all of them."""
    value = os.environ.get("SNN_DELAYS_NO_C", "").strip()
    names = {v.strip() for v in value.split(",")}
    return value not in ("", "0") and (name in names or not names <= {"fast_delays", "fast_neurons"})


# Compiler settings tried in turn: with OpenMP and this CPU's instructions; without OpenMP
# (Apple's clang has none unless libomp is installed: the kernels then run on one thread);
# without -march=native too (compilers that refuse it). The source guards its OpenMP calls.
C_ATTEMPTS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)


def compile_c(name: str, source: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile ``source`` once per source text, flags and machine into the cache dir; load it.

    The settings of :data:`C_ATTEMPTS` are tried in turn, each library cached under its own name
    (every process tries the full settings first, so an OpenMP installed later is taken up); a
    fallback warns that the kernels run slower, and no library at all that the slower PyTorch
    paths run, each naming the compiler's error and what to do. Returns None where it cannot
    (no compiler, or ``SNN_DELAYS_NO_C`` set: ``1`` for every library, or a comma list of names,
    ``fast_delays`` for the delay kernels and ``fast_neurons`` for the LIF): callers fall back.
    """
    if c_disabled(name):
        return None
    cc = os.environ.get("CC", "cc")
    errors = []
    for n, attempt in enumerate(C_ATTEMPTS):
        try:
            lib = _compile_once(name, source, cc, (*attempt, *flags))
        except (OSError, subprocess.CalledProcessError) as err:
            errors.append(_compile_error(err))
            continue
        if n:
            dropped = " ".join(f for f in C_ATTEMPTS[0] if f not in attempt)
            warnings.warn(
                f"snn_delays: the {name} C kernels compiled only without {dropped} "
                f"({cc}: {errors[0]}), so they run {'on one thread' if n == 1 else 'slower'}. Use a "
                "compiler with OpenMP (gcc; on macOS: brew install libomp, or CC=gcc-14).",
                RuntimeWarning,
                stacklevel=3,
            )
        return lib
    warnings.warn(
        f"snn_delays: could not compile the {name} C kernels with CC={cc} into {_cache_dir()} "
        f"({errors[0]}): the CPU runs the PyTorch fallbacks, several times slower. Install a C "
        "compiler (gcc or clang) or point CC at one; SNN_DELAYS_NO_C=1 chooses the fallbacks "
        "without this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _compile_once(name: str, source: str, cc: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """Load the library of these flags from the cache, compiling it first if it is not there."""
    key = hashlib.sha1((source + " ".join(flags) + platform.machine() + platform.node()).encode())
    path = _cache_dir() / f"{name}_{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        src = path.with_suffix(f".{os.getpid()}.c")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            src.write_text(source)
            # CC is a command line, as make reads it: "ccache gcc", "gcc -m64"
            cmd = [*shlex.split(cc), *flags, "-shared", "-fPIC", "-std=c99", str(src), "-o", str(tmp), "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            os.replace(tmp, path)
        finally:
            src.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    return ctypes.CDLL(str(path))


def _compile_error(err: Exception) -> str:
    """The compiler's first error line (or the OS error): what the warning quotes."""
    if isinstance(err, subprocess.CalledProcessError):
        lines = [ln.strip() for ln in (err.stderr or "").splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
        return first[:200] or f"exit status {err.returncode}"
    return str(err)


def _load_lib() -> ctypes.CDLL | None:
    """Compile (once per source and machine) and load the C kernels; None if impossible."""
    global _LIB, _LIB_TRIED
    with _LIB_LOCK:
        if _LIB_TRIED:
            return _LIB
        _LIB_TRIED = True
        # fused multiply-adds (ISO C mode would keep a * b + c as two roundings, two instructions);
        # loops aligned to 64 bytes: where a hot loop lands otherwise moves with unrelated edits
        # to the source, and the evaluation scatter's speed with it (0.80 or 1.0-1.1 ns an add
        # on a Xeon). GCC and clang >= 13 align; older clang ignores the flag with a warning.
        lib = compile_c("fast_delays", _C_SOURCE, ("-ffp-contract=fast", "-falign-loops=64"))
        if lib is None:
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.event_conv.argtypes = [ptr] * 5 + [i64] * 6
        lib.event_grad.argtypes = [ptr] * 6 + [i64] * 6
        lib.tap_conv.argtypes = [ptr] * 4 + [i64] * 6
        lib.dft_cols.argtypes = [ptr] + [i64] * 2 + [ptr] * 2 + [i64] * 3
        lib.idft_cols.argtypes = [ptr] * 3 + [i64] * 3
        lib.tap_pack.argtypes = [ptr] * 2 + [i64] * 6
        lib.tap_unpack.argtypes = [ptr] * 2 + [i64] * 4
        lib.delay_scatter.argtypes = [ptr] * 4 + [i64] * 6
        lib.set_threads.argtypes = [ctypes.c_int]
        f32 = ctypes.c_float
        lib.gauss_kernel.argtypes = [ptr] * 4 + [i64] * 2 + [f32] * 2
        lib.gauss_kernel_grad.argtypes = [ptr] * 6 + [i64] * 2 + [f32]
        lib.row_count.argtypes = [ptr] + [i64] * 3 + [ptr]
        lib.row_fill.argtypes = [ptr] + [i64] * 3 + [ptr] * 3
        lib.chan_count.argtypes = [ptr] * 2 + [i64] * 4 + [ptr]
        lib.chan_fill.argtypes = [ptr] * 3 + [i64] * 4 + [ptr] * 4
        _LIB = lib
        return lib


def c_kernels_available() -> bool:
    return _load_lib() is not None


def keep_freed_memory() -> bool:
    """Let glibc keep freed large blocks for reuse instead of returning them to the system.

    By default every allocation above 32 MiB is a fresh ``mmap`` (one activation of the SHD
    network is 32.5 MB), so each is zero-filled page by page on first touch, every step: about
    a third of a CPU evaluation step. Process-wide; the trainer calls it for CPU runs and
    ``experiments/bench.py`` for both backends alike. ``SNN_DELAYS_SYSTEM_MALLOC=1`` (any
    value but ``0`` or empty) opts out. Returns whether the setting took (False off glibc).
    """
    if (
        os.environ.get("SNN_DELAYS_SYSTEM_MALLOC", "").strip() not in ("", "0")
        or platform.system() != "Linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def sync_threads() -> None:
    """Size the kernels' OpenMP team as torch's: they link the system's OpenMP runtime, not
    torch's, which would otherwise use every core whatever ``torch.set_num_threads`` says."""
    if _load_lib() is not None:
        _LIB.set_threads(torch.get_num_threads())


def _lib() -> ctypes.CDLL:
    sync_threads()
    return _LIB


def _p(t: Tensor) -> int:
    return t.data_ptr()


EVENT_BLOCK_BYTES = 2 << 20  # dL/dk: dL/dy rows per block of samples (gk is re-read per block)
TT, BW = 8, 16  # tap_conv tile: time steps x batch lanes


def _tap_chunks(ksize: int) -> tuple[int, int]:
    """Taps held in registers at once (C <= 16) and the padded tap count Kp = C * chunks."""
    n_chunks = -(-ksize // 16)
    c = -(-ksize // n_chunks)
    return c, c * n_chunks


class _RowEvents:
    """Nonzeros of x (T, B, I) by row (b, t): ``ptr[b T + t]`` is the first of row (b, t).

    Counted on construction (``nnz``, ``density``); :meth:`fill` lists them.
    """

    def __init__(self, x: Tensor) -> None:
        t_len, batch, n_in = x.shape
        self.x = x.detach().contiguous()
        counts = torch.empty(batch * t_len, dtype=torch.int64)
        _lib().row_count(_p(self.x), t_len, batch, n_in, _p(counts))  # torch's thread count
        self.ptr = F.pad(counts.cumsum(0), (1, 0)).contiguous()
        self.nnz = int(self.ptr[-1])
        self.density = self.nnz / max(1, x.numel())
        self.shape = (t_len, batch, n_in)

    def fill(self) -> _RowEvents:
        t_len, batch, n_in = self.shape
        self.i = torch.empty(self.nnz, dtype=torch.int32)
        self.v = torch.empty(self.nnz, dtype=torch.float32)
        _lib().row_fill(_p(self.x), t_len, batch, n_in, _p(self.ptr), _p(self.i), _p(self.v))
        del self.x
        return self

    @classmethod
    def filled(cls, shape: tuple[int, int, int], ptr: Tensor, i: Tensor, v: Tensor) -> _RowEvents:
        """The lists of :meth:`fill` again, from its tensors (a backward's saved tensors)."""
        rows = cls.__new__(cls)
        rows.shape, rows.ptr, rows.i, rows.v = shape, ptr, i, v
        rows.nnz = i.numel()
        rows.density = rows.nnz / max(1, math.prod(shape))
        return rows


class _ChanEvents:
    """The same events by (block of samples, channel); (b, t) ascending in a group.

    A block holds as many samples as fit ``EVENT_BLOCK_BYTES`` of dL/dy rows (``row_bytes``
    per sample), at least one.
    """

    def __init__(self, rows: _RowEvents, row_bytes: int) -> None:
        t_len, batch, n_in = self.shape = rows.shape
        block = max(1, EVENT_BLOCK_BYTES // max(1, row_bytes))
        self.n_blk = -(-batch // block)
        counts = torch.zeros(self.n_blk * n_in, dtype=torch.int64)
        _LIB.chan_count(_p(rows.ptr), _p(rows.i), t_len, batch, n_in, block, _p(counts))
        self.ptr = F.pad(counts.cumsum(0), (1, 0)).contiguous()
        self.b = torch.empty(rows.nnz, dtype=torch.int32)
        self.t = torch.empty(rows.nnz, dtype=torch.int32)
        self.v = torch.empty(rows.nnz, dtype=torch.float32)
        pos = self.ptr[:-1].clone()
        args = (t_len, batch, n_in, block, _p(pos), _p(self.b), _p(self.t), _p(self.v))
        _LIB.chan_fill(_p(rows.ptr), _p(rows.i), _p(rows.v), *args)


def _event_conv(ev: _RowEvents, kernel: Tensor, t_out: int) -> Tensor:
    """y (T_out, B, out) (a transposed view) from events and the dense kernel (out, in, K)."""
    t_len, batch, n_in = ev.shape
    n_out, _, ksize = kernel.shape
    c, kp = _tap_chunks(ksize)
    nob = -(-n_out // 16)
    kt = kernel.new_zeros(nob * 16, n_in, kp)
    kt[:n_out, :, kp - ksize :] = kernel
    kt = kt.view(nob, 16, n_in, kp).permute(0, 2, 3, 1).contiguous()  # (NOB, in, Kp, 16)
    y = torch.zeros(batch, t_len + kp - 1, nob * 16, dtype=torch.float32)
    _lib().event_conv(_p(ev.ptr), _p(ev.i), _p(ev.v), _p(kt), _p(y), batch, t_len, n_in, nob, kp, c)
    return y[:, :t_out, :n_out].transpose(0, 1)


def _event_grad(rows: _RowEvents, grad_y: Tensor, n_out: int, ksize: int) -> Tensor:
    """dL/dk (out, in, K) from the forward's events and dL/dy (T_out, B, out)."""
    t_len, batch, n_in = rows.shape
    t_out = grad_y.shape[0]
    c, kp = _tap_chunks(ksize)
    nob = -(-n_out // 16)
    g = grad_y.new_zeros(batch, t_len + kp - 1, nob * 16)
    g[:, :t_out, :n_out] = grad_y.transpose(0, 1)
    ev = _ChanEvents(rows, row_bytes=g[0].numel() * g.element_size())
    gk = torch.zeros(n_in, kp, nob * 16, dtype=torch.float32)
    args = (ev.n_blk, t_len, n_in, nob, kp, c)
    _lib().event_grad(_p(ev.ptr), _p(ev.b), _p(ev.t), _p(ev.v), _p(g), _p(gk), *args)
    return gk[:, kp - ksize :, :n_out].permute(2, 0, 1)


def _tap_conv(src: Tensor, coef: Tensor, start: Tensor, t_dst: int, lo: int = 0, t_log: int = 0) -> Tensor:
    """``dst[t,b,o] = sum_ij coef[o,i,j] xp[t+start[o,i]+j, b, i]`` (t_dst, B, out).

    ``xp`` is ``src`` (Ts, B, I) after ``lo`` zero rows, zero-padded to ``t_log`` rows (at least
    every row read); the packing into the kernel's layout does the padding.
    """
    t_src, batch, n_in = src.shape
    n_out, _, j = coef.shape
    nb = -(-batch // BW)
    t_pack = max(t_log, lo + t_src) + TT  # TT spare rows for the last tile
    src = src.contiguous()
    packed = torch.empty(nb, n_in, t_pack, BW, dtype=torch.float32)  # batch in vector-wide chunks
    lib = _lib()
    lib.tap_pack(_p(src), _p(packed), t_src, batch, n_in, nb, t_pack, lo)
    dst = torch.empty(nb, n_out, t_dst, BW, dtype=torch.float32)
    coef, start = coef.contiguous(), start.contiguous()
    lib.tap_conv(_p(packed), _p(coef), _p(start), _p(dst), nb, n_in, t_pack, n_out, t_dst, j)
    out = torch.empty(t_dst, batch, n_out, dtype=torch.float32)
    lib.tap_unpack(_p(dst), _p(out), nb, n_out, t_dst, batch)
    return out


def _nonzero_fraction(x: Tensor) -> float:
    """Fraction of nonzeros of x (T, B, I), counted on every (B // :data:`DENSITY_SAMPLES`)-th
    sample: 16 to 24 samples spread over the batch, every sample of one under 32. It only
    picks the evaluation's path (both compute the same function); counting every row took
    1.0-2.4 ms a layer of a 70-80 ms SHD evaluation step on a 2-core Xeon, 16 samples ~0.55 ms."""
    sub = x[:, :: max(1, x.shape[1] // DENSITY_SAMPLES)]
    return int(torch.count_nonzero(sub)) / max(1, sub.numel())


def _delay_scatter(x: Tensor, weight: Tensor, delays: Tensor, t_out: int, ksize: int) -> Tensor:
    """Integer delays from the nonzeros of x: (T, B, in) -> (t_out, B, out), scalar adds."""
    t_len, batch, n_in = x.shape
    n_out = weight.shape[0]
    x = x.detach().contiguous()
    w = weight.t().contiguous()
    idx = (delays.t().to(torch.int32) * n_out + torch.arange(n_out, dtype=torch.int32)).contiguous()
    y = torch.empty(t_out, batch, n_out, dtype=torch.float32)
    _lib().delay_scatter(_p(x), _p(w), _p(idx), _p(y), t_len, batch, n_in, t_out, n_out, ksize)
    return y


def _window_coef(kernel: Tensor, start: Tensor, j: int) -> Tensor:
    """The ``J`` taps of each synapse from the dense kernel: (out, in, J)."""
    idx = start.long().unsqueeze(-1) + torch.arange(j, device=kernel.device)
    return kernel.gather(-1, idx)


class _GaussKernelCPU(torch.autograd.Function):
    """:func:`gaussian_kernel` in one C pass each way (no autograd graph of elementwise ops)."""

    @staticmethod
    def forward(ctx, weight: Tensor, pos: Tensor, sigma: float, ksize: int) -> Tensor:  # noqa: ANN001
        w, p = weight.detach().contiguous(), pos.detach().contiguous()
        kernel = torch.empty(*w.shape, ksize, dtype=torch.float32)
        gn = torch.empty_like(kernel)
        s = abs(float(sigma)) + SIGMA_OFFSET
        _lib().gauss_kernel(_p(w), _p(p), _p(kernel), _p(gn), w.numel(), ksize, s, NORM_EPS)
        ctx.save_for_backward(w, p, gn)
        ctx.s = s
        return kernel

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_k: Tensor):  # noqa: ANN001, ANN205
        w, p, gn = ctx.saved_tensors
        need_w, need_p = ctx.needs_input_grad[:2]
        grad_k = grad_k.contiguous()
        dw = torch.empty_like(w) if need_w else None
        dp = torch.empty_like(p) if need_p else None
        _lib().gauss_kernel_grad(
            _p(w), _p(p), _p(gn), _p(grad_k), dw.data_ptr() if need_w else None,
            dp.data_ptr() if need_p else None, w.numel(), gn.shape[-1], ctx.s
        )  # fmt: skip
        return dw, dp, None, None


def _taps_forward(x: Tensor, coef: Tensor, start: Tensor, ksize: int) -> Tensor:
    """Forward on the tap path: (T, B, in) -> (T_out, B, out), x padded as :func:`pad_time`."""
    t_out = x.shape[0] + (ksize - 1) // 2
    return _tap_conv(x, coef, start, t_out, lo=ksize - 1, t_log=t_out + ksize - 1)


def _taps_grad_input(grad_y: Tensor, coef: Tensor, start: Tensor, ksize: int, t_len: int) -> Tensor:
    """dL/dx (T, B, in): ``sum_oj coef[o,i,j] g[t + K-1-start-j]``, the taps reversed."""
    j = coef.shape[-1]
    coef_t = coef.flip(-1).transpose(0, 1)
    start_t = (ksize - j - start).transpose(0, 1)
    return _tap_conv(grad_y, coef_t, start_t, t_len, t_log=t_len + ksize - 1)  # g zero-padded


# --------------------------------------------------------------------------------------
# Spectral path (CPU, wide Gaussians): every synapse's K taps at the cost of ~N/2 frequencies
# --------------------------------------------------------------------------------------
#
# The delay conv is a causal convolution in time with h[o, i, m] = k[o, i, K-1-m]:
# y[t] = sum_m h[m] x[t - m]. With N >= T + K - 1 points no circular wrap reaches the rows
# kept, so with X = rfft(x), H = rfft(h), G = rfft(dL/dy) (over time, per channel):
#   Y[f] = X[f] @ H[f]^T,  dL/dX[f] = G[f] @ conj(H[f]),  dL/dH[f] = G[f]^T @ conj(X[f]),
# one complex (B x O x I) product per frequency. Rounding: the transforms err by ~1e-7 of the
# largest value, below the tap path's sequential float32 sums (~1e-6).


def _fft_len(t_len: int, ksize: int) -> int:
    """The smallest 5-smooth length >= T + K - 1 (pocketfft and cuFFT are fastest on those;
    the C path's direct sums take T + K - 1 itself, :class:`_DelayConvCPU`)."""
    n = t_len + ksize - 1
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


@functools.lru_cache(maxsize=32)
def _dft_basis(
    n: int, length: int, flip: bool = False, dtype: torch.dtype = torch.float32, conj: bool = False
) -> Tensor:
    """(L, F, 2): ``exp(-2 pi i f m / n)`` (re, im) at row r, m = r (``flip``: m = L-1-r);
    ``conj``: its conjugate, the transform's conjugate for a real series."""
    f = torch.arange(n // 2 + 1, dtype=torch.float64)
    m = torch.arange(length, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(m.flip(0) if flip else m, f) / n
    sine = torch.sin(angle) if conj else -torch.sin(angle)
    return torch.stack([torch.cos(angle), sine], -1).to(dtype).contiguous()


@functools.lru_cache(maxsize=32)
def _idft_basis(n: int, rows: int, dtype: torch.dtype = torch.float32, conj: bool = False) -> Tensor:
    """(T, F, 2): the weights of ``irfft`` (1/n, twice for the frequencies with a mirror);
    ``conj``: those of ``irfft`` of the given spectrum's conjugate (the imaginary parts' negated)."""
    f = torch.arange(n // 2 + 1, dtype=torch.float64)
    weight = torch.full_like(f, 2.0 / n)
    weight[0] = 1.0 / n
    if n % 2 == 0:
        weight[-1] = 1.0 / n
    angle = 2 * math.pi * torch.outer(torch.arange(rows, dtype=torch.float64), f) / n
    sine = weight * torch.sin(angle) if conj else -weight * torch.sin(angle)
    return torch.stack([weight * torch.cos(angle), sine], -1).to(dtype).contiguous()


DFT_IMPLS = ("matmul", "fft")


def dft_impl() -> str:
    """How the spectral path off the C kernels transforms x and dL/dy into frequencies:
    ``SNN_DELAYS_DFT=matmul`` (the default: a float32 product with the DFT matrix, no padded
    copy) or ``fft`` (``torch.fft.rfft``: cuFFT on CUDA, a zero-padded copy of its input)."""
    value = os.environ.get("SNN_DELAYS_DFT", "").strip() or "matmul"
    if value not in DFT_IMPLS:
        raise ValueError(f"SNN_DELAYS_DFT must be one of {', '.join(DFT_IMPLS)}, got {value!r}")
    return value


def _rdft(x: Tensor, n: int, flip: bool = False, conj: bool = False) -> Tensor:
    """``torch.fft.rfft(x, n, dim=0)`` (``flip``: of ``x.flip(0)``) as direct sums: in C on the
    CPU, elsewhere one float32 product with the (L, 2F) DFT matrix (:func:`dft_impl`). ``conj``
    (the C path only): the spectrum's conjugate, at no cost (a basis with the sines negated).

    For the few hundred points here a direct sum runs at the FMA rate and beats the strided
    transforms of pocketfft several times over. The product needs no zero-padded (n, ...) copy
    of x, which ``rfft`` makes (36 MiB for an SHD hidden layer, at its backward's peak); its
    result has the frequencies innermost, as ``rfft``'s along dim 0."""
    use_c = _use_c(x)
    if conj and not use_c:
        raise ValueError("a conjugated spectrum is made only by the C kernels")
    if not use_c and dft_impl() == "fft":
        return torch.fft.rfft(x.flip(0) if flip else x, n=n, dim=0)
    length, rest = x.shape[0], x.shape[1:]
    cols = x[0].numel()
    series = x.reshape(length, cols)  # a view where the strides allow (the permuted kernel)
    if not use_c:
        with _tf32(x.device, off=True):
            pairs = torch.matmul(series.T, _dft_columns(n, length, flip, x.device, x.dtype))  # (C, 2F)
        return torch.view_as_complex(pairs.view(cols, -1, 2)).T.view(-1, *rest)
    basis = _dft_basis(n, length, flip, conj=conj)
    out = torch.empty(basis.shape[1], *rest, 2, dtype=torch.float32)
    step_t, step_col = series.stride()
    _lib().dft_cols(_p(series), step_t, step_col, _p(basis), _p(out), cols, length, basis.shape[1])
    return torch.view_as_complex(out)


@functools.cache  # never evicted: a captured CUDA graph reads it by address
def _dft_columns(n: int, length: int, flip: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(L, 2F) ``dtype`` (float32 or float64) on ``device``: :func:`_dft_basis` with each
    frequency's (re, im) side by side."""
    return _dft_basis(n, length, flip, dtype).reshape(length, -1).to(device)


def _use_c_spectrum(spec: Tensor) -> bool:
    """The C kernels transform ``spec`` back: a CPU complex64 tensor (as :func:`_use_c` for x)."""
    return spec.device.type == "cpu" and spec.dtype == torch.complex64 and _load_lib() is not None


def _irdft(spec: Tensor, n: int, rows: int, conj: bool = False) -> Tensor:
    """``torch.fft.irfft(spec, n, dim=0)[:rows]``, as direct sums in C; ``conj`` (C only): of
    ``spec.conj()``, at no cost (a basis with the sines negated)."""
    if not _use_c_spectrum(spec):
        if conj:
            raise ValueError("a conjugated spectrum is read only by the C kernels")
        return torch.fft.irfft(spec, n=n, dim=0)[:rows]
    rest = spec.shape[1:]
    s = torch.view_as_real(spec.contiguous())
    basis = _idft_basis(n, rows, conj=conj)
    out = torch.empty(rows, *rest, dtype=torch.float32)
    _lib().idft_cols(_p(s), _p(basis), _p(out), out[0].numel(), spec.shape[0], rows)
    return out


@functools.cache  # never evicted: a captured CUDA graph reads it by address
def _dft_matrix(n: int, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(F, L) complex64 (complex128 for a float64 ``dtype``) on ``device``: row f is
    ``exp(-2 pi i f (L-1-r) / n)``, r < L."""
    return torch.view_as_complex(_dft_basis(n, length, True, dtype)).T.contiguous().to(device)


def _kernel_spectrum(kernel: Tensor, n: int) -> Tensor:
    """H (F, O, I): the DFT over n points of h[m] = k[K-1-m] (zero beyond K).

    Off the C path, complex products with the (F, K) DFT matrix in full float32, in
    ``FREQ_CHUNKS`` blocks of (O I) columns: no zero-padded (n, O, I) copy of the kernel for a
    transform, as ``rfft`` would make (36 MiB for an SHD hidden layer, at its backward's peak),
    and a complex copy of one block of the kernel at a time. H is contiguous, frequencies
    outermost: each frequency's (O, I) matrix is a product's operand as it lies."""
    if _use_c(kernel):
        return _rdft(kernel.permute(2, 0, 1), n, flip=True)
    n_out, n_in, ksize = kernel.shape
    columns = kernel.detach().reshape(n_out * n_in, ksize)  # (O I, K)
    matrix = _dft_matrix(n, ksize, kernel.device, kernel.dtype)
    spectrum = torch.empty(matrix.shape[0], n_out * n_in, dtype=matrix.dtype, device=kernel.device)
    with _tf32(kernel.device, off=True):
        for cols in _blocks(columns.shape[0]):
            block = columns[cols].to(matrix.dtype)
            torch.matmul(matrix, block.T, out=spectrum[:, cols])
            del block  # before the next one's
    return spectrum.view(-1, n_out, n_in)


class _Spectra:
    """The spectra of one layer's x, kernel and dL/dy over n points, each computed once and
    shared by the products that need it (forward, dL/dx, dL/dk).

    On the C path dL/dy's is kept conjugated (``g_conj``): both products that read it need
    the conjugate of another operand (H's, X's), which CPU ``bmm`` would copy whole (~10 ms
    for an SHD hidden layer); ``conj(G) H`` and ``conj(G)^T X`` are the conjugates of the
    products wanted, which the C inverse transform reads as such at no cost."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.x: Tensor | None = None
        self.h: Tensor | None = None
        self.g: Tensor | None = None
        self.g_conj = False

    def of_x(self, x: Tensor) -> Tensor:
        if self.x is None:
            self.x = _rdft(x, self.n)
        return self.x

    def of_h(self, kernel: Tensor) -> Tensor:
        if self.h is None:
            self.h = _kernel_spectrum(kernel, self.n)
        return self.h

    def of_g(self, grad_y: Tensor) -> Tensor:
        """dL/dy's spectrum, conjugated where ``g_conj`` (the C path)."""
        if self.g is None:
            self.g_conj = _use_c(grad_y)
            self.g = _rdft(grad_y, self.n, conj=self.g_conj)
        return self.g

    def sharing_h(self) -> _Spectra:
        """New spectra (of another batch block) with this one's kernel spectrum."""
        other = _Spectra(self.n)
        other.h = self.h
        return other


def _blocks(count: int) -> list[slice]:
    """``count`` items in ``FREQ_CHUNKS`` consecutive blocks (the last one shorter)."""
    step = -(-count // FREQ_CHUNKS)
    return [slice(c0, c0 + step) for c0 in range(0, count, step)]


def _product_over(buf: Tensor, product: Callable[[slice], Tensor]) -> Tensor:
    """The spectrum ``product(f)`` of each frequency chunk ``f``, written over ``buf``, one
    of its operands, of the product's shape, which nothing needs afterwards: no third
    spectrum-sized buffer, one chunk's product at a time (each chunk of ``buf`` is read before
    it is written over; any layout: transforms along dim 0 return the frequencies innermost)."""
    for chunk in _blocks(buf.shape[0]):
        buf[chunk] = product(chunk)
    return buf


def _fft_forward(
    x: Tensor, kernel: Tensor, t_out: int, spectra: _Spectra | None = None, free: bool = False
) -> Tensor:
    """y (T_out, B, O). ``free``: ``spectra`` is not used again; the product is written over
    x's spectrum where it fits, and the spectra are dropped before the inverse transform runs
    (else they are kept for a backward that shares them)."""
    spectra = spectra or _Spectra(_fft_len(x.shape[0], kernel.shape[2]))
    xs, h = spectra.of_x(x), spectra.of_h(kernel)
    if free:
        spectra.x = spectra.h = None
    if free and h.shape[1] == h.shape[2]:  # O == I: the product (F, B, O) over x's spectrum
        spec = _product_over(xs, lambda f: torch.matmul(xs[f], h[f].transpose(1, 2)))
    else:
        spec = torch.matmul(xs, h.transpose(1, 2))
    xs = h = None  # the closure's references too
    return _irdft(spec, spectra.n, t_out)


def _fft_grad_input(
    grad_y: Tensor, kernel: Tensor, t_len: int, spectra: _Spectra | None = None, free: bool = False
) -> Tensor:
    """dL/dx (T, B, I), in the inverse transform's layout. ``free``: the last use of
    ``spectra``; the product is written over dL/dy's spectrum where it fits, and the spectra
    are dropped before the inverse transform runs."""
    spectra = spectra or _Spectra(_fft_len(t_len, kernel.shape[2]))
    g, h = spectra.of_g(grad_y), spectra.of_h(kernel)
    conj = spectra.g_conj  # g is conj(G): the product is conj(G conj(H)), H as it lies
    if free:
        spectra.g = spectra.h = None
    if free and h.shape[1] == h.shape[2]:  # O == I: the product (F, B, I) over dL/dy's spectrum
        spec = _product_over(g, lambda f: torch.matmul(g[f], h[f] if conj else h[f].conj()))
    else:
        spec = torch.matmul(g, h if conj else h.conj())
    g = h = None  # the closure's references too
    grad_x = _irdft(spec, spectra.n, t_len, conj=conj)
    del spec
    return grad_x


def _fft_grad_kernel_spectrum(
    x: Tensor | None, grad_y: Tensor, spectra: _Spectra, free_x: bool = False
) -> Tensor:
    """The spectrum (F, O, I) of dL/dh: sum over (t, b) of g's spectrum times x's, conjugated;
    its conjugate where ``spectra.g_conj`` (``conj(G)^T X``, X as it lies), which
    :func:`_grad_kernel_from_spectrum` is then told. ``free_x``: x's spectrum is not used
    again; the product is written over it where B == O."""
    g, xs = spectra.of_g(grad_y), spectra.of_x(x)
    conj = spectra.g_conj
    if free_x:
        spectra.x = None
        if g.shape[1] == g.shape[2]:  # B == O: (F, O, I) over x's spectrum (F, B, I)
            return _product_over(
                xs, lambda f: torch.matmul(g[f].transpose(1, 2), xs[f] if conj else xs[f].conj())
            )
    return torch.matmul(g.transpose(1, 2), xs if conj else xs.conj())


@functools.cache  # never evicted: a captured CUDA graph reads it by address
def _idft_rows(n: int, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2F, K) ``dtype`` (float32 or float64) on ``device``: ``irfft``'s weights for the rows
    K-1, ..., 0 (reversed), such that ``P @ M = irfft(S, n)[K-1-k, c]`` for a spectrum S (F, C)
    as real pairs P (C, 2F)."""
    return _idft_basis(n, rows, dtype).flip(0).reshape(rows, -1).T.contiguous().to(device)


def _grad_kernel_from_spectrum(spec: Tensor, n: int, ksize: int, conj: bool = False) -> Tensor:
    """dL/dk (O, I, K) from the spectrum (F, O, I) of dL/dh, h[m] = k[K-1-m] (``conj``, C path
    only: from its conjugate).

    Off the C path, a real product for the K rows needed, in full float32, instead of an
    inverse transform over all n points (36 MiB for an SHD hidden layer, at its backward's
    peak) of which K are kept. With the frequencies innermost (a product written over x's
    spectrum) the spectrum is its left operand as it lies; else it is copied to that layout
    a block of columns at a time."""
    if _use_c_spectrum(spec):
        gh = _irdft(spec, n, ksize, conj=conj)  # dL/dh (K, O, I)
        return gh.flip(0).permute(1, 2, 0)
    if conj:
        raise ValueError("a conjugated spectrum is read only by the C kernels")
    n_freq, n_out, n_in = spec.shape
    cols = n_out * n_in
    pairs = torch.view_as_real(spec).permute(1, 2, 0, 3)  # (O, I, F, 2)
    rows = _idft_rows(n, ksize, spec.device, pairs.dtype)
    with _tf32(spec.device, off=True):
        if pairs.is_contiguous():
            return torch.matmul(pairs.view(cols, 2 * n_freq), rows).view(n_out, n_in, ksize)
        # frequencies outermost (a product of its own, SSC's B != O): FREQ_CHUNKS blocks of
        # columns, each a copy with its frequencies innermost, not a copy of the whole spectrum
        pairs = pairs.reshape(cols, n_freq, 2)
        out = torch.empty(cols, ksize, device=spec.device, dtype=rows.dtype)
        for part in _blocks(cols):
            block = pairs[part].reshape(-1, 2 * n_freq)
            torch.matmul(block, rows, out=out[part])
            del block  # before the next one's
    return out.view(n_out, n_in, ksize)


def _fft_grad_kernel(x: Tensor, grad_y: Tensor, ksize: int, spectra: _Spectra | None = None) -> Tensor:
    spectra = spectra or _Spectra(_fft_len(x.shape[0], ksize))
    spec = _fft_grad_kernel_spectrum(x, grad_y, spectra)
    return _grad_kernel_from_spectrum(spec, spectra.n, ksize, conj=spectra.g_conj)


# Estimated times (ns) of each CPU path for one layer, from kernel timings on a 2-core AMD EPYC
# (AVX-512, multiply-adds per ns): events 20 (plus ~0.05 ns per output row and 16-lane block),
# taps 50, direct DFTs 32 forward / 38 inverse, complex products 44 (x4 real). They only pick a
# path; every path computes the same function. Within a few tens of percent of the measured
# times for the SHD and SSC layers (see experiments/FAST_DELAYS.md); on a 2-core Intel Xeon
# they pick the same paths as its measured times do.
class _Shape:
    def __init__(self, t_len: int, batch: int, n_in: int, n_out: int, ksize: int) -> None:
        self.t, self.b, self.i, self.o, self.k = t_len, batch, n_in, n_out, ksize
        self.t_out = t_len + (ksize - 1) // 2
        # the C path's transforms: T + K - 1 points, no wraparound (direct sums, which need no
        # 5-smooth length: SHD's hidden layer has 69 frequencies instead of _fft_len's 73)
        self.n = t_len + ksize - 1
        self.f = self.n // 2 + 1

    def events(self, density: float) -> float:
        """Forward and dL/dk (dL/dk re-reads its accumulator per block: dearer beyond 384 out)."""
        fwd = (
            density * self.t * self.b * self.i * self.k * self.o / 20
            + self.b * self.t * -(-self.o // 16) * 0.05
        )
        return fwd * (1 + max(1.0, self.o / 384))

    def taps(self, rows: int, j: int) -> float:
        return rows * self.b * self.i * self.o * j / 50

    def spectral(self, len_in: int, cols_in: int, len_out: int, cols_out: int, kernel: bool) -> float:
        f = self.f
        dft = 2 * f * len_in * cols_in / 32 + 2 * f * len_out * cols_out / 38
        spectrum = 2 * f * self.k * self.o * self.i / 32 if kernel else 0.0
        return dft + spectrum + 4 * f * self.b * self.i * self.o / 44

    def spectral_forward(self) -> float:
        return self.spectral(self.t, self.b * self.i, self.t_out, self.b * self.o, True)

    def spectral_grad_input(self) -> float:
        return self.spectral(self.t_out, self.b * self.o, self.t, self.b * self.i, True)

    def spectral_grad_kernel(self) -> float:
        cols_in = self.b * (self.i + self.o)  # both x and dL/dy are transformed
        return self.spectral(self.t, cols_in, self.k, self.i * self.o, False)


_FORCE: dict[str, str] = {}  # tests: {"forward": events|taps|fft, "grad_input": taps|fft}


def _forward_path(shape: _Shape, density: float, j: int) -> str:
    """The forward's path, counting the dL/dk it implies (events, else spectral)."""
    grad_k = shape.spectral_grad_kernel()
    costs = {
        "events": shape.events(density),
        "taps": shape.taps(shape.t_out, j) + grad_k,
        "fft": shape.spectral_forward() + grad_k,
    }
    return _FORCE.get("forward") or min(costs, key=costs.get)


def _grad_input_path(shape: _Shape, j: int) -> str:
    default = "taps" if shape.taps(shape.t, j) <= shape.spectral_grad_input() else "fft"
    return _FORCE.get("grad_input") or default


class _DelayConvCPU(torch.autograd.Function):
    """y from x and the dense kernel, each product by its cheapest exact path:
    events for sparse x (forward, dL/dk), taps while the Gaussian is narrow, else spectral."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor, start: Tensor, j: int) -> Tensor:  # noqa: ANN001
        n_out, _, ksize = kernel.shape
        t_len = x.shape[0]
        t_out = t_len + (ksize - 1) // 2
        kernel_d = kernel.detach()
        rows = _RowEvents(x)
        ctx.shape = _Shape(t_len, x.shape[1], x.shape[2], n_out, ksize)
        path = _forward_path(ctx.shape, rows.density, j)
        spectra = _Spectra(ctx.shape.n)
        rows = rows.fill() if path == "events" else None
        if path == "events":
            y = _event_conv(rows, kernel_d, t_out)
        elif path == "taps":
            y = _taps_forward(x, _window_coef(kernel_d, start, j), start, ksize)
        else:
            y = _fft_forward(x, kernel_d, t_out, spectra)
        ctx.start, ctx.j = start, j
        # Everything the backward reads is a saved tensor, which autograd frees after a
        # backward (or keeps for another, with retain_graph=True). x only for the taps path:
        # the events give dL/dk without it, and the spectral forward keeps x's spectrum, so
        # neither keeps x (nor has the model's SavedSpikes hooks pack and unpack it).
        keep = any(ctx.needs_input_grad[:2])
        events = (rows.ptr, rows.i, rows.v) if rows is not None else (None, None, None)
        kept_spectra = (spectra.x, spectra.h) if keep else (None, None)
        ctx.save_for_backward(x if path == "taps" else None, kernel_d, *events, *kept_spectra)
        return y.contiguous()

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_y: Tensor):  # noqa: ANN001, ANN205
        x, kernel, ptr, idx, val, spec_x, spec_h = ctx.saved_tensors
        n_out, n_in, ksize = kernel.shape
        t_len = ctx.shape.t
        spectra = _Spectra(ctx.shape.n)  # the forward's (spectral path), shared by both products
        spectra.x, spectra.h = spec_x, spec_h
        grad_y = grad_y.contiguous()
        grad_x = grad_k = None
        if ctx.needs_input_grad[0]:
            if _grad_input_path(ctx.shape, ctx.j) == "taps":
                coef = _window_coef(kernel, ctx.start, ctx.j)
                grad_x = _taps_grad_input(grad_y, coef, ctx.start, ksize, t_len).contiguous()
            else:
                grad_x = _fft_grad_input(grad_y, kernel, t_len, spectra).contiguous()
        if ctx.needs_input_grad[1]:
            if ptr is not None:
                rows = _RowEvents.filled((t_len, ctx.shape.b, n_in), ptr, idx, val)
                grad_k = _event_grad(rows, grad_y, n_out, ksize)
            else:
                grad_k = _fft_grad_kernel(x, grad_y, ksize, spectra)
        return grad_x, grad_k, None, None


def positive_setting(name: str, unit: str) -> int | None:
    """The positive integer in ``$name``; None where it is unset or empty."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive number of {unit}, got {value!r}")
    return number


FFT_AUTO_BLOCKS = 4  # most batch blocks the spectral path takes by itself (see fft_batch_blocks)


def fft_batch_blocks(batch: int, n_in: int | None = None, n_out: int | None = None) -> list[slice]:
    """Batch blocks of the spectral path: ``$SNN_DELAYS_FFT_BATCH`` samples each where it is set.

    Otherwise a layer whose kernel-sized spectra (O x I per frequency) are smaller than its
    batch-sized ones (B x max(I, O): x's, dL/dy's, their products) runs in up to
    ``FFT_AUTO_BLOCKS`` blocks, as many as the ratio of the two: only the batch-sized spectra
    shrink with the block, and they are the layer's peak. That is the readout (256 -> 20 on
    SHD: 4 blocks of 64 samples; SSC's 512 -> 35: 3); square hidden layers, whose dL/dk spectra
    are as large as x's at any block size, run in one. Each block's spectra and cuFFT
    temporaries are freed before the next, at one more set of launches per block (free under
    CUDA graphs)."""
    size = positive_setting("SNN_DELAYS_FFT_BATCH", "samples")
    if size is None:
        count = 1
        if n_in is not None and n_out is not None:
            count = min(FFT_AUTO_BLOCKS, max(1, batch * max(n_in, n_out) // max(1, n_in * n_out)))
        size = -(-batch // count)
    return [slice(b0, min(batch, b0 + size)) for b0 in range(0, batch, size)]


class _DelayConvFFT(torch.autograd.Function):
    """The spectral path for all three products, on any device (``impl="fft"``).

    Nothing spectral is kept from the forward for the backward (the spectra of every layer's
    x and kernel would all be alive when the backward starts, the step's peak): the backward
    transforms x and the kernel again. Each spectrum is dropped after its last use, and the
    forward drops x's and the kernel's before its inverse transform. With several batch blocks
    (:func:`fft_batch_blocks`) each block is transformed in turn; the backward then makes
    dL/dk over all blocks first, so that x (a saved tensor that :class:`~snn_delays.model.SavedSpikes`
    may have unpacked for this backward alone) is freed before dL/dx is allocated."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor) -> Tensor:  # noqa: ANN001
        n_out, n_in, ksize = kernel.shape
        ctx.n = _fft_len(x.shape[0], ksize)
        t_out = x.shape[0] + (ksize - 1) // 2
        ctx.blocks = fft_batch_blocks(x.shape[1], n_in, n_out)
        ctx.save_for_backward(x, kernel)
        kernel = kernel.detach()
        spectra = _Spectra(ctx.n)
        with _tf32(x.device):
            if len(ctx.blocks) == 1:
                return _fft_forward(x, kernel, t_out, spectra, free=True).contiguous()
            spectra.of_h(kernel)
            y = x.new_empty(t_out, x.shape[1], n_out)
            for block in ctx.blocks:
                y[:, block] = _fft_forward(x[:, block], kernel, t_out, spectra.sharing_h(), free=True)
        return y

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_y: Tensor):  # noqa: ANN001, ANN205
        x, kernel = ctx.saved_tensors
        t_len, batch, n_in = x.shape
        grad_y = grad_y.contiguous()
        grad_x = grad_k = None
        spectra = _Spectra(ctx.n)
        with _tf32(x.device):
            if len(ctx.blocks) == 1:
                if ctx.needs_input_grad[1]:  # first: X's spectrum is freed before dL/dx is made
                    spectra.of_x(x)
                    del x  # a saved tensor kept compactly (model.SavedSpikes): freed once transformed
                    spectra.of_g(grad_y)
                    spec_k = _fft_grad_kernel_spectrum(None, grad_y, spectra, free_x=True)
                    grad_k = _grad_kernel_from_spectrum(spec_k, ctx.n, kernel.shape[2], spectra.g_conj)
                    del spec_k
                if ctx.needs_input_grad[0]:
                    grad_x = _fft_grad_input(grad_y, kernel, t_len, spectra, free=True).contiguous()
                return grad_x, grad_k
            if ctx.needs_input_grad[1]:  # dL/dk over every block, then x is no longer needed
                spec_k = None
                for block in ctx.blocks:
                    part_spectra = _Spectra(ctx.n)  # g_conj: the same for every block (one device)
                    part = _fft_grad_kernel_spectrum(x[:, block], grad_y[:, block], part_spectra)
                    spec_k = part if spec_k is None else spec_k.add_(part)
                    del part
                grad_k = _grad_kernel_from_spectrum(spec_k, ctx.n, kernel.shape[2], part_spectra.g_conj)
                del spec_k
            del x
            if ctx.needs_input_grad[0]:
                grad_x = grad_y.new_empty(t_len, batch, n_in)
                spectra.of_h(kernel)
                for block in ctx.blocks:
                    grad_x[:, block] = _fft_grad_input(
                        grad_y[:, block], kernel, t_len, spectra.sharing_h(), free=True
                    )
        return grad_x, grad_k


# --------------------------------------------------------------------------------------
# GEMM path (CUDA): the delay conv as one matrix product over time-shifted copies
# --------------------------------------------------------------------------------------
#
# With time-major rows r = (t, b), the padded input ``xp`` (T', B, I) and the output y
# (T_out, B, O), T' = T_out + K - 1:
#
#   y[t, b, :] = sum_n xp[t + n, b, :] @ k[:, :, n]^T
#
# is one GEMM once either side is unfolded over the K taps (a gather, one copy kernel):
# - input side (I <= O): U[(t,b), (n,i)] = xp[t+n, b, i], y = U @ k as (K*I, O);
# - output side (O < I): P = xp @ k as (I, K*O), y[t,b,o] = sum_n P[t+n, b, n, o].
# The copy is K x min(I, O) channels wide; no cuDNN algorithm choice, no workspace. dL/dk is
# the transposed product with the same unfolding, dL/dx the forward of dL/dy (padded) with
# the flipped, transposed kernel. On CUDA the products run in TF32 when cuDNN's convolutions
# may (:func:`conv_allows_tf32`: the precision of the reference's cuDNN conv, on by default),
# in full float32 otherwise.


GEMM_CHUNK = 1 << 28  # floats of one unfolded block (1 GiB): bounds the extra memory
# A smaller block (1 << 25) kept the SHD step's peak below the reference's on an H200 but
# made the step host-bound (13.9 ms instead of 10.5 ms): more launches. See FAST_DELAYS.md.


EVAL_CHUNK = 1 << 24  # floats (64 MiB): the unfolded block without gradients (evaluation)
# Evaluation keeps no activations for a backward, so a 1 GiB block would be its whole peak:
# the SHD hidden layer unfolds to 0.8 GB at batch 256, the reference's evaluation step holds
# ~0.2 GB. Time blocks cost no extra traffic (each unfolded row is written and read once);
# their launches (~20 per SHD step) are free under CUDA graphs.


def gemm_chunk() -> int:
    """Floats of one unfolded block: ``$SNN_DELAYS_GEMM_CHUNK``, else ``GEMM_CHUNK``."""
    return positive_setting("SNN_DELAYS_GEMM_CHUNK", "floats") or GEMM_CHUNK


def eval_chunk() -> int:
    """Floats of one unfolded block when no gradient is needed: ``$SNN_DELAYS_EVAL_CHUNK``,
    else ``EVAL_CHUNK``, at most :func:`gemm_chunk`. Smaller blocks lower evaluation's peak
    (SHD, batch 256: 153 MiB of tensors in 64 MiB blocks, 120 in 32, 101 in 16); larger ones
    run fewer, larger products."""
    return min(gemm_chunk(), positive_setting("SNN_DELAYS_EVAL_CHUNK", "floats") or EVAL_CHUNK)


def eval_fp16() -> bool:
    """``$SNN_DELAYS_EVAL_FP16`` (``1`` / ``0``, default ``0``): CUDA's evaluation runs the
    products of a layer whose input is spikes (every delay layer after the first) on float16
    operands, accumulated and written in float32, where the products may be TF32 anyway
    (:func:`conv_allows_tf32`). Spikes are exact in float16, and a weight rounded to float16
    keeps the 11 significant bits that TF32 keeps; the unfolded block then moves half the
    bytes, and float16 tensor cores run twice TF32's rate. Not yet timed on a GPU: off by
    default until it is (``gpu_check.sh`` part 8)."""
    value = os.environ.get("SNN_DELAYS_EVAL_FP16", "").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"SNN_DELAYS_EVAL_FP16 must be 0 or 1, got {value!r}")
    return value == "1"


def _chunks(t_len: int, row: int, budget: int | None = None) -> list[tuple[int, int]]:
    """Time ranges whose unfolded rows (``row`` floats per step) fit in ``budget`` floats
    (default :func:`gemm_chunk`)."""
    step = max(1, (budget or gemm_chunk()) // max(1, row))
    return [(t0, min(t_len, t0 + step)) for t0 in range(0, t_len, step)]


def _unfold(
    src: Tensor, t0: int, t1: int, ksize: int, flip: bool = False, dtype: torch.dtype | None = None
) -> Tensor:
    """((t1 - t0) B, K C) rows ``src[t + n, b, :]`` (``src[t + K-1-n]`` with ``flip``), a copy
    (as ``dtype``, in the same copy, where given)."""
    batch, ch = src.shape[1:]
    u = src[t0 : t1 + ksize - 1].as_strided((t1 - t0, batch, ksize, ch), (batch * ch, ch, batch * ch, 1))
    if flip:
        u = u.flip(2)
    if dtype is not None and dtype != u.dtype:
        u = u.to(dtype, memory_format=torch.contiguous_format)
    return u.reshape((t1 - t0) * batch, ksize * ch)


def _shift_sum(p: Tensor, t_out: int, batch: int, ksize: int, ch: int) -> Tensor:
    """``y[t, b, c] = sum_n p[t + n, b, n, c]`` from ``p`` (T', B, K, C) contiguous."""
    p = p.contiguous()
    row = batch * ksize * ch
    view = p.as_strided((t_out, batch, ch, ksize), (row, ksize * ch, 1, row + ch))
    return view.sum(-1)


# torch >= 2.9: the ``fp32_precision`` settings, whose users' flags the legacy getters
# (``allow_tf32``, ``get_float32_matmul_precision``) refuse to read ("mix of the legacy and new
# APIs"): read them instead wherever they exist. Fixed for the process: checked once.
_NEW_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
    torch.backends.cudnn, "conv"
)


def conv_allows_tf32() -> bool:
    """Whether cuDNN's float32 convolutions (the reference's) may use TF32: the most specific
    of ``torch.backends.cudnn.conv.fp32_precision``, ``torch.backends.cudnn.fp32_precision``
    and ``torch.backends.fp32_precision`` that is not ``none`` (``conv`` is ``tf32`` by
    default; ``cudnn.allow_tf32 = False`` sets it to ``none``); ``cudnn.allow_tf32`` on an
    older torch."""
    if not _NEW_PRECISION_API:
        return bool(torch.backends.cudnn.allow_tf32)
    b = torch.backends
    for value in (b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, b.fp32_precision):
        if value != "none":
            return value == "tf32"
    return False


class _tf32:  # noqa: N801 - a context manager used like a function
    """TF32 matmuls on CUDA iff cuDNN convs may use TF32 (the reference's precision,
    :func:`conv_allows_tf32`); ``off=True``: full float32 matmuls on CUDA inside the block (the
    DFT products: the precision of a float32 FFT, where TF32 would round every input to 10 bits).

    The flag is changed only where it differs, through the legacy setter (which sets the legacy
    and the new state alike, so neither API's readers see a mix), and put back on exit; with the
    ``fp32_precision`` API the user's own string (``none``, ``ieee``, ``tf32``, ...) is restored."""

    def __init__(self, device: torch.device, off: bool = False) -> None:
        self.on = device.type == "cuda"
        self.value = False if off else (self.on and conv_allows_tf32())

    def __enter__(self) -> None:
        self.restore = None
        if not self.on:
            return
        matmul = torch.backends.cuda.matmul
        if _NEW_PRECISION_API:
            old = matmul.fp32_precision
            if (old == "tf32") != self.value:
                self.restore = old
                matmul.allow_tf32 = self.value
        elif bool(matmul.allow_tf32) != self.value:
            self.restore = not self.value
            matmul.allow_tf32 = self.value

    def __exit__(self, *exc: object) -> None:
        if self.restore is None:
            return
        matmul = torch.backends.cuda.matmul
        if isinstance(self.restore, str):
            matmul.allow_tf32 = self.restore == "tf32"
            matmul.fp32_precision = self.restore
        else:
            matmul.allow_tf32 = self.restore


EMULATED_ROWS = 1 << 20  # floats of ``a`` per product of the CPU's stand-in for float16 operands
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")  # torch >= 2.8: float16 in, float32 out


def _mm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b``. float16 operands with a float32 ``out``: on CUDA one GEMM that
    accumulates and writes in float32 (``torch.mm(..., out_dtype=)``, torch >= 2.8); on the CPU
    (tests, ``SNN_DELAYS_NO_C``), which has no such kernel, the same products in float32, in row
    blocks of at most ``EMULATED_ROWS`` floats of ``a`` (no float32 copy of a whole block)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif a.device.type != "cpu":
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        step = max(1, EMULATED_ROWS // max(1, a.shape[1]))
        wide = b.to(out.dtype)
        for r0 in range(0, a.shape[0], step):
            torch.mm(a[r0 : r0 + step].to(out.dtype), wide, out=out[r0 : r0 + step])


def _window(src: Tensor, t0: int, t1: int, lead: int) -> Tensor:
    """Steps t0 .. t1-1 of ``src`` behind ``lead`` zero steps and followed by zeros: a view of
    ``src`` where no zero falls inside, else a zero-padded copy of those steps only."""
    lo, hi = t0 - lead, t1 - lead
    if lo >= 0 and hi <= src.shape[0]:
        return src[lo:hi]
    part = src[max(lo, 0) : max(min(hi, src.shape[0]), 0)]
    before = max(0, -lo)
    return F.pad(part, (0, 0, 0, 0, before, (hi - lo) - before - part.shape[0]))


def _unfold_mm(
    src: Tensor, w: Tensor, t_out: int, ksize: int, budget: int | None = None, lead: int = 0
) -> Tensor:
    """``out[t] = sum_n s[t + n] @ w[n]`` with ``w`` (K C, N), ``s`` = ``src`` behind ``lead``
    zero steps and followed by zeros: (t_out, B, N), in time chunks of at most ``budget``
    unfolded floats (:func:`_chunks`). No padded copy of ``src``: only a chunk whose window
    reaches a zero step unfolds from a padded copy of its own steps. The blocks are unfolded
    as ``w``'s dtype (float16 operands for a float32 ``src``: :func:`_mm_into`), ``out`` is
    ``src``'s."""
    batch, ch = src.shape[1:]
    out = torch.empty(t_out, batch, w.shape[1], device=src.device, dtype=src.dtype)
    for t0, t1 in _chunks(t_out, batch * ksize * ch, budget):
        unfolded = _unfold(_window(src, t0, t1 + ksize - 1, lead), 0, t1 - t0, ksize, dtype=w.dtype)
        _mm_into(unfolded, w, out[t0:t1].view(-1, w.shape[1]))
        del unfolded  # before the next block's
    return out


def _output_side_mm(x: Tensor, w: Tensor, t_out: int, ksize: int, budget: int | None = None) -> Tensor:
    """The delay conv with the taps on the output side (O < I): ``p = s @ w`` as (I, K O) with
    ``s`` = x padded as :func:`pad_time` pads it, ``y[t, b, o] = sum_n p[t + n, b, n, o]``, in
    time chunks whose ``p`` (with its K-1 steps of overlap) holds at most ``budget`` floats. No
    padded copy of x: the rows of ``p`` from zero steps are zeroed. x's rows of a block are
    multiplied as ``w``'s dtype, ``p`` and y are x's (as :func:`_unfold_mm`)."""
    t_len, batch, _ = x.shape
    n_out = w.shape[1] // ksize
    row = batch * ksize * n_out
    budget = max(row, (budget or gemm_chunk()) - (ksize - 1) * row)  # the overlap's rows held back
    y = torch.empty(t_out, batch, n_out, device=x.device, dtype=x.dtype)
    for t0, t1 in _chunks(t_out, row, budget):
        p = torch.empty(t1 - t0 + ksize - 1, batch, ksize * n_out, device=x.device, dtype=x.dtype)
        lo = t0 - (ksize - 1)  # the step of x at p's first row
        first, last = max(lo, 0), min(t1, t_len)  # the steps of x inside this window
        p[: first - lo].zero_()
        p[max(last - lo, first - lo) :].zero_()
        if last > first:
            rows = x[first:last].reshape(-1, x.shape[2]).to(w.dtype)
            _mm_into(rows, w, p[first - lo : last - lo].view(-1, w.shape[1]))
            del rows
        y[t0:t1] = _shift_sum(p.view(-1, batch, ksize, n_out), t1 - t0, batch, ksize, n_out)
        del p  # before the next block's
    return y


def gemm_conv(x: Tensor, kernel: Tensor, budget: int | None = None) -> Tensor:
    """``y`` (T + (K-1)//2, B, O) = the delay conv of ``x`` (T, B, I) with ``kernel`` (O, I, K);
    ``budget``: floats of one unfolded block (default :func:`gemm_chunk`)."""
    n_out, n_in, ksize = kernel.shape
    if n_in <= n_out:
        w = kernel.permute(2, 1, 0).reshape(ksize * n_in, n_out)
    else:
        w = kernel.permute(1, 2, 0).reshape(n_in, ksize * n_out)
    return _gemm_conv_w(x, w, n_in, n_out, ksize, budget)


def _gemm_conv_w(x: Tensor, w: Tensor, n_in: int, n_out: int, ksize: int, budget: int | None) -> Tensor:
    """:func:`gemm_conv` from the kernel already in its GEMM layout ``w``: (K I, O) when
    I <= O (taps on the input side), else (I, K O). y is x's dtype; x is multiplied as
    ``w``'s (float16 weights: float16 operands, :func:`_integer_gemm_conv`)."""
    t_out = x.shape[0] + (ksize - 1) // 2
    x = x.contiguous()
    with _tf32(x.device):
        if n_in <= n_out:
            return _unfold_mm(x, w, t_out, ksize, budget, lead=ksize - 1)
        return _output_side_mm(x, w, t_out, ksize, budget)


def _integer_gemm_conv(
    x: Tensor, weight: Tensor, taps: Tensor, ksize: int, budget: int, fp16: bool = False
) -> Tensor:
    """:func:`gemm_conv` of the one-tap kernel ``k[o, i, taps[o, i]] = weight[o, i]``, without
    gradients: the weight is scattered straight into the GEMM's layout, so no (O, I, K) kernel
    is held beside its permuted copy (one kernel-sized buffer, not two, and one copy less).
    ``fp16``: x and the weights as float16 operands (x must be exact in float16, as spikes
    are; cast in the unfolding copy, no float16 copy of x), the products accumulated and
    written in float32 (:func:`eval_fp16`)."""
    n_out, n_in = weight.shape
    idx = taps.t().long()  # (I, O)
    src = weight.detach().t()
    if fp16:
        src = src.to(torch.float16)
    if n_in <= n_out:  # w[(n, i), o]
        w = torch.zeros(ksize, n_in * n_out, device=weight.device, dtype=src.dtype)
        w.scatter_(0, idx.reshape(1, -1), src.reshape(1, -1))
        w = w.view(ksize * n_in, n_out)
    else:  # w[i, (n, o)]
        w = torch.zeros(n_in, ksize, n_out, device=weight.device, dtype=src.dtype)
        w.scatter_(1, idx.unsqueeze(1), src.unsqueeze(1))
        w = w.view(n_in, ksize * n_out)
    return _gemm_conv_w(x, w, n_in, n_out, ksize, budget)


def _gemm_grad_kernel(x: Tensor, grad_y: Tensor, ksize: int) -> Tensor:
    """dL/dk (O, I, K) = sum_(t,b) xp[t + n, b, i] g[t, b, o]."""
    t_out, batch, n_out = grad_y.shape
    n_in = x.shape[2]
    xp = pad_time(x, ksize).contiguous()
    with _tf32(x.device):
        if n_in <= n_out:
            gk = torch.zeros(ksize * n_in, n_out, device=x.device, dtype=x.dtype)
            for t0, t1 in _chunks(t_out, batch * ksize * n_in):
                gk.addmm_(_unfold(xp, t0, t1, ksize).t(), grad_y[t0:t1].reshape(-1, n_out))
            return gk.view(ksize, n_in, n_out).permute(2, 1, 0)
        # ug[(s, b), (n, o)] = g[s - n, b, o]: g padded by K-1 on both sides, taps reversed
        gp = F.pad(grad_y, (0, 0, 0, 0, ksize - 1, ksize - 1))
        gk = torch.zeros(n_in, ksize * n_out, device=x.device, dtype=x.dtype)
        for t0, t1 in _chunks(xp.shape[0], batch * ksize * n_out):
            gk.addmm_(xp[t0:t1].reshape(-1, n_in).t(), _unfold(gp, t0, t1, ksize, flip=True))
        return gk.view(n_in, ksize, n_out).permute(2, 0, 1)


def _gemm_grad_input(grad_y: Tensor, kernel: Tensor, t_len: int) -> Tensor:
    """dL/dx (T, B, I) = sum_n g[s + K-1-n] @ k[:, :, n]: the conv of g with the flipped k."""
    n_out, n_in, ksize = kernel.shape
    t_out = grad_y.shape[0]
    gp = F.pad(grad_y, (0, 0, 0, 0, 0, t_len + ksize - 1 - t_out)).contiguous()
    with _tf32(grad_y.device):
        w = kernel.flip(2).permute(2, 0, 1).reshape(ksize * n_out, n_in)
        return _unfold_mm(gp, w, t_len, ksize)


def products_function(name: str, conv, grad_input, grad_kernel) -> type[torch.autograd.Function]:  # noqa: ANN001
    """An autograd Function of the delay conv from its three products.

    ``conv(x, kernel)`` -> y, ``grad_input(dL/dy, kernel, T)`` -> dL/dx and
    ``grad_kernel(x, dL/dy, K)`` -> dL/dk, each computed only when asked for.
    """

    def forward(ctx, x: Tensor, kernel: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, kernel)
        return conv(x, kernel.detach())

    def backward(ctx, grad_y: Tensor):  # noqa: ANN001, ANN202
        x, kernel = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_input(grad_y, kernel, x.shape[0]) if ctx.needs_input_grad[0] else None
        grad_k = grad_kernel(x, grad_y, kernel.shape[2]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_k

    methods = {"forward": staticmethod(forward), "backward": staticmethod(first_derivative_only(backward))}
    return type(name, (torch.autograd.Function,), methods)


_DelayConvGEMM = products_function("_DelayConvGEMM", gemm_conv, _gemm_grad_input, _gemm_grad_kernel)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _use_c(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and _load_lib() is not None


def _params_like(x: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
    """``params`` in x's dtype: cast under ``torch.autocast``; otherwise they must share it, as
    the reference's convolution requires (the C kernels would misread another dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return tuple(p.to(x.dtype) for p in params)
    other = sorted({str(p.dtype) for p in params if p.dtype != x.dtype})
    if other:
        raise TypeError(
            f"the delay layer's input is {x.dtype} but its parameters are {', '.join(other)}: cast the "
            "input or the model to one dtype (x.to(dtype) or model.to(dtype))"
        )
    return params


IMPLS = ("auto", "c", "gemm", "triton", "fft", "dense")


def _triton():  # noqa: ANN202 - the module, imported on first use (triton is optional)
    try:
        return importlib.import_module("snn_delays.triton_delays")
    except ImportError as err:
        raise RuntimeError(
            "SNN_DELAYS_CONV_IMPL=triton needs the triton package: pip install 'snn-delays[triton]'"
        ) from err


SPECTRAL_DTYPES = (torch.float32, torch.float64)  # the spectral path's own precisions


def _path(x: Tensor, impl: str | None) -> str:
    """``c`` (CPU kernels), ``fft`` (CUDA default), ``gemm``, ``triton`` (CUDA) or ``dense``."""
    impl = impl or os.environ.get("SNN_DELAYS_CONV_IMPL") or "auto"
    if impl == "auto":
        if _use_c(x):
            return "c"
        if x.device.type != "cuda":
            return "dense"
        return "fft" if x.dtype in SPECTRAL_DTYPES else "gemm"  # half types: tensor-core GEMMs
    if impl not in IMPLS:
        raise ValueError(f"delay conv impl (SNN_DELAYS_CONV_IMPL) must be one of {IMPLS}, got {impl!r}")
    if impl == "c" and not _use_c(x):
        raise RuntimeError("the C kernels need a CPU float32 input and a C compiler")
    return impl


def delay_conv_dense(x: Tensor, weight: Tensor, pos: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """Fallback training path: Gaussian-interpolated kernel, dense convolution (any device).

    On the CPU the kernel's subnormal taps (a narrow Gaussian's far ones) are zeroed first, as
    the C kernel does: the convolution multiplies every tap, and each product with a subnormal
    takes a microcode assist on Intel cores (an SHD step at sigma 0.23 took 4x as long)."""
    kernel = gaussian_kernel(weight, pos, sigma, kernel_size)
    if kernel.device.type == "cpu" and kernel.is_floating_point():
        kernel = kernel.masked_fill(kernel.abs() < torch.finfo(kernel.dtype).tiny, 0.0)
    y = F.conv1d(pad_time(x, kernel_size).permute(1, 2, 0), kernel)
    return y.permute(2, 0, 1).contiguous()


def _check_shapes(x: Tensor, weight: Tensor, per_synapse: Tensor) -> None:
    """x (T, B, in), weight and positions or delays (out, in): the C kernels read by these sizes,
    so a mismatch would read out of bounds."""
    if (
        x.dim() != 3
        or weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or per_synapse.shape != weight.shape
    ):
        raise ValueError(
            f"delay convolution: x must be (T, B, in) and weight, positions / delays (out, in) with the "
            f"same in; got x {tuple(x.shape)}, weight {tuple(weight.shape)}, {tuple(per_synapse.shape)}"
        )


def delay_conv(
    x: Tensor, weight: Tensor, pos: Tensor, sigma: float, kernel_size: int, impl: str | None = None
) -> Tensor:
    """Training path: ``y`` (T + (K-1)//2, B, out) from the DCLS Gaussian kernel.

    ``impl`` (default: ``$SNN_DELAYS_CONV_IMPL``, else ``auto``: ``c`` for CPU float32, ``fft``
    on CUDA, ``gemm`` there for float16 / bfloat16, ``dense`` otherwise) forces a path: ``c``,
    ``fft`` (spectral for all three products, any device: DFTs as products with DFT matrices
    in x's precision, float32 for float16 / bfloat16 inputs, and cuFFT's inverse on CUDA),
    ``gemm`` (unfolded GEMMs, any device), ``triton`` (implicit GEMMs without the unfold copy:
    CUDA, or the Triton interpreter) or ``dense``. x, ``weight`` and ``pos`` share one dtype
    (under ``torch.autocast``, the parameters are cast to x's).
    """
    _check_shapes(x, weight, pos)
    weight, pos = _params_like(x, weight, pos)
    path = _path(x, impl)
    if path == "dense":
        return delay_conv_dense(x, weight, pos, sigma, kernel_size)
    if path == "gemm":
        return _DelayConvGEMM.apply(x, recomputed_gaussian_kernel(weight, pos, sigma, kernel_size))
    if path == "triton":
        td = _triton()
        return td.DelayConv.apply(x, td.gaussian_kernel(weight, pos, sigma, kernel_size))
    if path == "fft":
        kernel = recomputed_gaussian_kernel(weight, pos, sigma, kernel_size)
        if x.dtype in SPECTRAL_DTYPES:
            return _DelayConvFFT.apply(x, kernel)
        # float16 / bfloat16 (no complex products for them): the spectra in float32
        return _DelayConvFFT.apply(x.float(), kernel.float()).to(x.dtype)
    kernel = _GaussKernelCPU.apply(weight, pos, sigma, kernel_size)
    start, j = tap_window(pos, sigma, kernel_size)
    return _DelayConvCPU.apply(x, kernel, start, j)


def integer_delay_conv(
    x: Tensor,
    weight: Tensor,
    delays: Tensor,
    kernel_size: int,
    impl: str | None = None,
    spikes_in: bool = False,
) -> Tensor:
    """Evaluation path: ``y[t,b,o] = sum_i weight[o,i] x[t - delays[o,i], b, i]``.

    Paths as :func:`delay_conv`'s, but ``fft`` becomes ``c`` on the CPU and ``gemm`` elsewhere
    (one tap per synapse leaves a spectrum nothing to save), and ``gemm`` without gradients
    (CUDA's evaluation) unfolds at most :func:`eval_chunk` floats at a time. ``spikes_in``: x
    holds spikes (exact in float16), which :func:`eval_fp16` may multiply as float16.

    A synapse whose delay lies outside ``0 .. K-1`` (a position rounded beyond the kernel: set by
    hand, or from a checkpoint trained without clamping) contributes nothing, as in the
    reference's rounded kernel; no kernel ever indexes outside its window. x and ``weight``
    share one dtype (under ``torch.autocast``, the weights are cast to x's)."""
    _check_shapes(x, weight, delays)
    (weight,) = _params_like(x, weight)
    outside = (delays < 0) | (delays >= kernel_size)  # elementwise: no host synchronisation
    weight = weight.masked_fill(outside, 0.0)
    delays = delays.clamp(0, kernel_size - 1)
    taps = (kernel_size - 1 - delays).to(torch.int32)  # tap index of each synapse
    path = _path(x, impl)
    if path == "fft":  # one tap per synapse: nothing for a spectrum to save
        path = "c" if _use_c(x) else "gemm"
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if path == "c" and not grad:
        w = weight.detach().float()
        if _nonzero_fraction(x) <= SCATTER_DENSITY_MAX:
            return _delay_scatter(x, w, delays, x.shape[0] + (kernel_size - 1) // 2, kernel_size)
        return _taps_forward(x, w.unsqueeze(-1), taps, kernel_size).contiguous()
    if path == "gemm" and not grad:
        fp16 = (
            spikes_in
            and x.dtype == torch.float32
            and eval_fp16()
            and (x.device.type == "cpu" or (x.is_cuda and conv_allows_tf32()))
        )
        if fp16 and x.is_cuda and not _MM_OUT_DTYPE:
            raise RuntimeError(
                f"SNN_DELAYS_EVAL_FP16=1 needs torch >= 2.8 (torch.mm's out_dtype); this is {torch.__version__}: "
                "unset it"
            )
        return _integer_gemm_conv(x, weight, taps, kernel_size, eval_chunk(), fp16)
    kernel = torch.zeros(*weight.shape, kernel_size, device=weight.device, dtype=weight.dtype)
    kernel = kernel.scatter(-1, taps.long().unsqueeze(-1), weight.unsqueeze(-1))
    if path == "gemm":
        return _DelayConvGEMM.apply(x, kernel)
    if path == "triton":
        return _triton().DelayConv.apply(x, kernel)
    y = F.conv1d(pad_time(x, kernel_size).permute(1, 2, 0), kernel)
    return y.permute(2, 0, 1).contiguous()
