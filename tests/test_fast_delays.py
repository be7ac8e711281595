"""The fast delay backend equals the DCLS reference: outputs and gradients, every sigma."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from snn_delays import fast_delays
from snn_delays.delays import DelayLayer

CASES = [  # (T, B, in, out, K, input density)
    (12, 3, 5, 7, 5, 0.3),
    (17, 5, 9, 4, 7, 0.05),
    (20, 17, 6, 11, 9, 1.0),
    (15, 2, 3, 2, 25, 0.5),
    (14, 19, 6, 5, 31, 1.0),  # dense input: the tap path (J <= K/3 at small sigma)
    (16, 6, 7, 3, 25, 0.02),  # sparse input: events forward, taps dL/dx
    (13, 4, 6, 6, 7, 0.3),  # in == out: the spectral dL/dx written over dL/dy's spectrum
]


def _pair(n_in: int, n_out: int, k: int, sigma: float) -> tuple[DelayLayer, DelayLayer]:
    ref = DelayLayer(n_in, n_out, k, backend="dcls", sigma_init=sigma)
    fast = DelayLayer(n_in, n_out, k, backend="fast", sigma_init=sigma)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _input(t: int, b: int, n_in: int, density: float) -> torch.Tensor:
    spikes = (torch.rand(t, b, n_in) < density).float()
    return spikes * torch.randint(1, 3, (t, b, n_in))  # spike counts, as the binned inputs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sigma", [0.23, 1.0, "K//2"])
@pytest.mark.parametrize(
    "impl",
    [
        "c",
        "no-compiler",
        "gemm",
        "triton",
        "fft",
        "fft-no-compiler",
        "fft-blocks-no-compiler",
        "fft-rfft-no-compiler",
    ],
)
def test_training_path_equals_dcls(case, sigma, impl, monkeypatch, request):
    """``fft-no-compiler`` is the spectral path without the C kernels: what runs on CUDA; ``fft-blocks``
    runs it in batch blocks of 2 samples (``SNN_DELAYS_FFT_BATCH``), ``fft-rfft`` with x and
    dL/dy transformed by ``torch.fft.rfft`` (``SNN_DELAYS_DFT=fft``)."""
    t, b, n_in, n_out, k, density = case
    sigma = k // 2 if sigma == "K//2" else sigma
    rfft_calls = []
    if impl == "triton":
        request.getfixturevalue("triton_interpreted")
    if impl.endswith("no-compiler"):
        monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    if "blocks" in impl:
        monkeypatch.setenv("SNN_DELAYS_FFT_BATCH", "2")
    if "rfft" in impl:
        monkeypatch.setenv("SNN_DELAYS_DFT", "fft")
        real_rfft = torch.fft.rfft
        monkeypatch.setattr(torch.fft, "rfft", lambda *a, **kw: rfft_calls.append(1) or real_rfft(*a, **kw))
    conv_impl = "fft" if impl.startswith("fft") else "auto" if impl == "no-compiler" else impl
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", conv_impl)
    torch.manual_seed(0)
    ref, fast = _pair(n_in, n_out, k, sigma)
    x = _input(t, b, n_in, density)
    outs, grads = [], []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        y.backward(g)
        outs.append(y.detach())
        grads.append([xi.grad, layer.dcls.weight.grad, layer.dcls.P.grad])
    assert outs[1].shape == (t + (k - 1) // 2, b, n_out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    if "rfft" in impl:  # x in the forward; x and dL/dy in the backward (of every batch block)
        assert len(rfft_calls) >= 3


def test_dft_setting(monkeypatch):
    monkeypatch.delenv("SNN_DELAYS_DFT", raising=False)
    assert fast_delays.dft_impl() == "matmul"
    monkeypatch.setenv("SNN_DELAYS_DFT", "fft")
    assert fast_delays.dft_impl() == "fft"
    monkeypatch.setenv("SNN_DELAYS_DFT", "cufft")
    with pytest.raises(ValueError, match="SNN_DELAYS_DFT must be one of matmul, fft, got 'cufft'"):
        fast_delays.dft_impl()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["c", "gemm", "triton", "fft", "fft-no-compiler"])
def test_integer_path_equals_dcls_eval(case, impl, monkeypatch, request):
    """``fft-no-compiler`` is CUDA's evaluation: the GEMM path in time blocks of at most
    ``EVAL_CHUNK`` unfolded floats (here 200: several blocks)."""
    t, b, n_in, n_out, k, density = case
    unfolds = []
    if impl == "triton":
        request.getfixturevalue("triton_interpreted")
    if impl.endswith("no-compiler"):
        monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
        monkeypatch.setattr(fast_delays, "EVAL_CHUNK", 200)
        real_unfold = fast_delays._unfold
        monkeypatch.setattr(
            fast_delays, "_unfold", lambda *a, **kw: unfolds.append(1) or real_unfold(*a, **kw)
        )
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl.removesuffix("-no-compiler"))
    torch.manual_seed(2)
    ref, fast = _pair(n_in, n_out, k, 0.23)
    ref.eval(), fast.eval()
    x = _input(t, b, n_in, density)
    with torch.no_grad():
        want, got = ref(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the same spikes downstream: one threshold, away from ties at float32 rounding
    thr = want.flatten().median()
    close = (want - thr).abs() < 1e-4
    assert torch.equal((got >= thr)[~close], (want >= thr)[~close])
    if impl == "fft-no-compiler" and n_in <= n_out:
        assert len(unfolds) == len(fast_delays._chunks(t + (k - 1) // 2, b * k * n_in, 200)) > 1


@pytest.mark.parametrize("impl", ["auto", "gemm", "triton", "dense"])
def test_integer_path_is_one_tap_per_synapse(impl, request):
    if impl == "triton":
        request.getfixturevalue("triton_interpreted")
    torch.manual_seed(3)
    x = torch.randn(10, 2, 3)
    w = torch.randn(4, 3)
    d = torch.randint(0, 5, (4, 3))
    y = fast_delays.integer_delay_conv(x, w, d, 5, impl=impl)
    want = torch.zeros(10 + 2, 2, 4)
    for o in range(4):
        for i in range(3):
            n = min(10, 12 - int(d[o, i]))  # the output stops (K-1)//2 steps after the input
            want[d[o, i] : d[o, i] + n, :, o] += w[o, i] * x[:n, :, i]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["c", "gemm", "dense", "gemm-no-compiler"])
@pytest.mark.parametrize("density", [0.05, 0.9])  # C: scalar adds per spike, and the taps
def test_synapses_rounded_beyond_the_kernel_are_dropped_at_evaluation(impl, density, monkeypatch):
    """Positions set beyond the kernel (by hand, or a checkpoint trained without clamping) round
    to delays outside 0..K-1: the reference's rounded kernel drops those synapses, and so does
    every fast path, without indexing outside its window (the C kernels once read and wrote
    out of bounds there)."""
    if impl == "c" and not fast_delays.c_kernels_available():
        pytest.skip("no C compiler")
    if impl.endswith("no-compiler"):  # CUDA's evaluation: the GEMM without gradients
        monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl.removesuffix("-no-compiler"))
    torch.manual_seed(4)
    ref, fast = _pair(6, 5, 7, 0.23)
    with torch.no_grad():
        ref.dcls.P[..., :2, :] = torch.tensor([-3.6, 3.6, -20.0, 20.0, 3.5]).view(1, 5, 1, 1)  # |round| > 3
    fast.load_state_dict(ref.state_dict())
    assert ((fast.delays() < 0) | (fast.delays() > 6)).sum() == 10
    ref.eval(), fast.eval()
    x = _input(30, 4, 6, density)
    with torch.no_grad():
        want, got = ref(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the function itself, called with such delays: those synapses contribute nothing
    w, d = torch.randn(5, 6), torch.randint(-9, 16, (5, 6))
    inside = (d >= 0) & (d < 7)
    y = fast_delays.integer_delay_conv(x, w, d, 7, impl=impl.removesuffix("-no-compiler"))
    want = fast_delays.integer_delay_conv(x, w * inside, d.clamp(0, 6), 7, impl="dense")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_input_and_parameters_of_different_dtypes_are_refused(train):
    """As the reference refuses them: the C kernels would read float64 parameters as float32."""
    torch.manual_seed(5)
    ref, fast = _pair(4, 5, 9, 1.0)
    x = _input(20, 2, 4, 0.3)
    for layer in (ref, fast):
        layer.double().train(train)
    with pytest.raises(RuntimeError, match="should be the same"):
        ref(x)
    with pytest.raises(TypeError, match="input is torch.float32 but its parameters are torch.float64"):
        fast(x)
    torch.testing.assert_close(fast(x.double()), ref(x.double()), rtol=1e-9, atol=1e-9)


def test_sigma_is_the_parameters_and_one_per_layer():
    """Changed through ``.data`` (no version counter records it), sigma is still read on the CPU;
    unequal per-synapse values (DCLS's SIG has one per synapse) and NaN are refused."""
    torch.manual_seed(6)
    ref, fast = _pair(4, 5, 9, 1.0)
    x = _input(20, 2, 4, 0.3)
    assert fast.sigma == 1.0
    for layer in (ref, fast):
        layer.dcls.SIG.data.fill_(3.0)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        fast.dcls.SIG.uniform_(0.5, 3.0)
    with pytest.raises(ValueError, match="sigma differs between synapses"):
        fast(x)
    fast.set_sigma(float("nan"))
    with pytest.raises(ValueError, match="sigma is NaN"):
        fast(x)


@pytest.mark.parametrize("impl", ["c", "gemm", "fft", "triton"])
def test_a_second_derivative_is_a_clear_error(impl, monkeypatch, request):
    """The fast paths' backward is not itself differentiable: ``create_graph`` then names that
    and what computes it, not a missing grad_fn, an ``out=`` op or a silent zero (a gradient
    penalty whose incoming gradient is a constant); ``dense`` computes it as dcls does."""
    if impl == "c" and not fast_delays.c_kernels_available():
        pytest.skip("no C compiler")
    if impl == "triton":
        request.getfixturevalue("triton_interpreted")
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl)
    torch.manual_seed(7)
    ref, fast = _pair(4, 5, 9, 1.0)
    x = torch.rand(20, 2, 4).requires_grad_()
    g = torch.randn(24, 2, 5)
    with pytest.raises(RuntimeError, match="first derivatives only.*SNN_DELAYS_CONV_IMPL=dense"):
        torch.autograd.grad((fast(x) * g).sum(), x, create_graph=True)
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", "dense")
    grads = []
    for layer in (ref, fast):
        (gx,) = torch.autograd.grad((layer(x) * g).sum(), layer.dcls.P, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["c", "gemm", "fft", "dense"])
