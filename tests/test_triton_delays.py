"""The Triton delay kernels (implicit GEMMs, no unfold copy), run in Triton's interpreter."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from snn_delays import fast_delays


def _conv64(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The reference delay conv in float64: conv1d over the padded time axis."""
    k = kernel.shape[2]
    return F.conv1d(fast_delays.pad_time(x, k).permute(1, 2, 0), kernel).permute(2, 0, 1)


@pytest.mark.parametrize(
    "shape",  # (T, B, I, O, K): rows and channels off the 16-blocks, I < O and I > O, T < K
    [(9, 3, 4, 6, 5), (11, 5, 37, 20, 7), (6, 4, 18, 33, 9), (13, 1, 3, 2, 1)],
)
@pytest.mark.parametrize("split_rows", [None, 7])  # 7 rows: dL/dk as several partial sums
def test_kernels_equal_conv1d_and_its_gradients(shape, split_rows, triton_interpreted, monkeypatch):
    td = triton_interpreted
    if split_rows:
        monkeypatch.setattr(td, "SPLIT_ROWS", split_rows)
    t, b, n_in, n_out, k = shape
    torch.manual_seed(5)
    x = torch.randn(t, b, n_in, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(n_out, n_in, k, dtype=torch.float64, requires_grad=True)
    want = _conv64(x, kernel)
    g = torch.randn_like(want)
    want_dx, want_dk = torch.autograd.grad(want, (x, kernel), g)

    x32, k32 = x.detach().float().requires_grad_(), kernel.detach().float().requires_grad_()
    y = td.DelayConv.apply(x32, k32)
    assert y.shape == want.shape
    dx, dk = torch.autograd.grad(y, (x32, k32), g.float())
    for got, ref in ((y, want), (dx, want_dx), (dk, want_dk)):
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_splits_cover_every_row(triton_interpreted, monkeypatch):
    """Partial sums of dL/dk over row blocks: every (t, b) row counted once."""
    td = triton_interpreted
    monkeypatch.setattr(td, "SPLIT_ROWS", 5)
    x = torch.ones(8, 3, 2)
    g = torch.ones(8, 3, 4)
    dw = td.shift_grad_w(x, g, 1, 0)  # one tap, no shift: sum over the 24 rows
    assert td._splits(24, 8) > 1
    torch.testing.assert_close(dw, torch.full((1, 2, 4), 24.0))


def test_bad_inputs_get_clear_errors(triton_interpreted, monkeypatch):
    td = triton_interpreted
    with pytest.raises(TypeError, match="float32"):
        td.conv(torch.zeros(4, 2, 3, dtype=torch.float64), torch.zeros(2, 3, 3, dtype=torch.float64))
    monkeypatch.setattr(td, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="CUDA device"):
        td.conv(torch.zeros(4, 2, 3), torch.zeros(2, 3, 3))


def test_missing_triton_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "snn_delays.triton_delays", None)  # import fails
    with pytest.raises(RuntimeError, match=r"snn-delays\[triton\]"):
        fast_delays.delay_conv(
            torch.zeros(4, 2, 3), torch.zeros(2, 3), torch.zeros(2, 3), 1.0, 5, impl="triton"
        )


def test_kernels_compile_for_hopper_with_tensor_cores():
    """Every kernel (delays, Gaussian, LIF) and autotune config compiles for sm_90 (no GPU
    needed), and the large GEMM tiles use wgmma.

    The interpreter runs the kernels' arithmetic, not the compiler: this catches what only the
    GPU build would (types, layouts, shared memory), here.
    """
    pytest.importorskip("triton")
    import json
    import subprocess

    code = "import json; from snn_delays.triton_delays import compile_for; print(json.dumps(compile_for(90)))"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {"_shift_mm_kernel", "_shift_grad_w_kernel", "_gauss_fwd_kernel", "_gauss_bwd_kernel"}
    kernels |= {"_lif_fwd_kernel", "_lif_bwd_kernel"}
    assert {r["kernel"] for r in rows} == kernels
    lif_variants = {(r["AFFINE"], r["WANT_S"], r["WANT_H"]) for r in rows if r["kernel"] == "_lif_fwd_kernel"}
    assert {(True, True, False), (True, False, True)} <= lif_variants  # fused BatchNorm + LIF, its recompute
    assert all(r["shared"] <= 227 * 1024 for r in rows)  # an H100/H200 SM's shared memory
    # tiles of at least 64 x 64 outputs: (BM, BN) of the products, (BI, BO) of dL/dk
    gemms = [r for r in rows if "BM" in r]
    big = [r for r in gemms if min(r.get("BI", r["BM"]), r.get("BN", r.get("BO", 0))) >= 64]
    assert big and all(r["mma"] == ["wgmma.mma_async"] for r in big)


@pytest.mark.parametrize("ksize", [1, 5, 25, 31])
@pytest.mark.parametrize("sigma", [0.23, 2.0, "K//2"])
def test_gaussian_kernel_and_its_gradients(ksize, sigma, triton_interpreted):
    """One Triton launch each way against float64 autograd of the formula (fast_delays)."""
    td = triton_interpreted
    sigma = ksize // 2 if sigma == "K//2" else sigma
    torch.manual_seed(6)
    n_out, n_in, lim = 7, 9, ksize // 2
    w = torch.randn(n_out, n_in, dtype=torch.float64, requires_grad=True)
    p = ((torch.rand(n_out, n_in, dtype=torch.float64) * 2 - 1) * lim).requires_grad_()
    p.data[0, :2] = torch.tensor([-lim, lim], dtype=torch.float64)  # both ends of the range
    want = fast_delays.gaussian_kernel(w, p, sigma, ksize)
    g = torch.randn_like(want)
    want_dw, want_dp = torch.autograd.grad(want, (w, p), g)

    w32, p32 = w.detach().float().requires_grad_(), p.detach().float().requires_grad_()
    got = td.gaussian_kernel(w32, p32, sigma, ksize)
    dw, dp = torch.autograd.grad(got, (w32, p32), g.float())
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dp.double(), want_dp, rtol=1e-4, atol=1e-5 * want_dp.abs().max().item())


def test_every_launch_runs_on_its_tensors_device(triton_interpreted, monkeypatch):
    """Triton launches on the current device, not the tensors': every delay and LIF kernel is
    launched inside ``device_of`` its input (``torch.cuda.device``, so a model on ``cuda:1``
    in a process whose current device is ``cuda:0`` runs there)."""
    from types import SimpleNamespace

    from snn_delays import triton_neurons

    gpu = triton_interpreted.device_of(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(gpu, torch.cuda.device) and gpu.idx == 1
    launched = []
    real = triton_interpreted.device_of

    def recording(x):  # noqa: ANN001, ANN202
        launched.append(x.shape)
        return real(x)

    monkeypatch.setattr(triton_interpreted, "device_of", recording)
    monkeypatch.setattr(triton_neurons, "device_of", recording)
    x = torch.rand(6, 2, 3, requires_grad=True)
    w, p = torch.rand(4, 3, requires_grad=True), torch.rand(4, 3, requires_grad=True)
    kernel = triton_interpreted.gaussian_kernel(w, p, 1.0, 5)
    triton_interpreted.DelayConv.apply(x, kernel).sum().backward()
    assert len(launched) == 5  # Gaussian forward and backward, conv, dL/dx, dL/dk
    launched.clear()
    triton_neurons.lif_multi_step(x.detach().requires_grad_(), 2.0, 1.0, 5.0).sum().backward()
    assert len(launched) == 2  # LIF forward and backward
