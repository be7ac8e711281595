"""BatchNorm + LIF as one autograd step (snn_delays.bn_lif): the function of the two modules,
keeping only BatchNorm's input for the backward."""

from __future__ import annotations

import copy

import pytest
import torch

from snn_delays import fast_neurons
from snn_delays.bn_lif import batchnorm_lif, batchnorm_lif_eval, eval_fusable, fusable
from snn_delays.memtrack import TensorMemory
from snn_delays.model import DelaySNN, TimeBatchNorm
from snn_delays.neurons import SpikingNeurons

IMPLS = ["c", "torch", "triton"]  # the C kernel, the torch loop, Triton (interpreted here)


def _pair(impl: str, request, monkeypatch, momentum: float | None = 0.1):  # noqa: ANN001, ANN202
    if impl == "triton":
        request.getfixturevalue("triton_interpreted")
    if impl == "torch":
        monkeypatch.setattr(fast_neurons, "_load_lib", lambda: None)
    torch.manual_seed(0)
    bn = TimeBatchNorm(64, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-0.5, 1.0)
        bn.running_mean.uniform_(-1, 1)
    neurons = SpikingNeurons(2.0, impl="triton" if impl == "triton" else None)
    return bn, copy.deepcopy(bn), neurons


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_step_equals_batchnorm_then_lif(impl, momentum, request, monkeypatch):
    """The same spikes, gradients for the input and BatchNorm's weight and bias to float32
    rounding, and the same running statistics (momentum, or the cumulative average)."""
    bn, bn_fused, neurons = _pair(impl, request, monkeypatch, momentum)
    y = torch.randn(50, 8, 64, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    assert fusable(bn_fused, neurons, y)
    assert neurons.kernels(y) == impl
    out = {}
    for fused, module in ((False, bn), (True, bn_fused)):
        for _ in range(2):  # two steps: the running statistics' update compounds
            x = y.clone().requires_grad_()
            spikes = batchnorm_lif(x, module, neurons) if fused else neurons(module(x))
            module.zero_grad(set_to_none=True)
            spikes.backward(grad)
        out[fused] = (spikes.detach(), x.grad, module.weight.grad, module.bias.grad)
    assert 0.1 < float(out[True][0].mean()) < 0.5  # spikes and silences both present
    assert torch.equal(out[True][0], out[False][0])
    for got, want in zip(out[True][1:], out[False][1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(bn_fused.running_mean, bn.running_mean)
    torch.testing.assert_close(bn_fused.running_var, bn.running_var)
    assert int(bn_fused.num_batches_tracked) == int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_without_a_batch_counter_follow_batchnorm(momentum, request, monkeypatch):
    """A BatchNorm whose ``num_batches_tracked`` is None (set so by user code, or from an old
    state dict) still updates its running statistics by its momentum; without a momentum it
    keeps them, as ``nn.BatchNorm1d`` does."""
    bn, bn_fused, neurons = _pair("torch", request, monkeypatch, momentum)
    bn.num_batches_tracked = bn_fused.num_batches_tracked = None
    before = bn.running_mean.clone()
    y = torch.randn(20, 4, 64, generator=torch.Generator().manual_seed(3)) + 1.0
    neurons(bn(y))
    batchnorm_lif(y, bn_fused, neurons)
    torch.testing.assert_close(bn_fused.running_mean, bn.running_mean)
    torch.testing.assert_close(bn_fused.running_var, bn.running_var)
    assert torch.equal(bn.running_mean, before) == (momentum is None)


def test_one_value_per_channel_is_refused_as_batchnorm_refuses_it(request, monkeypatch):
    """T B = 1 in training: BatchNorm raises; the fused step did not, and left NaN in running_var."""
    bn, bn_fused, neurons = _pair("c", request, monkeypatch)
    y = torch.randn(1, 1, 64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        neurons(bn(y))
    before = bn_fused.running_var.clone()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batchnorm_lif(y, bn_fused, neurons)
    assert torch.equal(bn_fused.running_var, before)


@pytest.mark.parametrize("impl", ["c", "torch"])
def test_fused_step_keeps_no_membrane_for_the_backward(impl, request, monkeypatch):
    """Between forward and backward the two modules keep the LIF's membrane (one (T, B, C)
    tensor besides BatchNorm's input, the caller's); the fused step keeps (C,) statistics
    only. Its backward holds one recomputed membrane, over which dL/dy is written: no more
    than the two modules' backward."""
    bn, bn_fused, neurons = _pair(impl, request, monkeypatch)
    y = torch.randn(50, 8, 64, generator=torch.Generator().manual_seed(1)) + 0.5
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    kept, backward_extra = {}, {}
    for fused, module in ((False, bn), (True, bn_fused)):
        x = y.clone().requires_grad_()
        with TensorMemory() as mem:
            spikes = batchnorm_lif(x, module, neurons) if fused else neurons(module(x))
            kept[fused] = mem.live_bytes - spikes.untyped_storage().nbytes()
            mem.reset_peak()
            spikes.backward(grad)
            backward_extra[fused] = mem.peak_bytes - spikes.untyped_storage().nbytes() - kept[fused]
    assert kept[False] >= y.nbytes
    assert kept[True] <= 16 * 64 * 4, kept  # a few (C,) statistics
    small = 64 * 64 * 4  # (C,) vectors, one time step's temporaries
    assert backward_extra[True] <= min(y.nbytes, backward_extra[False]) + small, backward_extra


def test_lif_forward_folds_the_affine_current_in():
    """``lif_forward(x, affine=(scale, shift))`` is the LIF of ``x * scale + shift`` (a multiply,
    then an add): the same spikes and membranes, in the C kernel and the torch loop."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, 40, generator=g)
    scale, shift = torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g)
    want = fast_neurons.lif_forward(x * scale + shift, 1.5, 1.0, (True, True, True), use_c=False)
    for use_c in (True, False):
        got = fast_neurons.lif_forward(x, 1.5, 1.0, (True, True, True), use_c, (scale, shift))
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def _model_counting(monkeypatch, name: str):  # noqa: ANN001, ANN202
    """(calls, model, x): a seeded 2-hidden-block model whose calls of ``model.<name>`` (a
    bn_lif function) are appended to ``calls``, and a spike input for it."""
    import snn_delays.model as model_module

    calls = []
    real = getattr(model_module, name)
    monkeypatch.setattr(model_module, name, lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = DelaySNN(12, 3, n_hidden=24, n_layers=2, kernel_size=7, dropout=0.4)
    model.set_sigma(1.0)
    return calls, model, (torch.rand(30, 8, 12) < 0.3).float()


def test_model_trains_with_the_fused_step_and_evaluates_without_it(monkeypatch):
    """The model's hidden blocks run the fused step while training (the same loss and gradients
    as the two modules to float32 rounding), and not in evaluation (its running statistics
    are left alone; evaluation has its own fold, test_model_evaluates_with_batchnorm_folded)."""
    calls, model, x = _model_counting(monkeypatch, "batchnorm_lif")
    out = {}
    for fuse in (False, True):
        monkeypatch.setattr(DelaySNN, "fuse_batchnorm_lif", fuse)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        loss = model(x).square().mean()
        loss.backward()
        out[fuse] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(calls) == 2  # two hidden blocks, fused once
    torch.testing.assert_close(out[True][0], out[False][0])
    assert len(out[True][1]) == len(out[False][1]) >= 8
    for got, want in zip(out[True][1], out[False][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_affine_current_over_many_chunks_takes_each_columns_channel(impl, request):
    """The folded affine over more neurons than one C chunk (512) or Triton program (256), with a
    channel count that divides neither: each column's channel is its index modulo C in
    whichever chunk or program holds it (as the unfused current ``x * scale + shift``)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 9, 100, generator=g)  # 900 columns
    scale, shift = torch.rand(100, generator=g) + 0.5, torch.randn(100, generator=g)
    want = fast_neurons.lif_forward(x * scale + shift, 1.5, 1.0, (True, True, True), use_c=False)
    if impl == "triton":
        request.getfixturevalue("triton_interpreted")
        from snn_delays import triton_neurons

        got = triton_neurons.lif_forward(x, 1.5, 1.0, (True, True, True), (scale, shift))
    else:
        got = fast_neurons.lif_forward(x, 1.5, 1.0, (True, True, True), impl == "c", (scale, shift))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_step_uses_the_neurons_alpha_and_batchnorms_eps(impl, request, monkeypatch):
    """A surrogate alpha and a BatchNorm eps other than the defaults reach the fused step: the
    spikes and gradients of BatchNorm then LIF with those settings."""
    bn, bn_fused, _ = _pair(impl, request, monkeypatch)
    bn.eps = bn_fused.eps = 0.5
    neurons = SpikingNeurons(2.0, alpha=2.0, impl="triton" if impl == "triton" else None)
    y = torch.randn(30, 8, 64, generator=torch.Generator().manual_seed(1)) + 0.3
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    out = {}
    for fused, module in ((False, bn), (True, bn_fused)):
        x = y.clone().requires_grad_()
        spikes = batchnorm_lif(x, module, neurons) if fused else neurons(module(x))
        spikes.backward(grad)
        out[fused] = (spikes.detach(), x.grad, module.weight.grad, module.bias.grad)
    assert 0.05 < float(out[True][0].mean()) < 0.6
    assert torch.equal(out[True][0], out[False][0])
    for got, want in zip(out[True][1:], out[False][1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(bn_fused.running_var, bn.running_var)


def test_fusable_only_for_a_training_batchnorm_before_hidden_fused_neurons(request, monkeypatch):
    """A BatchNorm in eval mode (frozen inside a training model) normalises with its running
    statistics and leaves them alone: not the fused step, which uses and updates the batch's.
    Nor a readout, spikingjelly's LIF, another dtype, or a BatchNorm without affine parameters
    or running statistics."""
    bn, _, neurons = _pair("c", request, monkeypatch)
    y = torch.randn(10, 4, 64)
    assert fusable(bn, neurons, y)
    assert not fusable(bn.eval(), neurons, y)
    bn.train()
    assert not fusable(bn, SpikingNeurons(2.0, readout=True), y)
    assert not fusable(bn, SpikingNeurons(2.0, impl="spikingjelly"), y)
    assert not fusable(bn, neurons, y.double())
    assert not fusable(TimeBatchNorm(64, affine=False), neurons, y)
    assert not fusable(TimeBatchNorm(64, track_running_stats=False), neurons, y)
    torch.manual_seed(0)
    model = DelaySNN(12, 3, n_hidden=24, n_layers=1, kernel_size=7)
    model.set_sigma(1.0)
    frozen = model.blocks[0][1].eval()
    before = [b.clone() for b in frozen.buffers()]
    model((torch.rand(30, 8, 12) < 0.3).float()).square().mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(frozen.buffers(), before, strict=True))


@pytest.mark.skipif(not fast_neurons.c_kernels_available(), reason="no C compiler")
def test_evaluation_folds_batchnorm_into_the_c_lif(request, monkeypatch):
    """Evaluation (running statistics, no gradients) on the C LIF: BatchNorm's per-channel
    affine inside the LIF kernel gives the two modules' spikes."""
    bn, _, neurons = _pair("c", request, monkeypatch)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    y = torch.randn(50, 8, 64, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    with torch.no_grad():
        assert eval_fusable(bn, neurons, y)
        want = neurons(bn(y))
        got = batchnorm_lif_eval(y, bn, neurons)
    assert 0.1 < float(want.mean()) < 0.5  # spikes and silences both present
    assert torch.equal(got, want)


def test_evaluation_fold_only_without_gradients_on_the_c_lif(request, monkeypatch):
    """Not while BatchNorm trains (batch statistics), with gradients on (evaluation with
    gradients keeps autograd's two modules), for a readout, another LIF implementation, another
    dtype, or a BatchNorm without affine parameters or running statistics."""
    bn, _, neurons = _pair("c", request, monkeypatch)
    y = torch.randn(10, 4, 64)
    bn.eval()
    with torch.no_grad():
        assert eval_fusable(bn, neurons, y) == fast_neurons.c_kernels_available()
        assert not eval_fusable(bn.train(), neurons, y)
        bn.eval()
        assert not eval_fusable(bn, SpikingNeurons(2.0, readout=True), y)
        assert not eval_fusable(bn, SpikingNeurons(2.0, impl="spikingjelly"), y)
        assert not eval_fusable(bn, neurons, y.double())
        assert not eval_fusable(TimeBatchNorm(64, affine=False).eval(), neurons, y)
        assert not eval_fusable(TimeBatchNorm(64, track_running_stats=False).eval(), neurons, y)
        monkeypatch.setattr(fast_neurons, "_load_lib", lambda: None)  # the torch loop
        assert not eval_fusable(bn, neurons, y)
    monkeypatch.undo()
    assert not eval_fusable(bn, neurons, y)  # gradients on


@pytest.mark.skipif(not fast_neurons.c_kernels_available(), reason="no C compiler")
def test_model_evaluates_with_batchnorm_folded(monkeypatch):
    """A model in evaluation runs each hidden block's BatchNorm and LIF as one C pass, with the
    two modules' output; with gradients on (or ``fuse_batchnorm_lif`` off) it runs both."""
    calls, model, x = _model_counting(monkeypatch, "batchnorm_lif_eval")
    model(x).sum().backward()  # running statistics away from their initial values
    model.eval()
    out = {}
    for fuse in (False, True):
        monkeypatch.setattr(DelaySNN, "fuse_batchnorm_lif", fuse)
        with torch.no_grad():
            out[fuse], spikes = model(x, return_spikes=True)
        assert len(calls) == 2 * fuse  # two hidden blocks
        assert float(spikes[0].mean()) > 0.02
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-6)
    model(x)  # gradients on: the two modules
    assert len(calls) == 2


@pytest.mark.skipif(not fast_neurons.c_kernels_available(), reason="no C compiler")
def test_evaluation_fold_adds_batchnorms_eps_to_the_running_variance(request, monkeypatch):
    """Running variances near zero (a channel that barely varied), where BatchNorm's eps sets
    the scale: the fold divides by sqrt(var + eps) as BatchNorm does."""
    bn, _, neurons = _pair("c", request, monkeypatch)
    bn.eps = 1e-2
    with torch.no_grad():
        bn.running_var.uniform_(0.0, 0.02)
    bn.eval()
    y = torch.randn(50, 8, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    with torch.no_grad():
        want = neurons(bn(y))
        got = batchnorm_lif_eval(y, bn, neurons)
    assert 0.05 < float(want.mean()) < 0.6  # spikes and silences both present
    assert torch.equal(got, want)