def test_non_finite_positions_give_nan_not_a_crash(impl, monkeypatch):
    """A diverged run's NaN positions: NaN outputs, as the reference's, for the trainer to
    report; the tap window stays inside the kernel (it once indexed at -2**31)."""
    if impl == "c" and not fast_delays.c_kernels_available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl)
    ref, fast = _pair(4, 5, 9, 0.23)
    with torch.no_grad():
        for layer in (ref, fast):
            layer.dcls.P[0, 1, 2, 0] = float("nan")
    x = _input(20, 2, 4, 1.0)
    want, got = ref(x), fast(x)
    assert torch.isnan(got[:, :, 1]).all() and torch.equal(torch.isnan(got), torch.isnan(want))
    got.nan_to_num(0.0).sum().backward()


@pytest.mark.parametrize(("n_in", "n_out"), [(6, 11), (12, 5)])
def test_eval_fp16_operands_give_the_float32_products(n_in, n_out, monkeypatch):
    """``SNN_DELAYS_EVAL_FP16=1``: a layer fed by spikes multiplies float16 operands into
    float32 (here the CPU's row-blocked stand-in for CUDA's ``out_dtype`` GEMM). With weights
    that are exact in float16 the products are those of the float32 path, bit for bit; with
    any weights they are within float16's rounding of the weights (TF32 keeps as many bits).
    Layers not fed by spikes, float16 models and the default setting stay in float32."""
    monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)  # CUDA's evaluation path
    monkeypatch.setattr(fast_delays, "EVAL_CHUNK", 400)  # several time blocks
    operands = []
    real_mm = fast_delays._mm_into
    monkeypatch.setattr(
        fast_delays, "_mm_into", lambda a, b, out: operands.append(a.dtype) or real_mm(a, b, out)
    )
    torch.manual_seed(5)
    t, b, k = 30, 4, 9
    x = (torch.rand(t, b, n_in) < 0.3).float()
    w = torch.randn(n_out, n_in).half().float()  # exact in float16
    d = torch.randint(0, k, (n_out, n_in))

    def run(setting: str, weight: torch.Tensor = w, spikes_in: bool = True, inputs: torch.Tensor = x):
        monkeypatch.setenv("SNN_DELAYS_EVAL_FP16", setting)
        operands.clear()
        with torch.no_grad():
            y = fast_delays.integer_delay_conv(inputs, weight, d, k, impl="fft", spikes_in=spikes_in)
        return y, set(operands)

    want, seen = run("0")
    assert seen == {torch.float32}
    monkeypatch.setattr(fast_delays, "EMULATED_ROWS", 1 << 30)  # one product per block, as float32's
    got, seen = run("1")
    assert seen == {torch.float16} and got.dtype == torch.float32
    assert torch.equal(got, want)
    monkeypatch.setattr(fast_delays, "EMULATED_ROWS", 7)  # the stand-in in row blocks
    assert torch.equal(run("1")[0], want)
    raw = torch.randn(n_out, n_in)
    got, want = run("1", raw)[0], run("0", raw)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2e-3)
    assert not torch.equal(got, want)  # the weights were rounded
    assert run("1", spikes_in=False)[1] == {torch.float32}
    y, seen = run("1", w.half(), inputs=x.half())  # a float16 model: float16 products, as before
    assert seen == {torch.float16} and y.dtype == torch.float16
    monkeypatch.setenv("SNN_DELAYS_EVAL_FP16", "yes")
    with pytest.raises(ValueError, match="SNN_DELAYS_EVAL_FP16 must be 0 or 1, got 'yes'"):
        fast_delays.eval_fp16()


