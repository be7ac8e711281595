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
    assert td._splits(24, 8, x.device) > 1
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
    """Every autotune config compiles for sm_90 (no GPU needed) and the large ones use wgmma.

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
    assert {r["kernel"] for r in rows} == {"_shift_mm_kernel", "_shift_grad_w_kernel"}
    assert all(r["shared"] <= 227 * 1024 for r in rows)  # an H100/H200 SM's shared memory
    # tiles of at least 64 x 64 outputs: (BM, BN) of the products, (BI, BO) of dL/dk
    big = [r for r in rows if min(r.get("BI", r["BM"]), r.get("BN", r.get("BO", 0))) >= 64]
    assert big and all(r["mma"] == ["wgmma.mma_async"] for r in big)
