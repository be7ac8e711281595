"""TensorMemory counts the live tensors that operators create, whatever the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from snn_delays.fast_delays import delay_conv
from snn_delays.memtrack import TensorMemory

MB = 4 * 250_000  # bytes of 250k float32


def test_counts_new_storages_while_alive_and_not_views_or_inputs():
    x = torch.randn(250_000)  # existed before: never counted, nor its views
    with TensorMemory() as mem:
        a = x * 2  # +1
        view = x[:10]
        b = a + 1  # +1 -> 2 (peak)
        del a  # -> 1
        c = torch.empty(125_000)  # +0.5 -> 1.5
        b.add_(1)  # in place: nothing new
        b2 = b.view(500, 500)  # a view of b: the same storage
    assert mem.peak_bytes == 2 * MB
    assert mem.live_bytes == 1.5 * MB
    assert mem.allocated_bytes == 2.5 * MB
    del b, b2, c, view
    assert mem.live_bytes == 0  # the finalizers still count after the block


def test_follows_the_backward_and_saved_tensors():
    """The backward's operators are dispatched too: gradients and the temporaries in them."""
    w = torch.randn(500, 500, requires_grad=True)
    x = torch.randn(500, 500)
    with TensorMemory() as mem:
        h = (x @ w).relu()  # relu keeps its output for the backward
        loss = h.sum()
        forward_live = mem.live_bytes
        loss.backward()
    assert forward_live >= MB  # relu's output, saved for the backward
    assert w.grad is not None
    assert mem.allocated_bytes >= forward_live + MB  # dL/dh and dL/dw at least
    assert mem.live_bytes >= MB  # w.grad is still alive


def test_reset_peak_starts_from_what_is_alive():
    with TensorMemory() as mem:
        a = torch.ones(250_000)
        b = torch.ones(250_000)
        del b
        mem.reset_peak()
        assert mem.peak_bytes == MB
        c = torch.ones(125_000)
    assert mem.peak_bytes == 1.5 * MB
    del a, c


def test_spectral_step_keeps_nothing_spectral_for_the_backward(monkeypatch):
    """A memory regression guard for CUDA's default training path, run on the CPU with the same
    operators (DFT products): between forward and backward it keeps what the GEMM path keeps (x
    and the kernel), no spectra; those are made again by the backward. (Constants cached once
    per shape, such as the kernel's DFT matrix, are made before counting.)"""
    from snn_delays import fast_delays

    monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    torch.manual_seed(0)
    x = torch.rand(40, 16, 24).round()
    weight = torch.randn(32, 24, requires_grad=True)
    pos = (torch.rand(32, 24) * 10 - 5).requires_grad_()
    kept = {}
    for impl in ("gemm", "fft"):
        delay_conv(x, weight, pos, 1.0, 11, impl=impl)  # constants made once (the DFT matrix)
        with TensorMemory() as mem:
            y = delay_conv(x, weight, pos, 1.0, 11, impl=impl)
            kept[impl] = mem.live_bytes - y.untyped_storage().nbytes()
            y.square().sum().backward()
    assert kept["fft"] == kept["gemm"] > 0, kept


