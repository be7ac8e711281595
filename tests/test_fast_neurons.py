"""The fused CPU LIF equals spikingjelly's LIFNode: identical spikes, gradients to float32."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import neuron, surrogate

from snn_delays import fast_neurons
from snn_delays.neurons import READOUT_THRESHOLD, SpikingNeurons, lif_reference

IMPLS = ["c", "torch", "triton"]  # the C kernel, the torch loop, Triton (interpreted here)


def _lif(x, tau, threshold, alpha, impl, request, return_v=False):  # noqa: ANN001, ANN202
    if impl == "triton":
        request.getfixturevalue("triton_interpreted")
        from snn_delays import triton_neurons

        return triton_neurons.lif_multi_step(x, tau, threshold, alpha, return_v=return_v)
    return fast_neurons.lif_multi_step(x, tau, threshold, alpha, return_v=return_v, use_c=impl == "c")


def _sj(tau: float, threshold: float, alpha: float, readout: bool) -> neuron.LIFNode:
    return neuron.LIFNode(
        tau=tau,
        decay_input=False,
        v_threshold=threshold,
        v_reset=0.0,
        surrogate_function=surrogate.ATan(alpha=alpha),
        detach_reset=True,
        step_mode="m",
        store_v_seq=readout,
    )


def _current(t: int, b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, b, n, generator=g) * 0.8 + 0.3


@pytest.mark.parametrize("tau", [1.005, 1.5, 2.0, 10.0])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", [5.0, 2.0])
def test_spiking_equals_spikingjelly(tau, impl, alpha, request):
    x = _current(37, 5, 300, seed=int(tau * 10))  # 1500 neurons: several C chunks, a partial one
    node = _sj(tau, 1.0, alpha, readout=False)
    xs = x.clone().requires_grad_()
    want = node(xs)
    gout = torch.randn_like(want, generator=torch.Generator().manual_seed(1))
    want.backward(gout)
    xf = x.clone().requires_grad_()
    got = _lif(xf, tau, 1.0, alpha, impl, request)
    got.backward(gout)
    assert 0.05 < float(want.detach().mean()) < 0.6  # spikes and silences both present
    assert torch.equal(got, want)
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(got, lif_reference(x, tau)[0])


@pytest.mark.parametrize("tau", [1.005, 1.5])
@pytest.mark.parametrize("impl", IMPLS)
def test_readout_membrane_equals_spikingjelly(tau, impl, request):
    x = _current(29, 3, 70, seed=3)
    node = _sj(tau, READOUT_THRESHOLD, 5.0, readout=True)
    xs = x.clone().requires_grad_()
    node(xs)
    want = node.v_seq
    gout = torch.randn_like(want, generator=torch.Generator().manual_seed(2))
    want.backward(gout)
    xf = x.clone().requires_grad_()
    got = _lif(xf, tau, READOUT_THRESHOLD, 5.0, impl, request, return_v=True)
    got.backward(gout)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, lif_reference(x, tau, threshold=float("inf"))[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_readout_gradient_stays_finite_past_a_nan_membrane(impl, request):
    """A NaN current at one step (a diverging run): spikingjelly's readout gradient stays finite
    elsewhere, and so does ours; the unused spike output adds no surrogate term (its gradient
    once arrived as zeros, and 0 * surrogate(NaN) spread NaN over every step)."""
    x = _current(9, 2, 5, seed=4)
    x[3, 1, 2] = float("nan")
    node = _sj(1.5, READOUT_THRESHOLD, 5.0, readout=True)
    xs = x.clone().requires_grad_()
    node(xs)
    node.v_seq.sum().backward()
    xf = x.clone().requires_grad_()
    _lif(xf, 1.5, READOUT_THRESHOLD, 5.0, impl, request, return_v=True).sum().backward()
    assert torch.isfinite(xs.grad).all()
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["c", "torch"])
def test_a_second_derivative_through_the_lif_is_an_error(impl, monkeypatch):
    """A gradient penalty through the fused LIF asks for its second derivative, which its
    kernels do not give: an error naming the setting that does, not a silent zero."""
    if impl == "torch":
        monkeypatch.setattr(fast_neurons, "_load_lib", lambda: None)
    x = _current(20, 3, 7, seed=6).requires_grad_()
    neurons = SpikingNeurons(1.5)
    assert neurons.kernels(x) == impl
    with pytest.raises(RuntimeError, match="first derivatives only.*SNN_DELAYS_NEURON_IMPL=spikingjelly"):
        torch.autograd.grad(neurons(x).sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(SpikingNeurons(1.5, impl="spikingjelly")(x).sum(), x, create_graph=True)
    assert gx.requires_grad  # the setting named computes it


def test_tau_is_a_float_above_one():
    x = _current(10, 2, 3, seed=7)
    assert torch.equal(SpikingNeurons(2)(x), SpikingNeurons(2.0)(x))  # an int, as a config may give
    for kind in ("lif", "plif"):
        with pytest.raises(ValueError, match=f"{kind} needs tau > 1"):
            SpikingNeurons(1.0, kind=kind)


def test_module_switch_and_eval():
    x = _current(20, 4, 33, seed=5)
    fast = SpikingNeurons(1.5)
    slow = SpikingNeurons(1.5, impl="spikingjelly")
    with torch.no_grad():
        assert torch.equal(fast(x), slow(x))
    assert torch.equal(
        SpikingNeurons(1.5, readout=True)(x), SpikingNeurons(1.5, readout=True, impl="spikingjelly")(x)
    )
    with pytest.raises(ValueError):
        SpikingNeurons(1.5, impl="nope")
    with pytest.raises(ValueError, match="lif"):
        SpikingNeurons(1.5, kind="plif", impl="triton")


def test_module_on_triton(triton_interpreted):
    x = _current(20, 4, 33, seed=6).requires_grad_()
    for readout in (False, True):
        got = SpikingNeurons(1.5, readout=readout, impl="triton")(x)
        want = SpikingNeurons(1.5, readout=readout, impl="spikingjelly")(x)
        assert torch.equal(got, want)
        g = torch.autograd.grad(got.sum(), x)[0]
        torch.testing.assert_close(g, torch.autograd.grad(want.sum(), x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 3, 4), (5, 0, 4)])
def test_triton_lif_takes_empty_inputs(triton_interpreted, shape):
    from snn_delays import triton_neurons

    for return_v in (False, True):
        x = torch.zeros(shape, requires_grad=True)
        y = triton_neurons.lif_multi_step(x, 1.5, return_v=return_v)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape


@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("shape", [(0, 3, 4), (5, 0, 4)])
def test_cpu_lif_takes_empty_inputs(use_c, shape):
    """The C kernel and the torch loop, as the Triton LIF: zero steps or zero neurons give
    empty spikes, membranes and gradients, not an IndexError."""
    if use_c and not fast_neurons.c_kernels_available():
        pytest.skip("no C compiler")
    for return_v in (False, True):
        x = torch.zeros(shape, requires_grad=True)
        y = fast_neurons.lif_multi_step(x, 1.5, return_v=return_v, use_c=use_c)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape


def test_auto_runs_the_triton_lif_on_cuda_tensors(triton_interpreted, monkeypatch):
    """``auto`` on a float32 CUDA tensor (stood in for by the interpreter's CPU tensors) runs the
    Triton LIF, which keeps only the pre-reset membrane; PLIF and CPU tensors do not."""
    from snn_delays import neurons, triton_neurons

    assert not neurons.triton_lif_usable(torch.zeros(1))  # a CPU tensor: the C kernel's
    calls = []
    lif = triton_neurons.lif_multi_step
    monkeypatch.setattr(triton_neurons, "lif_multi_step", lambda *a, **k: calls.append(1) or lif(*a, **k))
    monkeypatch.setattr(fast_neurons, "usable", lambda x: False)
    monkeypatch.setattr(neurons, "triton_lif_usable", lambda x: True)
    x = _current(20, 4, 33, seed=7).requires_grad_()
    for readout in (False, True):
        got = SpikingNeurons(1.5, readout=readout)(x)
        want = SpikingNeurons(1.5, readout=readout, impl="spikingjelly")(x)
        assert torch.equal(got, want)
        g = torch.autograd.grad(got.sum(), x)[0]
        torch.testing.assert_close(g, torch.autograd.grad(want.sum(), x)[0], rtol=1e-5, atol=1e-6)
    assert len(calls) == 2
    SpikingNeurons(1.5, kind="plif")(x)
    assert len(calls) == 2  # PLIF stays on spikingjelly


def test_c_kernel_compiles():
    assert fast_neurons.c_kernels_available()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_membrane_exactly_at_threshold_spikes(impl, request):
    """spikingjelly fires where ``v >= threshold`` (its Heaviside is ``x >= 0``): a membrane that
    lands exactly on the threshold spikes and resets, and its gradient is a spike's (surrogate,
    reset path cut). Currents on a coarse binary grid with tau = 2 make such membranes common."""
    x = torch.randint(-4, 7, (40, 4, 64), generator=torch.Generator().manual_seed(8)) / 4
    assert (lif_reference(x, 2.0)[1] == 1.0).float().mean() > 0.01
    node = _sj(2.0, 1.0, 5.0, readout=False)
    xs = x.clone().requires_grad_()
    want = node(xs)
    gout = torch.randn_like(want, generator=torch.Generator().manual_seed(1))
    want.backward(gout)
    xf = x.clone().requires_grad_()
    got = _lif(xf, 2.0, 1.0, 5.0, impl, request)
    got.backward(gout)
    assert torch.equal(got, want)
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_membrane_of_a_spiking_population_equals_spikingjelly(impl, request):
    """``return_v`` with a threshold that is reached: the post-reset membrane (0 after a spike)
    and its gradient, which the detached reset cuts at every spike, as spikingjelly's ``v_seq``."""
    x = _current(29, 3, 70, seed=9)
    node = _sj(1.5, 1.0, 5.0, readout=True)  # store_v_seq
    xs = x.clone().requires_grad_()
    assert 0.05 < float(node(xs).detach().mean()) < 0.6
    want = node.v_seq
    gout = torch.randn_like(want, generator=torch.Generator().manual_seed(2))
    want.backward(gout)
    xf = x.clone().requires_grad_()
    got = _lif(xf, 1.5, 1.0, 5.0, impl, request, return_v=True)
    got.backward(gout)
    assert torch.equal(got, want)
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_module_passes_its_surrogate_alpha_to_the_kernels(impl, request, monkeypatch):
    """``SpikingNeurons(alpha=...)`` (``model.surrogate_alpha``) reaches every implementation:
    the gradient is spikingjelly's with ATan(alpha), not with the default alpha."""
    if impl == "triton":
        request.getfixturevalue("triton_interpreted")
    if impl == "torch":
        monkeypatch.setattr(fast_neurons, "_load_lib", lambda: None)
    x = _current(20, 4, 33, seed=10).requires_grad_()
    gout = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for readout in (False, True):
        neurons = SpikingNeurons(1.5, alpha=2.0, readout=readout, impl="triton" if impl == "triton" else None)
        assert neurons.kernels(x) == impl
        got = neurons(x)
        want = SpikingNeurons(1.5, alpha=2.0, readout=readout, impl="spikingjelly")(x)
        assert torch.equal(got, want)
        g = torch.autograd.grad(got, x, gout)[0]
        torch.testing.assert_close(g, torch.autograd.grad(want, x, gout)[0], rtol=1e-5, atol=1e-6)


def test_other_dtypes_stay_off_the_float32_kernels():
    """The fused kernels read float32: a float64 current runs spikingjelly under ``auto``, and
    ``lif_multi_step(use_c=True)`` its torch loop, both in float64 (not its bytes as float32)."""
    x = _current(20, 4, 33, seed=11).double().requires_grad_()
    want = SpikingNeurons(1.5, impl="spikingjelly")(x)
    neurons = SpikingNeurons(1.5)
    assert neurons.kernels(x) == "spikingjelly"
    got = neurons(x)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    got = fast_neurons.lif_multi_step(x, 1.5, use_c=True)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    g = torch.autograd.grad(got.sum(), x)[0]
    torch.testing.assert_close(g, torch.autograd.grad(want.sum(), x)[0])
