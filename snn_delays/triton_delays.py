r"""Triton kernels of the delay convolution: implicit GEMMs that read the shifted rows in place.

The GEMM path of :mod:`snn_delays.fast_delays` unfolds the input over the ``K`` taps (one
``T B x K C`` copy per product) so that each product is one ``torch.mm``. These kernels
compute the same sums without that copy: rows are ``(t, b)`` of a time-major tensor, so the
input at step ``t + n + shift`` of row ``(t, b)`` is row ``r + (n + shift) B`` of the same
matrix, read straight from global memory (rows outside ``[0, T_src)`` are the zero padding).

- :func:`shift_mm`: ``dst[t, b, :] = sum_n src[t + n + shift, b, :] @ w[n]``. The forward
  (``src = x``, ``w[n] = k[:, :, n].T``, ``shift = -(K-1)``) and ``dL/dx`` (``src = dL/dy``,
  ``w[m] = k[:, :, K-1-m]``, ``shift = 0``) are both this kernel.
- :func:`shift_grad_w`: ``dw[n] = sum_(t,b) src[t + n + shift, b, :]^T g[t, b, :]``, the
  kernel's gradient, split over row blocks (one partial sum each, added by ``torch.sum``:
  deterministic, no atomics) when ``K x tiles`` alone would leave SMs idle.

Precision follows the reference's convolutions: TF32 tensor-core products iff cuDNN's may use
TF32 (:func:`snn_delays.fast_delays.conv_allows_tf32`, cuDNN's default), else IEEE float32. On
a CUDA device the block sizes are autotuned per shape on the first call. With
``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run in Triton's
interpreter on CPU tensors, with fixed blocks: that is how the tests hold them to the
reference without a GPU.

Not timed yet on a GPU (see ``experiments/FAST_DELAYS.md``): selected only by
``SNN_DELAYS_CONV_IMPL=triton`` / ``impl="triton"``.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from snn_delays.fast_delays import (
    NORM_EPS,
    SIGMA_OFFSET,
    conv_allows_tf32,
    first_derivative_only,
    products_function,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SPLIT_ROWS = 4096  # rows (t, b) per partial sum of dL/dk
SPLIT_FLOATS = 1 << 24  # at most this many floats of partial sums (64 MiB)


def _configs(names: str, rows: list[tuple[int, ...]]) -> list[triton.Config]:
    """Autotune configs from rows of (block sizes named by ``names``..., warps, stages)."""
    return [
        triton.Config(dict(zip(names.split(), r[:-2], strict=True)), num_warps=r[-2], num_stages=r[-1])
        for r in rows
    ]


# (BM, BN, BK, warps, stages) of the products; (BI, BO, BM, warps, stages) of dL/dk
_MM_CONFIGS = _configs(
    "BM BN BK",
    [
        (64, 64, 32, 4, 3),
        (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 64, 16, 4, 4),
        (64, 32, 32, 2, 4),
    ],
)
_GW_CONFIGS = _configs(
    "BI BO BM",
    [(64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (32, 32, 128, 4, 3)],
)
_MM_INTERPRET = {"BM": 16, "BN": 16, "BK": 16}
_GW_INTERPRET = {"BI": 16, "BO": 16, "BM": 16}


def _tuned(configs: list, key: list[str]):  # noqa: ANN202
    """Autotune on CUDA; the interpreter cannot time, so there the launch passes fixed blocks."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