def test_eval_fp16_products_call_the_float32_output_gemm():
    """Off the CPU the float16 products are one ``torch.mm(..., out_dtype=torch.float32,
    out=)`` per block, written into a view of y (checked on meta tensors: CUDA's call, its
    shapes and dtypes, without a GPU)."""
    a = torch.empty(8, 16, dtype=torch.float16, device="meta")
    b = torch.empty(16, 4, dtype=torch.float16, device="meta")
    y = torch.empty(5, 4, 4, device="meta")
    out = y[1:3].view(-1, 4)
    fast_delays._mm_into(a, b, out)
    assert fast_delays._MM_OUT_DTYPE
    assert out.dtype == torch.float32 and out.shape == (8, 4)


def test_only_layers_fed_by_spikes_take_float16_operands(monkeypatch):
    from snn_delays.model import DelaySNN

    model = DelaySNN(10, 4, n_hidden=16, n_layers=2, kernel_size=5).eval()
    assert [layer.spikes_in for layer in model.delay_layers()] == [False, True, True]
    monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", "fft")
    flags = []
    real = fast_delays._integer_gemm_conv
    monkeypatch.setattr(
        fast_delays, "_integer_gemm_conv", lambda *a, **kw: flags.append(a[5]) or real(*a, **kw)
    )
    x = (torch.rand(12, 3, 10) < 0.3).float()
    with torch.no_grad():
        monkeypatch.setenv("SNN_DELAYS_EVAL_FP16", "1")
        got = model(x)
        monkeypatch.setenv("SNN_DELAYS_EVAL_FP16", "0")
        want = model(x)
    assert flags == [False, True, True, False, False, False]
    torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2e-3)


def test_tap_count_covers_the_gaussian():
    assert fast_delays.n_taps(0.23, 25) == 7
    assert fast_delays.n_taps(12, 25) == 25
    pos = torch.linspace(-12, 12, 97).unsqueeze(0)
    for sigma in (0.23, 0.5, 1.0, 2.0):
        kernel = fast_delays.gaussian_kernel(torch.ones_like(pos), pos, sigma, 25)
        start, j = fast_delays.tap_window(pos, sigma, 25)
        inside = torch.zeros_like(kernel, dtype=torch.bool)
        inside.scatter_(-1, start.long().unsqueeze(-1) + torch.arange(j), True)
        peak = kernel.amax(-1, keepdim=True)
        assert (kernel[~inside] < fast_delays.TAP_TOL * peak.expand_as(kernel)[~inside]).all()


@pytest.mark.parametrize("shape", [(9, 3, 4, 6, 5), (9, 3, 6, 4, 5), (30, 2, 7, 7, 25)])  # I<O, O<I, T~K
@pytest.mark.parametrize("chunk", [None, 50])  # 50 floats: one time step per GEMM block
def test_gemm_path_gradients_match_dense(shape, chunk, monkeypatch):
    """Both unfolding sides (input for I <= O, output for O < I) against autograd of conv1d."""
    t, b, n_in, n_out, k = shape
    if chunk:
        monkeypatch.setenv("SNN_DELAYS_GEMM_CHUNK", str(chunk))
    torch.manual_seed(4)
    x = torch.randn(t, b, n_in, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(n_out, n_in, k, dtype=torch.float64, requires_grad=True)
    y = fast_delays._DelayConvGEMM.apply(x, kernel)
    want = torch.nn.functional.conv1d(fast_delays.pad_time(x, k).permute(1, 2, 0), kernel).permute(2, 0, 1)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(want)
    got = torch.autograd.grad(y, (x, kernel), g)
    ref = torch.autograd.grad(want, (x, kernel), g)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]
)
def test_spectral_path_in_other_precisions(dtype, tol, monkeypatch):
    """CUDA's default path off the C kernels for a model cast with ``.double()`` / ``.half()``:
    float64 spectra for float64 (the DFT matrices in that precision), float32 spectra for the
    half types (no complex products for them); outputs and gradients in the input's dtype.
    Against the reference in float64 on the same (rounded) parameters and inputs, each within
    ``tol`` of the largest value or no further off than the reference run in ``dtype``."""
    monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", "fft")
    torch.manual_seed(4)
    for n_in, n_out in ((6, 7), (9, 4), (6, 6)):
        ref, fast = _pair(n_in, n_out, 7, 1.0)
        fast.to(dtype)
        ref.to(dtype).load_state_dict(fast.state_dict())
        truth = copy.deepcopy(ref).double()
        x = _input(16, 5, n_in, 0.3).to(dtype)
        results = []
        for layer, xl in ((truth, x.double()), (ref, x), (fast, x)):
            xi = xl.clone().requires_grad_()
            y = layer(xi)
            y.backward(torch.ones_like(y))
            results.append([y.detach(), xi.grad, layer.dcls.weight.grad, layer.dcls.P.grad])
        want, ref_in_dtype, got = results
        assert all(v.dtype == dtype for v in got)
        for w, r, g in zip(want, ref_in_dtype, got, strict=True):
            ref_err = (r.double() - w).abs().max().item()
            assert (g.double() - w).abs().max().item() <= max(tol * w.abs().max().item(), 2 * ref_err)