def test_spectral_backward_holds_at_most_three_spectra(monkeypatch):
    """CUDA's spectral backward makes dL/dk first and frees x's spectrum before dL/dx, and the
    product before the inverse transform: at most three spectrum-sized buffers at once (the
    step's peak on the SHD network, with the fused LIF, is in a backward). Done the other
    way round, dL/dx, dL/dy's and x's spectra, the product and the inverse were all alive."""
    from snn_delays import fast_delays

    monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    torch.manual_seed(2)
    t, b, ch, k = 40, 16, 16, 9  # B = in = out: every spectrum (F, 16, 16) has the same size
    x = torch.rand(t, b, ch).round().requires_grad_()
    weight = torch.randn(ch, ch, requires_grad=True)
    pos = (torch.rand(ch, ch) * 6 - 3).requires_grad_()
    y = delay_conv(x, weight, pos, 1.0, k, impl="fft")
    grad_y = torch.randn_like(y)
    spectrum = (fast_delays._fft_len(t, k) // 2 + 1) * b * ch * 8
    with TensorMemory() as mem:
        y.backward(grad_y)
    assert x.grad is not None and pos.grad is not None
    assert mem.peak_bytes <= 3 * spectrum + 4 * weight.nbytes * k, (mem.peak_bytes, spectrum)


def test_spectral_products_are_written_over_an_operand(monkeypatch):
    """Where a product has the shape of one of its operands (the forward and dL/dx of a square
    layer, dL/dk where B == O) and the operand is not needed again, CUDA's spectral path writes
    it over that operand in frequency chunks: a quarter of a spectrum at a time, not a third
    spectrum-sized buffer. The values are those of the plain products."""
    from snn_delays import fast_delays as fd

    monkeypatch.setattr(fd, "_load_lib", lambda: None)
    torch.manual_seed(0)
    t, b, ch, k = 40, 16, 16, 9
    n, t_out = fd._fft_len(t, k), t + (k - 1) // 2
    x, grad_y, kernel = torch.rand(t, b, ch).round(), torch.randn(t_out, b, ch), torch.randn(ch, ch, k)
    spectrum = (n // 2 + 1) * b * ch * 8
    output = n * b * ch * 4  # an inverse transform's, before its rows are cut
    products = {
        "forward": lambda sp, free: fd._fft_forward(x, kernel, t_out, sp, free=free),
        "dL/dx": lambda sp, free: fd._fft_grad_input(grad_y, kernel, t, sp, free=free),
        "dL/dk": lambda sp, free: fd._fft_grad_kernel_spectrum(None, grad_y, sp, free_x=free),
    }
    for name, product in products.items():
        results = []
        for free in (False, True):
            spectra = fd._Spectra(n)
            spectra.of_x(x), spectra.of_g(grad_y), spectra.of_h(kernel)
            with TensorMemory() as mem:
                results.append(product(spectra, free))
            peak = mem.peak_bytes - (0 if name == "dL/dk" else output)
            assert peak <= (spectrum / 3 if free else spectrum * 2), (name, free, peak / spectrum)
        torch.testing.assert_close(results[1], results[0], msg=name)


def test_spectral_transforms_are_products_without_padded_copies(monkeypatch):
    """Off the C path, x's and dL/dy's transforms, the kernel's and dL/dk's inverse (its K
    rows) are products with cached DFT matrices in full float32: torch.fft's values, without
    rfft's zero-padded (n, ...) copy of the input, a complex copy of the whole kernel, or an
    n-point inverse (and its complex product) of which K rows are kept; a dL/dk spectrum
    with its frequencies outermost is copied a block of columns at a time, not whole."""
    from snn_delays import fast_delays as fd

    monkeypatch.setattr(fd, "_load_lib", lambda: None)
    torch.manual_seed(4)
    t, b, n_in, n_out, k = 40, 16, 24, 32, 9
    n = fd._fft_len(t, k)
    x, kernel = torch.randn(t, b, n_in), torch.randn(n_out, n_in, k)
    spec = fd._rdft(torch.randn(t, n_out, n_in), n)  # a dL/dh spectrum, frequencies innermost
    fd._rdft(x, n), fd._kernel_spectrum(kernel, n), fd._grad_kernel_from_spectrum(spec, n, k)  # constants

    with TensorMemory() as mem:
        xs = fd._rdft(x, n)
    assert mem.peak_bytes == xs.untyped_storage().nbytes() == (n // 2 + 1) * b * n_in * 8
    torch.testing.assert_close(xs, torch.fft.rfft(x, n=n, dim=0), rtol=1e-4, atol=1e-4)

    with TensorMemory() as mem:
        h = fd._kernel_spectrum(kernel, n)
    assert mem.peak_bytes <= h.untyped_storage().nbytes() + kernel.nbytes * 2 // fd.FREQ_CHUNKS + 1024
    want = torch.fft.rfft(kernel.flip(2).permute(2, 0, 1), n=n, dim=0)
    torch.testing.assert_close(h, want, rtol=1e-4, atol=1e-4)

    with TensorMemory() as mem:
        gk = fd._grad_kernel_from_spectrum(spec, n, k)
    assert mem.peak_bytes == gk.nbytes == kernel.nbytes
    want = torch.fft.irfft(spec, n=n, dim=0)[:k].flip(0).permute(1, 2, 0)
    torch.testing.assert_close(gk, want, rtol=1e-4, atol=1e-5)
    outermost = spec.contiguous()  # a product of its own (B != O): frequencies outermost
    with TensorMemory() as mem:
        gk = fd._grad_kernel_from_spectrum(outermost, n, k)
    assert mem.peak_bytes <= gk.nbytes + outermost.nbytes // fd.FREQ_CHUNKS + 1024  # a block's copy
    torch.testing.assert_close(gk, want, rtol=1e-4, atol=1e-5)


def test_spectral_readout_runs_in_batch_blocks(monkeypatch):
    """A readout-shaped layer (out << in, batch): CUDA's spectral path runs it in batch blocks
    by itself. The forward holds one block's padded input and spectrum at a time, not the
    whole batch's; the backward makes dL/dk over every block first and frees x (here unpacked
    for the backward alone, as model.SavedSpikes does) before dL/dx is allocated."""
    from snn_delays import fast_delays

    monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    torch.manual_seed(3)
    t, b, n_in, n_out, k = 60, 32, 32, 2, 9
    assert len(fast_delays.fft_batch_blocks(b, n_in, n_out)) == 4
    weight = torch.randn(n_out, n_in, requires_grad=True)
    pos = (torch.rand(n_out, n_in) * 6 - 3).requires_grad_()
    x = torch.rand(t, b, n_in).round().requires_grad_()
    n = fast_delays._fft_len(t, k)
    spectrum = (n // 2 + 1) * b * n_in * 8  # x's spectrum, the whole batch
    padded = n * b * n_in * 4
    with TensorMemory() as mem:
        y = delay_conv(x, weight, pos, 1.0, k, impl="fft")
    assert mem.peak_bytes <= y.nbytes + (spectrum + padded) / 2, (mem.peak_bytes, spectrum, padded)
    with torch.autograd.graph.saved_tensors_hooks(torch.clone, torch.clone):
        y = delay_conv(x, weight, pos, 1.0, k, impl="fft")
    with TensorMemory() as mem:
        y.backward(torch.randn_like(y))
    assert x.grad is not None and pos.grad is not None
    assert mem.peak_bytes <= x.nbytes + (spectrum + padded) / 2, (mem.peak_bytes, x.nbytes, spectrum)


@pytest.mark.parametrize(("n_in", "n_out"), [(30, 40), (40, 10)])
def test_cuda_evaluation_path_unfolds_in_small_blocks(n_in, n_out, monkeypatch):
    """CUDA's integer-delay path (``fft`` without the C kernels: the GEMM path, no gradient)
    needs y, one kernel-sized buffer (the weight scattered straight into the GEMM's layout,
    no (O, I, K) kernel beside it) and one block of at most ``EVAL_CHUNK`` floats (the taps on
    the input side, I <= O: an unfolded block and, at the ends, a padded copy of its own
    steps; on the output side: ``x @ w``'s rows for the block, at least K of them), never
    the K-times-wider unfolded input at once, nor a padded copy of the whole input."""
    from snn_delays import fast_delays

    monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    budget = 10_000  # floats
    monkeypatch.setattr(fast_delays, "EVAL_CHUNK", budget)
    torch.manual_seed(1)
    t, b, k = 1000, 8, 25
    x = torch.rand(t, b, n_in).round()
    weight = torch.randn(n_out, n_in)
    delays = torch.randint(0, k, (n_out, n_in))
    with torch.no_grad(), TensorMemory() as mem:
        y = fast_delays.integer_delay_conv(x, weight, delays, k, impl="fft")
    t_out = t + (k - 1) // 2
    padded = (t_out + k - 1) * b * n_in * 4
    kernel = n_out * n_in * k * 4
    if n_in <= n_out:
        steps = max(1, budget // (b * k * n_in))
        block = budget * 4 + (steps + k - 1) * b * n_in * 4  # unfolded, and an end's padded steps
    else:
        block = max(budget, k * b * k * n_out) * 4 + t_out * b * n_out * 4 // 8  # x @ w, a sum
    assert y.shape == (t_out, b, n_out)
    assert mem.peak_bytes <= y.nbytes + kernel + 2 * delays.nbytes + block < y.nbytes + padded
    assert block < t_out * b * k * min(n_in, n_out) * 4  # the whole unfolded input


def test_gaussian_kernel_of_the_cuda_paths_keeps_nothing_for_the_backward():
    """Its (out, in, K) intermediates are recomputed in the backward, not kept; the gradients
    are those of autograd through the same operators, bit for bit."""
    from snn_delays import fast_delays

    torch.manual_seed(2)
    weight = torch.randn(32, 24, requires_grad=True)
    pos = (torch.rand(32, 24) * 10 - 5).requires_grad_()
    g = torch.randn(32, 24, 11)
    grads = []
    for fn in (fast_delays.gaussian_kernel, fast_delays.recomputed_gaussian_kernel):
        with TensorMemory() as mem:
            kernel = fn(weight, pos, 1.0, 11)
            kept = mem.live_bytes - kernel.untyped_storage().nbytes()
        grads.append((kept, torch.autograd.grad(kernel, (weight, pos), g)))
    (kept_plain, want), (kept, got) = grads
    assert kept == 0 < kept_plain
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    only_pos = fast_delays.recomputed_gaussian_kernel(weight.detach(), pos, 1.0, 11)
    (dp,) = torch.autograd.grad(only_pos, pos, g)
    assert torch.equal(dp, want[1])


SWEEP_JOB = """
import sys
from pathlib import Path

import torch

from snn_delays.data.synthetic import make_synthetic
from snn_delays.loggers import NullLogger
from snn_delays.memtrack import peak_mib
from snn_delays.model import DelaySNN
from snn_delays.training import FitConfig, Optimization, fit

big = bytearray(1500 * 2**20)  # an earlier job of the sweep, in the same process
big[:: 4096] = b"x" * len(range(0, len(big), 4096))  # touched: resident
del big
before = peak_mib("cpu")
torch.manual_seed(0)
data = make_synthetic(n_train=64, n_valid=16, n_test=16, seed=1)
model = DelaySNN(8, 4, n_hidden=16, n_layers=1, kernel_size=7)
weights = torch.optim.Adam(model.weight_parameters(), lr=1e-3)
opt = Optimization(weights, torch.optim.lr_scheduler.ConstantLR(weights, factor=1.0))
cfg = FitConfig(1, 32, 32, progress=False, save_checkpoints=False, cuda_graphs=False)
state = fit(model, data, opt, NullLogger(), cfg, Path(sys.argv[1]))
print(before, state.peak_memory_mib)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's VmHWM reset")
def test_a_runs_peak_memory_leaves_out_the_sweep_jobs_before_it(tmp_path):
    """Hydra's launcher runs a -m sweep's jobs in one process: each job's peak_memory_mib was the
    largest of all the jobs before it (VmHWM on the CPU, the allocator's peak on CUDA)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", SWEEP_JOB, str(tmp_path)], capture_output=True, text=True, check=True
    )
    before, peak = map(float, proc.stdout.split())
    assert before > 1500 and peak < before - 1000, (before, peak)


def test_outputs_written_into_older_tensors_and_every_output_of_an_op_count():
    """``out=`` into a tensor made before the block allocates nothing; an operator with several
    outputs (BatchNorm: output, mean, inverse deviation) counts each of them."""
    x, buf = torch.randn(250_000), torch.empty(250_000)
    with TensorMemory() as mem:
        torch.mul(x, 2, out=buf)
        torch.add(x, 1, out=buf)
    assert mem.allocated_bytes == 0
    y = torch.randn(1000, 250)
    with TensorMemory() as mem:
        outs = torch.native_batch_norm(y, None, None, None, None, True, 0.1, 1e-5)
    assert mem.allocated_bytes == sum(t.untyped_storage().nbytes() for t in outs) == y.nbytes + 2 * 250 * 4