@_tuned(_MM_CONFIGS, key=["C_in", "C_out", "B", "K", "PREC"])
@triton.jit
def _shift_mm_kernel(
    src,
    w,
    dst,
    T_src,
    T_dst,
    B,
    C_in,
    C_out,
    shift,
    K,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # destination rows (t, b)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < T_dst * B
    col_ok = cols < C_out
    t = rows // B
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    n_cb = (C_in + BK - 1) // BK
    for it in range(K * n_cb):  # one flat loop over (tap, channel block): one software pipeline
        n = it // n_cb
        ci = (it % n_cb) * BK + tl.arange(0, BK)
        ci_ok = ci < C_in
        ts = t + n + shift
        ok = row_ok & (ts >= 0) & (ts < T_src)
        src_rows = rows + (n + shift) * B
        a = tl.load(
            src + src_rows[:, None] * C_in + ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0
        )
        b = tl.load(
            w + (n * C_in + ci[:, None]) * C_out + cols[None, :],
            mask=ci_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(dst + rows[:, None] * C_out + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@_tuned(_GW_CONFIGS, key=["C_in", "C_out", "B", "K", "PREC"])
@triton.jit
def _shift_grad_w_kernel(
    src,
    g,
    dw,
    T_src,
    T_g,
    B,
    C_in,
    C_out,
    shift,
    split_rows,
    K,
    PREC: tl.constexpr,
    BI: tl.constexpr,
    BO: tl.constexpr,
    BM: tl.constexpr,
):
    n = tl.program_id(0)
    n_o = (C_out + BO - 1) // BO
    ci = (tl.program_id(1) // n_o) * BI + tl.arange(0, BI)
    co = (tl.program_id(1) % n_o) * BO + tl.arange(0, BO)
    ci_ok = ci < C_in
    co_ok = co < C_out
    split = tl.program_id(2)
    r_end = tl.minimum((split + 1) * split_rows, T_g * B).to(tl.int64)
    acc = tl.zeros((BI, BO), dtype=tl.float32)
    for r0 in range(split * split_rows, r_end, BM):
        rows = r0 + tl.arange(0, BM).to(tl.int64)
        ok = rows < r_end
        ts = rows // B + n + shift
        ok_src = ok & (ts >= 0) & (ts < T_src)
        a = tl.load(
            src + (rows + (n + shift) * B)[None, :] * C_in + ci[:, None],
            mask=ci_ok[:, None] & ok_src[None, :],
            other=0.0,
        )
        b = tl.load(g + rows[:, None] * C_out + co[None, :], mask=ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    out = dw + ((split * K + n) * C_in + ci[:, None]).to(tl.int64) * C_out + co[None, :]
    tl.store(out, acc, mask=ci_ok[:, None] & co_ok[None, :])


@triton.jit
def _gauss_fwd_kernel(w, p, k, S, K, c0, s, eps, R: tl.constexpr, KP: tl.constexpr):
    """``k[r, n] = w[r] g[n] / (sum g + eps)``, ``g[n] = exp(-((n - p[r] - K//2) / s)^2 / 2)``."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    n = tl.arange(0, KP)
    r_ok = r < S
    n_ok = n < K
    c = tl.load(p + r, mask=r_ok, other=0.0) + c0
    d = (n[None, :].to(tl.float32) - c[:, None]) / s
    g = tl.where(n_ok[None, :], tl.exp(-0.5 * (d * d)), 0.0)
    gn = g / (tl.sum(g, axis=1) + eps)[:, None]
    wv = tl.load(w + r, mask=r_ok, other=0.0)
    tl.store(
        k + r[:, None].to(tl.int64) * K + n[None, :], wv[:, None] * gn, mask=r_ok[:, None] & n_ok[None, :]
    )


@triton.jit
def _gauss_bwd_kernel(w, p, dk, dw, dp, S, K, c0, s, eps, R: tl.constexpr, KP: tl.constexpr):
    """``dL/dw = sum_n dk gn``; ``dL/dp = w (sum_n dk gn u - (sum_n dk gn) sum_m gn u) / s^2``,
    ``u = n - c``: the Gaussian recomputed, nothing of size (S, K) kept from the forward."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    n = tl.arange(0, KP)
    r_ok = r < S
    n_ok = n < K
    c = tl.load(p + r, mask=r_ok, other=0.0) + c0
    u = n[None, :].to(tl.float32) - c[:, None]
    d = u / s
    g = tl.where(n_ok[None, :], tl.exp(-0.5 * (d * d)), 0.0)
    gn = g / (tl.sum(g, axis=1) + eps)[:, None]
    g_k = tl.load(
        dk + r[:, None].to(tl.int64) * K + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0
    )
    a = tl.sum(g_k * gn, axis=1)
    b = tl.sum(g_k * gn * u, axis=1)
    m = tl.sum(gn * u, axis=1)
    wv = tl.load(w + r, mask=r_ok, other=0.0)
    tl.store(dw + r, a, mask=r_ok)
    tl.store(dp + r, wv * (b - a * m) / (s * s), mask=r_ok)


def _precision(device: torch.device) -> str:
    return "tf32" if device.type == "cuda" and conv_allows_tf32() else "ieee"


def check_tensors(what: str, *tensors: Tensor) -> None:
    """``what`` (the Triton kernels named for the error) runs on these: float32, on CUDA (or
    Triton's interpreter)."""
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"{what} take float32 tensors, got {t.dtype}")
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"{what} need a CUDA device (or TRITON_INTERPRET=1, set before triton is first "
                "imported, to run them on the CPU for testing)"
            )


def device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``x``'s GPU: Triton launches on the current device, which need not be x's (a
    model moved to ``cuda:1`` in a process whose current device is ``cuda:0``)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check(*tensors: Tensor) -> None:
    check_tensors("the Triton delay kernels", *tensors)


def shift_mm(src: Tensor, w: Tensor, t_dst: int, shift: int) -> Tensor:
    """``dst`` (t_dst, B, N): ``dst[t] = sum_n src[t + n + shift] @ w[n]``, ``w`` (K, C, N)."""
    _check(src, w)
    src, w = src.contiguous(), w.contiguous()
    t_src, batch, c_in = src.shape
    ksize, _, c_out = w.shape
    dst = torch.empty(t_dst, batch, c_out, device=src.device, dtype=torch.float32)
    if dst.numel() == 0:
        return dst
    meta = _MM_INTERPRET if INTERPRET else {}

    def grid(m: dict) -> tuple[int, int]:
        return triton.cdiv(t_dst * batch, m["BM"]), triton.cdiv(c_out, m["BN"])

    with device_of(src):
        _shift_mm_kernel[grid](
            src, w, dst, t_src, t_dst, batch, c_in, c_out, shift, K=ksize, PREC=_precision(src.device), **meta
        )
    return dst


def _splits(rows: int, weights: int) -> int:
    """Row blocks of dL/dk: enough programs for the SMs, partial sums within SPLIT_FLOATS."""
    return max(1, min(triton.cdiv(rows, SPLIT_ROWS), SPLIT_FLOATS // max(1, weights)))


def shift_grad_w(src: Tensor, g: Tensor, ksize: int, shift: int) -> Tensor:
    """``dw`` (K, C, N): ``dw[n] = sum_(t,b) src[t + n + shift, b]^T g[t, b]``, ``g`` (T, B, N)."""
    _check(src, g)
    src, g = src.contiguous(), g.contiguous()
    t_src, batch, c_in = src.shape
    t_g, _, c_out = g.shape
    rows = t_g * batch
    split = _splits(rows, ksize * c_in * c_out)
    split_rows = triton.cdiv(rows, split)
    dw = torch.empty(split, ksize, c_in, c_out, device=src.device, dtype=torch.float32)
    meta = _GW_INTERPRET if INTERPRET else {}

    def grid(m: dict) -> tuple[int, int, int]:
        return ksize, triton.cdiv(c_in, m["BI"]) * triton.cdiv(c_out, m["BO"]), split

    with device_of(src):
        _shift_grad_w_kernel[grid](
            src,
            g,
            dw,
            t_src,
            t_g,
            batch,
            c_in,
            c_out,
            shift,
            split_rows,
            K=ksize,
            PREC=_precision(src.device),
            **meta,
        )
    return dw[0] if split == 1 else dw.sum(0)


GAUSS_ROWS = 32  # synapses per program of the Gaussian kernel


class GaussKernel(torch.autograd.Function):
    """The DCLS Gaussian kernel ``(out, in, K)`` from ``weight``, ``pos`` (out, in): one kernel
    launch each way, instead of a dozen elementwise ops and their saved intermediates."""

    @staticmethod
    def forward(ctx, weight: Tensor, pos: Tensor, sigma: float, ksize: int) -> Tensor:  # noqa: ANN001
        w, p = weight.detach().contiguous(), pos.detach().contiguous()
        _check(w, p)
        kernel = torch.empty(*w.shape, ksize, device=w.device, dtype=torch.float32)
        ctx.args = (ksize, float(ksize // 2), abs(float(sigma)) + SIGMA_OFFSET, NORM_EPS)
        with device_of(w):
            _gauss_fwd_kernel[(triton.cdiv(w.numel(), GAUSS_ROWS),)](
                w, p, kernel, w.numel(), *ctx.args, R=GAUSS_ROWS, KP=triton.next_power_of_2(ksize)
            )
        ctx.save_for_backward(w, p)
        return kernel

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_k: Tensor):  # noqa: ANN001, ANN205
        w, p = ctx.saved_tensors
        dw, dp = torch.empty_like(w), torch.empty_like(p)
        ksize = ctx.args[0]
        with device_of(w):
            _gauss_bwd_kernel[(triton.cdiv(w.numel(), GAUSS_ROWS),)](
                w,
                p,
                grad_k.contiguous(),
                dw,
                dp,
                w.numel(),
                *ctx.args,
                R=GAUSS_ROWS,
                KP=triton.next_power_of_2(ksize),
            )
        return dw, dp, None, None


def gaussian_kernel(weight: Tensor, pos: Tensor, sigma: float, ksize: int) -> Tensor:
    """:func:`snn_delays.fast_delays.gaussian_kernel` on the Triton kernels."""
    return GaussKernel.apply(weight, pos, sigma, ksize)


def conv(x: Tensor, kernel: Tensor) -> Tensor:
    """``y`` (T + (K-1)//2, B, O): the delay conv of ``x`` (T, B, I) with ``kernel`` (O, I, K)."""
    ksize = kernel.shape[2]
    return shift_mm(x, kernel.permute(2, 1, 0), x.shape[0] + (ksize - 1) // 2, -(ksize - 1))


def grad_input(grad_y: Tensor, kernel: Tensor, t_len: int) -> Tensor:
    """dL/dx (T, B, I) = ``sum_m g[s + m] @ k[:, :, K-1-m]``."""
    return shift_mm(grad_y, kernel.flip(2).permute(2, 0, 1), t_len, 0)


def grad_kernel(x: Tensor, grad_y: Tensor, ksize: int) -> Tensor:
    """dL/dk (O, I, K) = ``sum_(t,b) g[t, b, o] x[t + n - (K-1), b, i]``."""
    return shift_grad_w(x, grad_y, ksize, -(ksize - 1)).permute(2, 1, 0)


DelayConv = products_function("DelayConv", conv, grad_input, grad_kernel)  # the delay conv on these kernels


def compile_for(capability: int = 90, ksize: int = 25) -> list[dict]:
    """Compile every Triton kernel (delays, Gaussian, LIF) and autotune config for a CUDA
    ``capability``, without a GPU.

    Ahead-of-time, through Triton's own ``ptxas``: catches what the interpreter does not
    (types, layouts, shared memory). Needs ``TRITON_INTERPRET`` unset when this module is
    imported. Returns one row per (kernel, config): shared memory and the MMA instructions.
    """
    import inspect
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("compile_for needs the compiled kernels: import without TRITON_INTERPRET=1")
    from snn_delays import triton_neurons as tn

    pointers = ("src", "w", "dst", "g", "dw", "p", "k", "dk", "dp", "x", "spk", "h", "v", "gs", "gv", "gx")
    pointers += ("bn_scale", "bn_shift")  # the LIF's folded BatchNorm
    ints = ("T_src", "T_dst", "T_g", "B", "C_in", "C_out", "shift", "split_rows", "S", "K", "T", "M", "C")
    floats = ("c0", "s", "eps", "tau", "thr", "half_alpha", "slope")
    gauss = [triton.Config({"R": GAUSS_ROWS, "KP": triton.next_power_of_2(ksize)})]
    lif_fwd = [  # the LIF module's forward, the fused BatchNorm + LIF's forward and its recompute
        triton.Config({"AFFINE": False, "WANT_S": True, "WANT_H": True, "WANT_V": True, "BLOCK": tn.BLOCK}),
        triton.Config({"AFFINE": True, "WANT_S": True, "WANT_H": False, "WANT_V": False, "BLOCK": tn.BLOCK}),
        triton.Config({"AFFINE": True, "WANT_S": False, "WANT_H": True, "WANT_V": False, "BLOCK": tn.BLOCK}),
    ]
    lif_bwd = [triton.Config({"HAS_GS": True, "HAS_GV": True, "BLOCK": tn.BLOCK})]
    kernels = [
        (_shift_mm_kernel.fn, _MM_CONFIGS, {"PREC": "tf32"}),  # .fn: under the autotuner
        (_shift_grad_w_kernel.fn, _GW_CONFIGS, {"PREC": "tf32"}),
        (_gauss_fwd_kernel, gauss, {}),
        (_gauss_bwd_kernel, gauss, {}),
        (tn._lif_fwd_kernel, lif_fwd, {}),
        (tn._lif_bwd_kernel, lif_bwd, {}),
    ]
    rows = []
    for fn, configs, fixed in kernels:
        sig = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in fixed or name not in pointers + ints + floats:
                sig[name] = "constexpr"
            else:
                sig[name] = "*fp32" if name in pointers else "i32" if name in ints else "fp32"
        for cfg in configs:
            src = ASTSource(fn=fn, signature=sig, constexprs={**fixed, **cfg.kwargs})
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)
            mma = sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync)", compiled.asm["ptx"])))
            rows.append({"kernel": fn.__name__, **cfg.kwargs, "shared": compiled.metadata.shared, "mma": mma})
    return rows


if __name__ == "__main__":  # python -m snn_delays.triton_delays [capability]: compile, no GPU
    import sys

    for row in compile_for(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print(row)