def test_auto_path_by_device_and_dtype():
    """``auto`` off the CPU kernels: the spectral path on CUDA for float32 and float64, GEMMs for
    the half types (tensor cores, no complex products), the dense convolution elsewhere."""
    from types import SimpleNamespace

    def on(device: str, dtype: torch.dtype) -> str:
        return fast_delays._path(SimpleNamespace(device=torch.device(device), dtype=dtype), "auto")

    assert on("cuda", torch.float32) == on("cuda", torch.float64) == "fft"
    assert on("cuda", torch.float16) == on("cuda", torch.bfloat16) == "gemm"
    assert on("cpu", torch.float64) == on("meta", torch.float32) == "dense"


def test_fft_batch_blocks_setting(monkeypatch):
    assert fast_delays.fft_batch_blocks(5) == [slice(0, 5)]
    # by itself: blocks where the batch-sized spectra outweigh the kernel-sized ones
    assert fast_delays.fft_batch_blocks(256, 256, 20) == [slice(b, b + 64) for b in range(0, 256, 64)]
    assert fast_delays.fft_batch_blocks(128, 512, 35) == [slice(0, 43), slice(43, 86), slice(86, 128)]
    assert fast_delays.fft_batch_blocks(256, 140, 256) == [slice(0, 256)]  # SHD's first layer
    assert fast_delays.fft_batch_blocks(256, 256, 256) == [slice(0, 256)]
    assert fast_delays.fft_batch_blocks(4096, 8, 8) == [slice(b, b + 1024) for b in range(0, 4096, 1024)]
    monkeypatch.setenv("SNN_DELAYS_FFT_BATCH", "2")
    assert fast_delays.fft_batch_blocks(5) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert fast_delays.fft_batch_blocks(5, 256, 20) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    for bad in ("0", "half", "-1"):
        monkeypatch.setenv("SNN_DELAYS_FFT_BATCH", bad)
        with pytest.raises(ValueError, match="SNN_DELAYS_FFT_BATCH must be a positive number"):
            fast_delays.fft_batch_blocks(5)


def test_eval_chunk_setting(monkeypatch):
    monkeypatch.delenv("SNN_DELAYS_GEMM_CHUNK", raising=False)
    monkeypatch.delenv("SNN_DELAYS_EVAL_CHUNK", raising=False)
    assert fast_delays.eval_chunk() == fast_delays.EVAL_CHUNK
    monkeypatch.setenv("SNN_DELAYS_EVAL_CHUNK", "4096")
    assert fast_delays.eval_chunk() == 4096
    monkeypatch.setenv("SNN_DELAYS_GEMM_CHUNK", "1000")  # the bound of every unfolded block
    assert fast_delays.eval_chunk() == 1000
    monkeypatch.delenv("SNN_DELAYS_GEMM_CHUNK")
    for bad in ("0", "32MiB", "-5"):
        monkeypatch.setenv("SNN_DELAYS_EVAL_CHUNK", bad)
        with pytest.raises(ValueError, match="SNN_DELAYS_EVAL_CHUNK must be a positive number"):
            fast_delays.eval_chunk()


def test_gemm_chunk_setting(monkeypatch):
    monkeypatch.setenv("SNN_DELAYS_GEMM_CHUNK", "64")
    assert fast_delays._chunks(10, 20) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    monkeypatch.delenv("SNN_DELAYS_GEMM_CHUNK")
    assert fast_delays._chunks(10, 20) == [(0, 10)]
    for bad in ("0", "1e6", "-5"):
        monkeypatch.setenv("SNN_DELAYS_GEMM_CHUNK", bad)
        with pytest.raises(ValueError, match="SNN_DELAYS_GEMM_CHUNK must be a positive number"):
            fast_delays._chunks(10, 20)


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("j", [1, 2, 5, 7, 8, 9, 13])  # 1..8 register-blocked, above: generic
def test_tap_kernel_every_window_width(j):
    """``_tap_conv`` against the explicit sum, with batch and time off the 16-lane/8-step tiles."""
    torch.manual_seed(5)
    t_src, batch, n_in, n_out, t_dst = 50, 19, 5, 6, 30
    src = torch.randn(t_src, batch, n_in)
    coef = torch.randn(n_out, n_in, j)
    start = torch.randint(0, t_src - t_dst - j + 1, (n_out, n_in), dtype=torch.int32)
    got = fast_delays._tap_conv(src, coef, start, t_dst)
    want = torch.zeros(t_dst, batch, n_out)
    for o in range(n_out):
        for i in range(n_in):
            for jj in range(j):
                s0 = int(start[o, i]) + jj
                want[:, :, o] += coef[o, i, jj] * src[s0 : s0 + t_dst, :, i]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("density", [0.05, 0.5])  # scalar adds per spike, and the one-tap path
@pytest.mark.parametrize("threads", [1, 2])
def test_integer_path_sparse_and_dense_inputs(density, threads):
    torch.manual_seed(6)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = (torch.rand(30, 7, 9) < density).float() * torch.randint(1, 3, (30, 7, 9))
        w = torch.randn(11, 9)
        d = torch.randint(0, 25, (11, 9))
        got = fast_delays.integer_delay_conv(x, w, d, 25, impl="c")
    finally:
        torch.set_num_threads(old)
    want = fast_delays.integer_delay_conv(x, w, d, 25, impl="dense")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
def test_evaluation_path_follows_the_density_of_samples_spread_over_the_batch(monkeypatch):
    """Scalar adds at most SCATTER_DENSITY_MAX nonzeros, the taps above; the density is counted
    on DENSITY_SAMPLES samples spread over the batch, not its first ones."""
    torch.manual_seed(7)
    ran = []
    for name in ("_delay_scatter", "_taps_forward"):
        orig = getattr(fast_delays, name)
        monkeypatch.setattr(fast_delays, name, lambda *a, _o=orig, _n=name: ran.append(_n) or _o(*a))
    w, d = torch.randn(5, 6), torch.randint(0, 9, (5, 6))
    silent_first = torch.zeros(20, 128, 6)
    silent_first[:, 64:] = (torch.rand(20, 64, 6) < 0.5).float()  # half the batch at 0.5: 0.25
    small = (torch.rand(20, 3, 6) < 0.05).float()
    small[:, 2] = 1.0  # a batch under DENSITY_SAMPLES: every sample counted (0.05 of two, 1 of one)
    for x, fraction, path in (
        (silent_first, float(silent_first.count_nonzero()) / silent_first.numel(), "_taps_forward"),
        (small, float(small.count_nonzero()) / small.numel(), "_taps_forward"),
        ((torch.rand(20, 128, 6) < 0.05).float(), None, "_delay_scatter"),
    ):
        if fraction is not None:
            assert fast_delays._nonzero_fraction(x) == pytest.approx(fraction, abs=0.02)
        ran.clear()
        got = fast_delays.integer_delay_conv(x, w, d, 9, impl="c")
        assert ran == [path]
        torch.testing.assert_close(got, fast_delays.integer_delay_conv(x, w, d, 9, impl="dense"))


def test_keep_freed_memory_takes_and_can_be_switched_off(monkeypatch):
    import platform

    monkeypatch.setenv("SNN_DELAYS_SYSTEM_MALLOC", "1")
    assert fast_delays.keep_freed_memory() is False
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    for value in (None, "0"):  # unset, or 0: the setting is not opted out of
        if value is None:
            monkeypatch.delenv("SNN_DELAYS_SYSTEM_MALLOC")
        else:
            monkeypatch.setenv("SNN_DELAYS_SYSTEM_MALLOC", value)
        assert fast_delays.keep_freed_memory() is on_glibc


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("forward", ["events", "taps", "fft"])
def test_cpu_conv_keeps_its_input_only_where_its_backward_reads_it(forward, monkeypatch):
    """dL/dk comes from the forward's event lists on the event path and from the forward's
    spectrum of x on the spectral path, so x is kept for the backward (and packed and unpacked
    by the model's SavedSpikes hooks) only by the taps forward, for its spectral dL/dk. The
    gradients equal the kept-x path's."""
    torch.manual_seed(12)
    x = _input(33, 21, 6, 0.2)
    kernel = torch.randn(18, 6, 25)
    start = torch.zeros(18, 6, dtype=torch.int32)  # every tap in the window
    grad_y = torch.randn(33 + 12, 21, 18)
    grads = {}
    for path in (forward, "taps"):
        monkeypatch.setitem(fast_delays._FORCE, "forward", path)
        k = kernel.clone().requires_grad_()
        xi = x.clone().requires_grad_()
        y = fast_delays._DelayConvCPU.apply(xi, k, start, 25)
        saved_x, spec_x = y.grad_fn.saved_tensors[0], y.grad_fn.saved_tensors[5]
        assert (saved_x is None) == (path != "taps")
        if path == "fft":  # x's spectrum over T + K - 1 = 57 points (direct sums: no 5-smooth 60)
            assert spec_x.shape == (57 // 2 + 1, 21, 6)
        y.backward(grad_y)
        grads[path] = (xi.grad, k.grad)
    for got, want in zip(grads[forward], grads["taps"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("forward", ["events", "taps", "fft"])
@pytest.mark.parametrize("grad_input", ["taps", "fft"])
@pytest.mark.parametrize("sigma", [0.23, 3.0])
def test_every_cpu_path_equals_dcls(forward, grad_input, sigma, monkeypatch):
    """Force each CPU product path in turn (the cost model normally picks one) and check that
    it ran: dL/dk follows the forward (events, else spectral)."""
    monkeypatch.setitem(fast_delays._FORCE, "forward", forward)
    monkeypatch.setitem(fast_delays._FORCE, "grad_input", grad_input)
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", "c")
    called = []
    for name in ("_event_conv", "_taps_forward", "_fft_forward", "_taps_grad_input", "_fft_grad_input"):
        real = getattr(fast_delays, name)
        monkeypatch.setattr(fast_delays, name, lambda *a, _r=real, _n=name: called.append(_n) or _r(*a))
    torch.manual_seed(7)
    t, b, n_in, n_out, k = 33, 21, 6, 18, 25  # batch and channels off the 16-lane blocks
    ref, fast = _pair(n_in, n_out, k, sigma)
    x = _input(t, b, n_in, 0.2)
    results = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        results.append([y.detach(), xi.grad, layer.dcls.weight.grad, layer.dcls.P.grad])
    fwd_name = {"events": "_event_conv", "taps": "_taps_forward", "fft": "_fft_forward"}[forward]
    assert called == [fwd_name, f"_{grad_input}_grad_input"]
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("forward", ["events", "taps", "fft"])
def test_every_cpu_path_gives_the_kernel_gradients_for_an_input_without_one(forward, monkeypatch):
    """A first layer: its input (the data) needs no gradient, its weights and positions do. The
    spectral forward keeps x's spectrum (and not x) for dL/dk even then."""
    monkeypatch.setitem(fast_delays._FORCE, "forward", forward)
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", "c")
    torch.manual_seed(7)
    ref, fast = _pair(6, 18, 25, 3.0)
    x = _input(33, 21, 6, 0.2)  # requires_grad False
    grads = []
    for layer in (ref, fast):
        y = layer(x)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        grads.append((layer.dcls.weight.grad, layer.dcls.P.grad))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
def test_row_events_rebuilt_from_saved_tensors_are_the_filled_ones():
    """The backward's event lists (_RowEvents.filled, from the saved tensors) count and
    order the events as the forward's did (a short count would have the C code that groups
    them by channel write past its buffers)."""
    torch.manual_seed(11)
    rows = fast_delays._RowEvents(_input(7, 5, 37, 0.1)).fill()
    again = fast_delays._RowEvents.filled(rows.shape, rows.ptr, rows.i, rows.v)
    assert (again.shape, again.nnz, again.density) == (rows.shape, rows.nnz, rows.density)
    chans = [fast_delays._ChanEvents(r, row_bytes=64) for r in (rows, again)]
    for name in ("ptr", "b", "t", "v"):
        assert torch.equal(getattr(chans[1], name), getattr(chans[0], name)), name


@pytest.mark.parametrize(
    ("impl", "forward"),
    [("c", "events"), ("c", "taps"), ("c", "fft"), ("fft", None), ("gemm", None), ("dense", None)],
)
def test_a_retained_graph_backpropagates_twice(impl, forward, monkeypatch):
    """``backward(retain_graph=True)`` then another backward adds the same gradients again, on
    every path (the C layer's event lists and spectra were attributes it dropped after one
    backward: the second failed with an AttributeError); without ``retain_graph`` the second
    backward fails with autograd's own error."""
    if impl == "c" and not fast_delays.c_kernels_available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl)
    if forward:  # the C layer's forward path
        monkeypatch.setitem(fast_delays._FORCE, "forward", forward)
    torch.manual_seed(13)
    _, layer = _pair(6, 18, 25, 2.0)
    x = _input(33, 21, 6, 0.2).requires_grad_()
    loss = layer(x).square().sum()
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in (x, layer.dcls.weight, layer.dcls.P)]
    loss.backward()
    for t, first in zip((x, layer.dcls.weight, layer.dcls.P), once, strict=True):
        torch.testing.assert_close(t.grad, 2 * first, rtol=1e-5, atol=1e-6 * first.abs().max().item())
    loss = layer(x).square().sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("sigma", [0.0, 0.23, 2.0, 12.0])
def test_c_gaussian_kernel_and_its_gradients(sigma):
    torch.manual_seed(8)
    w = torch.randn(9, 13, dtype=torch.float64)
    p = torch.empty(9, 13, dtype=torch.float64).uniform_(-12, 12)
    dk = torch.randn(9, 13, 25, dtype=torch.float64)
    wr, pr = w.clone().requires_grad_(), p.clone().requires_grad_()
    want = fast_delays.gaussian_kernel(wr, pr, sigma, 25)  # autograd of the formula, float64
    want.backward(dk)
    wc, pc = w.float().requires_grad_(), p.float().requires_grad_()
    got = fast_delays._GaussKernelCPU.apply(wc, pc, sigma, 25)
    got.backward(dk.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wc.grad.double(), wr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pc.grad.double(), pr.grad, rtol=1e-4, atol=1e-5 * pr.grad.abs().max().item())


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("n_in", [37, 48])  # a partial last block of 16 channels, and none
def test_row_events_list_every_nonzero_by_sample_step_channel(n_in):
    """The C event lists (counted, then filled by threads over time steps, each row compacted
    without branches and cut at its count) hold x's nonzeros in (b, t, i) order."""
    torch.manual_seed(11)
    x = (torch.rand(7, 5, n_in) < 0.08) * torch.randint(1, 4, (7, 5, n_in)).float()
    x[1, 2] = torch.arange(1.0, n_in + 1)  # a full row
    x[3, 0] = 0.0  # an empty row (others are empty by chance too)
    x[0, 0, n_in - 1] = 5.0  # the last channel, alone in its row
    x[0, 0, : n_in - 1] = 0.0
    x[2, 1, 5] = -0.0  # a zero all the same
    x[4, 3, 0] = float("nan")  # not zero: kept, as the dense paths propagate it
    rows = fast_delays._RowEvents(x).fill()
    xb = x.transpose(0, 1)  # (B, T, I): the rows' order
    nonzero = xb != 0
    assert rows.nnz == int(nonzero.sum())
    torch.testing.assert_close(
        rows.ptr, torch.cat([torch.zeros(1, dtype=torch.int64), nonzero.sum(-1).flatten().cumsum(0)])
    )
    assert torch.equal(rows.i.long(), nonzero.nonzero()[:, 2])
    torch.testing.assert_close(rows.v, xb[nonzero], equal_nan=True)
    silent = fast_delays._RowEvents(torch.zeros(3, 2, n_in)).fill()  # no events: empty lists
    assert silent.nnz == 0 and silent.i.numel() == silent.v.numel() == 0 and int(silent.ptr[-1]) == 0


def test_dense_fallback_convolves_no_subnormal_taps_on_the_cpu(monkeypatch):
    """The dense path (no C compiler, or SNN_DELAYS_CONV_IMPL=dense) zeroes the kernel's
    subnormal taps before its convolution on the CPU, as the C kernel does (each product with a
    subnormal is ~4x slower on Intel cores); outputs and gradients stay the formula's."""
    seen = []
    real_conv = fast_delays.F.conv1d
    monkeypatch.setattr(
        fast_delays.F, "conv1d", lambda x, k, *a: seen.append(k.detach()) or real_conv(x, k, *a)
    )
    torch.manual_seed(13)
    x = _input(20, 3, 12, 0.3)
    w0, p0 = torch.empty(16, 12).uniform_(-1, 1), torch.empty(16, 12).uniform_(-12, 12)
    tiny = torch.finfo(torch.float32).tiny
    grads = []
    for flush in (True, False):
        w, p = w0.clone().requires_grad_(), p0.clone().requires_grad_()
        if flush:
            y = fast_delays.delay_conv_dense(x, w, p, 0.23, 25)
        else:
            kernel = fast_delays.gaussian_kernel(w, p, 0.23, 25)
            assert ((kernel != 0) & (kernel.abs() < tiny)).any()  # the case exists
            y = real_conv(fast_delays.pad_time(x, 25).permute(1, 2, 0), kernel).permute(2, 0, 1)
        y.backward(torch.ones_like(y))
        grads.append((y.detach(), w.grad, p.grad))
    assert not ((seen[0] != 0) & (seen[0].abs() < tiny)).any()
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
def test_c_gaussian_kernel_writes_no_subnormals():
    """A narrow Gaussian's far taps underflow to subnormals, which slow every product on Intel
    CPUs ~4x: the C kernel writes them as zeros (each below 1.2e-38), the formula keeps them."""
    torch.manual_seed(10)
    w = torch.empty(16, 12).uniform_(-1, 1)
    p = torch.empty(16, 12).uniform_(-12, 12)
    tiny = torch.finfo(torch.float32).tiny

    def subnormal(t):
        return (t != 0) & (t.abs() < tiny)

    assert subnormal(fast_delays.gaussian_kernel(w, p, 0.23, 25)).any()  # the case exists
    kernel = fast_delays._GaussKernelCPU.apply(w.clone().requires_grad_(), p, 0.23, 25)
    assert not subnormal(kernel).any()
    torch.testing.assert_close(kernel, fast_delays.gaussian_kernel(w, p, 0.23, 25), rtol=1e-5, atol=1e-30)
    _, _, gn = kernel.grad_fn.saved_tensors  # the normalised Gaussian kept for the backward
    assert not subnormal(gn).any() and (gn == 0).any()


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("length,n", [(13, 27), (25, 50), (40, 64), (6, 11)])  # odd and even n
def test_direct_dfts_equal_torch_fft(length, n):
    torch.manual_seed(9)
    x = torch.randn(length, 3, 7)  # 21 columns: one full 16-lane block and a partial one
    spec = torch.fft.rfft(x, n=n, dim=0)
    scale = spec.abs().max().item()
    torch.testing.assert_close(fast_delays._rdft(x, n), spec, rtol=0, atol=2e-6 * scale)
    flipped = torch.fft.rfft(x.flip(0), n=n, dim=0)
    torch.testing.assert_close(fast_delays._rdft(x, n, flip=True), flipped, rtol=0, atol=2e-6 * scale)
    strided = torch.randn(3, 7, length).permute(2, 0, 1)  # time is the last axis in memory (the kernel)
    want_strided = torch.fft.rfft(strided, n=n, dim=0)
    torch.testing.assert_close(fast_delays._rdft(strided, n), want_strided, rtol=0, atol=2e-6 * scale)
    for rows in (length, 4):
        want = torch.fft.irfft(spec, n=n, dim=0)[:rows]
        torch.testing.assert_close(fast_delays._irdft(spec, n, rows), want, rtol=0, atol=1e-6 * scale)
        want_conj = torch.fft.irfft(spec.conj(), n=n, dim=0)[:rows]
        got_conj = fast_delays._irdft(spec, n, rows, conj=True)
        torch.testing.assert_close(got_conj, want_conj, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(fast_delays._rdft(x, n, conj=True), spec.conj(), rtol=0, atol=2e-6 * scale)


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("batch_blocks", [None, "3"])
def test_c_spectral_backward_conjugates_no_spectrum(batch_blocks, monkeypatch):
    """On the C path dL/dy's spectrum is made conjugated, so neither backward product needs the
    conjugate of H or X, which CPU ``bmm`` would copy whole (``aten._conj`` then a copy of a
    spectrum: ~10 ms each for an SHD hidden layer); the gradients stay those of dcls. Both
    spectral layers: the C path's (shared spectra) and ``impl="fft"`` (written over its
    operands, in one batch block or three)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    if batch_blocks:
        monkeypatch.setenv("SNN_DELAYS_FFT_BATCH", batch_blocks)
    monkeypatch.setitem(fast_delays._FORCE, "forward", "fft")
    monkeypatch.setitem(fast_delays._FORCE, "grad_input", "fft")
    torch.manual_seed(12)
    x = _input(30, 8, 10, 0.2)
    for impl in ("c", "fft"):
        monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl)
        ref, fast = _pair(10, 10, 25, 3.0)  # square: the fft impl's products written over operands
        results = []
        for layer in (ref, fast):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            dy = torch.randn_like(y, generator=torch.Generator().manual_seed(2))
            if layer is fast:
                with Ops() as ops:
                    y.backward(dy)
            else:
                y.backward(dy)
            results.append([xi.grad, layer.dcls.weight.grad, layer.dcls.P.grad])
        assert "aten.bmm.default" in ops.names, impl  # the spectral products ran
        assert "aten._conj.default" not in ops.names, impl
        for got, want in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize(
    ("value", "off"),
    [
        ("", set()),
        ("0", set()),
        ("1", {"fast_delays", "fast_neurons"}),
        ("fast_delays", {"fast_delays"}),
        ("fast_neurons", {"fast_neurons"}),
        ("fast_delays, fast_neurons", {"fast_delays", "fast_neurons"}),
    ],
)
def test_no_c_names_the_libraries_it_turns_off(monkeypatch, value, off):
    """``SNN_DELAYS_NO_C=fast_delays`` keeps the fused C LIF (which keeps the tensors CUDA's
    Triton LIF keeps) while the delay layer runs CUDA's operators: the memory model's setting."""
    monkeypatch.setenv("SNN_DELAYS_NO_C", value)
    assert {n for n in ("fast_delays", "fast_neurons") if fast_delays.c_disabled(n)} == off
    if "fast_delays" in off:
        assert fast_delays.compile_c("fast_delays", "int f(void) { return 1; }") is None


# A compiler without OpenMP (Apple's clang without libomp): it refuses -fopenmp, as clang does.
_NO_OPENMP_CC = """#!/bin/sh
echo "$@" >> "$CC_LOG"
for a in "$@"; do
    if [ "$a" = "-fopenmp" ]; then echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1; fi
done
exec cc "$@"
"""

_NO_OPENMP_RUN = """
import json, warnings, torch
from snn_delays import fast_delays, fast_neurons
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok = fast_delays.c_kernels_available() and fast_neurons.c_kernels_available()
torch.manual_seed(0)
x = (torch.rand(30, 4, 12) < 0.2).float()
w, p = torch.randn(8, 12), torch.rand(8, 12) * 10 - 5
y = fast_delays.delay_conv(x, w, p, 2.0, 11, impl="c")
ref = fast_delays.delay_conv_dense(x, w, p, 2.0, 11)
print(json.dumps({"ok": ok, "err": float((y - ref).abs().max()), "warnings": [str(m.message) for m in caught]}))
"""


def test_c_kernels_compile_without_openmp_and_say_they_run_on_one_thread(tmp_path):
    """A compiler that refuses -fopenmp (macOS's clang) got no C kernels at all, silently: every
    CPU call took the dense path, the published speed. The kernels now compile without OpenMP
    (one thread), with a warning naming the compiler's error and the fix."""
    cc = tmp_path / "cc"
    cc.write_text(_NO_OPENMP_CC)
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "CC_LOG": str(tmp_path / "cc.log"), "SNN_DELAYS_CACHE": str(tmp_path)}
    env.pop("SNN_DELAYS_NO_C", None)
    for _ in range(2):  # compiled, then loaded from the cache (the full settings tried again)
        proc = subprocess.run([sys.executable, "-c", _NO_OPENMP_RUN], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        assert got["ok"] and got["err"] < 1e-5, got
        assert len(got["warnings"]) == 2, got["warnings"]  # one per library
        for lib, message in zip(("fast_delays", "fast_neurons"), got["warnings"], strict=True):
            assert f"the {lib} C kernels compiled only without -fopenmp" in message
            assert "unsupported option '-fopenmp'" in message and "on one thread" in message
    calls = (tmp_path / "cc.log").read_text().splitlines()
    assert sum("-fopenmp" in c for c in calls) == 4 and sum("-fopenmp" not in c for c in calls) == 2


def test_delay_kernels_compile_with_aligned_loops(monkeypatch):
    """The evaluation scatter's inner loop ran at 0.80 or 1.0-1.1 ns an add on a Xeon depending
    on where it landed, which moved with unrelated edits to the C source: the library is built
    with its loops aligned to 64 bytes (and fused multiply-adds)."""
    seen = []
    monkeypatch.setattr(fast_delays, "_LIB", None)
    monkeypatch.setattr(fast_delays, "_LIB_TRIED", False)
    monkeypatch.setattr(fast_delays, "compile_c", lambda name, source, flags=(): seen.append((name, flags)))
    assert fast_delays._load_lib() is None  # the stand-in compiler built nothing
    assert seen == [("fast_delays", ("-ffp-contract=fast", "-falign-loops=64"))]


def test_no_c_compiler_warns_that_the_slower_paths_run(tmp_path, monkeypatch):
    monkeypatch.delenv("SNN_DELAYS_NO_C", raising=False)
    monkeypatch.setenv("SNN_DELAYS_CACHE", str(tmp_path))
    source = "int f(void) { return 7; }"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fast_delays.compile_c("probe", source).f() == 7  # the system's compiler: no warning
    assert not caught
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="could not compile the probe2 C kernels with CC=") as caught:
        assert fast_delays.compile_c("probe2", source) is None
    message = str(caught[0].message)
    assert "no-such-cc" in message and "PyTorch fallbacks" in message and "SNN_DELAYS_NO_C=1" in message
    assert not list(tmp_path.glob("*.c")) and not list(tmp_path.glob("*.tmp"))  # nothing left behind


def test_cc_is_a_command_line(tmp_path, monkeypatch):
    """``CC="ccache gcc"`` or ``CC="gcc -m64"`` (a command line, as make reads it) was run as one
    program name, so such a setting got the slower PyTorch paths and a warning."""
    monkeypatch.delenv("SNN_DELAYS_NO_C", raising=False)
    monkeypatch.setenv("SNN_DELAYS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "env SNN_DELAYS_PROBE=1 cc")  # a wrapper, its argument, the compiler
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fast_delays.compile_c("probe3", "int f(void) { return 3; }").f() == 3
    assert not caught


_TF32_PROBE = """
import sys, torch
from snn_delays import fast_delays
exec(sys.argv[1])
b = torch.backends
def strings():
    return (b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision)
before = strings()
seen = [fast_delays.conv_allows_tf32()]
for off in (True, False):
    with fast_delays._tf32(torch.device("cuda"), off=off):  # flags only: no GPU needed
        seen.append(b.cuda.matmul.fp32_precision == "tf32")
print(seen, before == strings())
"""


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
@pytest.mark.parametrize(
    ("setup", "conv_tf32"),
    [
        ("pass", True),  # cuDNN's default: TF32 convolutions
        ("torch.backends.cuda.matmul.allow_tf32 = True", True),  # the legacy API
        ("torch.backends.cudnn.allow_tf32 = False", False),
        ("torch.backends.fp32_precision = 'tf32'", True),  # the new API, which the legacy getters refuse
        ("torch.backends.fp32_precision = 'ieee'", False),
        ("torch.backends.cudnn.conv.fp32_precision = 'ieee'", False),
    ],
)
def test_tf32_follows_the_convolutions_under_either_precision_api(setup, conv_tf32):
    """The CUDA products' TF32 switch (``_tf32``) reads the user's flags set through either API
    (the legacy getters raise "mix of the legacy and new APIs" after a new-API setting), gives
    full float32 to the DFT products and the convolutions' precision to the others, and leaves
    every ``fp32_precision`` string as it found it. Its own process: the flags are global."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _TF32_PROBE, setup], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[-2] == f"{[conv_tf32, False, conv_tf32]} True"


@pytest.mark.skipif(not fast_delays.c_kernels_available(), reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_event_kernel_gradient_over_several_blocks_of_samples(threads, monkeypatch):
    """The event path's dL/dk runs over blocks of samples of ``EVENT_BLOCK_BYTES`` of dL/dy rows,
    each block's sums added to the previous blocks': one block in the small cases above, about 20
    in an SHD hidden layer at batch 256. Here blocks of 2 samples, the last one partial."""
    monkeypatch.setitem(fast_delays._FORCE, "forward", "events")
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", "c")
    t, b, n_in, n_out, k = 20, 7, 5, 18, 25
    kp = fast_delays._tap_chunks(k)[1]
    monkeypatch.setattr(fast_delays, "EVENT_BLOCK_BYTES", 2 * (t + kp - 1) * 32 * 4)  # 2 samples' rows
    n_blocks = []
    real_events = fast_delays._ChanEvents

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        events = real_events(*args, **kwargs)
        n_blocks.append(events.n_blk)
        return events

    monkeypatch.setattr(fast_delays, "_ChanEvents", counted)
    torch.manual_seed(10)
    ref, fast = _pair(n_in, n_out, k, 1.0)
    x = _input(t, b, n_in, 0.2)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for layer in (ref, fast):
            y = layer(x)
            y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
            results.append([y.detach(), layer.dcls.weight.grad, layer.dcls.P.grad])
    finally:
        torch.set_num_threads(old)
    assert n_blocks == [4]
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("impl", ["c", "gemm", "dense"])
def test_evaluation_with_gradients_equals_dcls(impl, monkeypatch):
    """``eval()`` with autograd on (input saliency, an attack, a loss on the evaluated network):
    the integer-delay network's gradients to the input and the weights, as the reference's.
    The fast evaluation kernels (C scatter and taps, the GEMM without gradients) give no
    gradient: they must run only under ``no_grad`` or for tensors that need none."""
    if impl == "c" and not fast_delays.c_kernels_available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl)
    torch.manual_seed(11)
    ref, fast = _pair(6, 5, 9, 0.23)
    ref.eval(), fast.eval()
    x = _input(16, 3, 6, 0.2)
    results = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        results.append([y.detach(), xi.grad, layer.dcls.weight.grad])
    for got, want in zip(results[1], results[0], strict=True):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("impl", ["c", "gemm", "fft", "dense"])
def test_a_negative_sigma_is_its_absolute_value(impl, monkeypatch):
    """DCLS's width is ``|sigma| + 0.27``; ``set_sigma`` takes any number, so a negative sigma
    gives the kernel of its absolute value on every path, as in the reference."""
    if impl == "c" and not fast_delays.c_kernels_available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl)
    torch.manual_seed(12)
    ref, fast = _pair(4, 5, 9, 1.5)
    x = _input(20, 2, 4, 0.5)
    positive = fast(x).detach()
    for layer in (ref, fast):
        layer.set_sigma(-1.5)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast(x), positive, rtol=1e-5, atol=1e-5)


def test_inputs_of_the_wrong_shape_are_refused():
    """The C kernels read x, the weights and the positions or delays by the sizes they are
    given: a mismatch (positions transposed, an input of another width) would read out of
    bounds, so it is refused first, by the functions and by the layer."""
    torch.manual_seed(13)
    x, w = torch.rand(10, 2, 3), torch.randn(4, 3)
    pos, delays = torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="delay convolution: x must be"):
        fast_delays.delay_conv(x, w, pos.t(), 1.0, 5)
    with pytest.raises(ValueError, match="delay convolution: x must be"):
        fast_delays.delay_conv(torch.rand(10, 2, 4), w, pos, 1.0, 5)
    with pytest.raises(ValueError, match="delay convolution: x must be"):
        fast_delays.integer_delay_conv(x, w, delays.t(), 5)
    layer = DelayLayer(3, 4, 5)
    for bad in (torch.rand(10, 2, 4), torch.rand(10, 3)):
        for mode in (True, False):
            with pytest.raises(ValueError, match=r"takes time-major input \(T, B, 3\)"):
                layer.train(mode)(bad)
