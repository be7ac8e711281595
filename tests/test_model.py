"""The delay layer and the network: shapes, gradients, one optimizer step, integer delays."""

import math

import pytest
import torch

from snn_delays.delays import DelayLayer, gaussian_kernel, max_delay_steps, reference_delay_conv
from snn_delays.model import DelaySNN
from snn_delays.neurons import SpikingNeurons, lif_reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spikes(t, b, c, p=0.2):
    return (torch.rand(t, b, c) < p).float()


def test_kernel_size_from_ms():
    assert max_delay_steps(250, 10) == 25
    assert max_delay_steps(300, 10) == 31
    assert max_delay_steps(150, 10) == 15


@pytest.mark.parametrize("backend", ["fast", "dcls"])
def test_layer_shapes_and_growth(backend):
    layer = DelayLayer(6, 5, kernel_size=9, backend=backend)
    y = layer(spikes(20, 3, 6))
    assert y.shape == (20 + 4, 3, 5)  # (K-1)//2 steps longer


def test_network_lengths_follow_spec():
    model = DelaySNN(140, 20, n_hidden=16, n_layers=2, max_delay_ms=250, dt_ms=10, dropout=0.0)
    assert model.kernel_size == 25
    u, hidden = model(spikes(100, 2, 140), return_spikes=True)
    assert [h.shape[0] for h in hidden] == [112, 124]
    assert u.shape == (136, 2, 20)
    assert set(torch.unique(hidden[0]).tolist()) <= {0.0, 1.0}


def test_dcls_backend_matches_written_out_formula():
    layer = DelayLayer(4, 3, kernel_size=7, backend="dcls", sigma_init=1.3)
    x = torch.randn(15, 2, 4)
    expected = reference_delay_conv(x, layer.weight, layer.positions, layer.sigma, 7)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["fast", "dcls"])
def test_gradients_reach_weights_and_positions(backend):
    model = DelaySNN(8, 3, n_hidden=12, n_layers=2, kernel_size=7, delay_backend=backend, dropout=0.0)
    u = model(spikes(30, 4, 8, 0.3))
    u.pow(2).mean().backward()
    for p in model.weight_parameters() + model.delay_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_one_step_changes_weights_and_positions():
    model = DelaySNN(8, 3, n_hidden=12, n_layers=1, kernel_size=7, dropout=0.0)
    before = [p.detach().clone() for p in model.weight_parameters() + model.delay_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(spikes(30, 4, 8, 0.3)).pow(2).mean().backward()
    opt.step()
    after = model.weight_parameters() + model.delay_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_fixed_and_no_delays_variants():
    fixed = DelaySNN(8, 3, n_hidden=12, kernel_size=7, delays="fixed")
    assert fixed.delay_parameters() == [] and len(fixed.delay_layers()) == 3
    none = DelaySNN(8, 3, n_hidden=12, delays="none")
    assert none.delay_layers() == [] and none(spikes(10, 2, 8)).shape == (10, 2, 3)


@pytest.mark.parametrize("backend", ["fast", "dcls"])
def test_evaluated_layer_is_an_explicit_shifted_sum(backend):
    """y[t, o] = sum_i w[o,i] x[t - d[o,i], i] with d = K//2 - round(p)."""
    k = 9
    layer = DelayLayer(5, 4, kernel_size=k, backend=backend).eval()
    x = torch.randn(12, 2, 5)
    with torch.no_grad():
        y = layer(x)
    w, d = layer.weight.detach(), layer.delays()
    assert d.min() >= 0 and d.max() <= k - 1
    expected = torch.zeros(12 + (k - 1) // 2, 2, 4)
    for o in range(4):
        for i in range(5):
            dd = int(d[o, i])
            for t in range(expected.shape[0]):
                if 0 <= t - dd < 12:
                    expected[t, :, o] += w[o, i] * x[t - dd, :, i]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_sigma_and_clamp():
    layer = DelayLayer(3, 2, kernel_size=5)
    assert layer.sigma == 2  # K // 2
    layer.set_sigma(0.23)
    assert layer.sigma == pytest.approx(0.23)
    with torch.no_grad():
        layer.dcls.P.fill_(10.0)
    layer.clamp_positions()
    assert layer.positions.max() == 2
    assert torch.equal(layer.delays(), torch.zeros(2, 3, dtype=torch.long))


def test_gaussian_kernel_sums_to_weight():
    w, p = torch.randn(3, 4), torch.rand(3, 4) * 4 - 2
    k = gaussian_kernel(w, p, 0.23, 9)
    torch.testing.assert_close(k.sum(-1), w, rtol=1e-5, atol=1e-6)
    assert torch.equal(k.abs().argmax(-1), (p.round() + 4).long())


@pytest.mark.parametrize("tau", [1.005, 1.5])
def test_lif_sequence_equals_step_by_step(tau):
    x = torch.randn(25, 3, 7)
    s, _ = lif_reference(x, tau)
    torch.testing.assert_close(SpikingNeurons(tau)(x), s)
    _, v = lif_reference(x, tau, threshold=float("inf"))
    torch.testing.assert_close(SpikingNeurons(tau, readout=True)(x), v)


def test_no_state_leaks_between_calls():
    neurons = SpikingNeurons(1.5)
    x = torch.randn(10, 2, 3)
    first = neurons(x)
    assert torch.equal(neurons(x), first)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_sigma_is_read_again_only_when_it_changes(device):
    """The host copy of sigma follows set_sigma, load_state_dict and in-place edits (off the
    CPU it is cached by the parameter's storage and version)."""
    layer = DelayLayer(3, 4, 7, backend="fast", sigma_init=2.0).to(device)
    assert layer.sigma == 2.0
    layer.set_sigma(0.5)
    assert layer.sigma == 0.5
    other = DelayLayer(3, 4, 7, backend="fast", sigma_init=1.25)
    layer.load_state_dict(other.state_dict())
    assert layer.sigma == 1.25
    with torch.no_grad():
        layer.dcls.SIG.mul_(2)
    assert layer.sigma == 2.5


@pytest.mark.parametrize(("backend", "impl"), [("fast", "fft"), ("fast", None), ("dcls", None)])
def test_dropout_outputs_are_saved_as_bytes_with_the_same_gradients(backend, impl, monkeypatch):
    """While training, a hidden layer's dropout output (binary spikes times the mask) that the
    next delay layer saves for its backward is kept as ``x != 0`` plus the mask: the same
    gradients, bit for bit, and (fast backend) a quarter of the bytes between forward and
    backward. ``impl=None``: the default path of this machine (the C kernels), on its taps
    forward: the event and spectral forwards keep no x at all (test_fast_delays)."""
    from snn_delays import fast_delays
    from snn_delays.memtrack import TensorMemory

    if impl:
        monkeypatch.setenv("SNN_DELAYS_CONV_IMPL", impl)
        monkeypatch.setattr(fast_delays, "_load_lib", lambda: None)
    else:
        monkeypatch.setitem(fast_delays._FORCE, "forward", "taps")
    torch.manual_seed(0)
    model = DelaySNN(12, 3, n_hidden=24, n_layers=2, kernel_size=7, delay_backend=backend, dropout=0.4)
    model.set_sigma(1.0)
    x = (torch.rand(30, 8, 12) < 0.3).float()
    grads, kept = {}, {}
    for compact in (False, True):
        monkeypatch.setattr(DelaySNN, "compact_saved_spikes", compact)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        with TensorMemory() as mem:
            u = model(x)
            kept[compact] = mem.live_bytes - u.untyped_storage().nbytes()
            u.square().mean().backward()
        grads[compact] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(grads[True]) == len(grads[False]) >= 6  # weights and positions of 3 layers, BatchNorm
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))
    if backend == "fast":
        # the hidden outputs the next layers save, (T + (K-1)//2) and (T + K-1) steps x 8 x 24
        t1, t2 = 30 + 3, 30 + 6
        floats = (t1 + t2) * 8 * 24 * 4
        assert kept[False] - kept[True] >= floats * 3 // 4 - 1024, (kept, floats)


def test_network_needs_a_hidden_layer():
    """n_layers = 0 built a readout of n_hidden inputs fed n_inputs, which failed at the first
    forward with a shape error; now the construction names the key."""
    for kwargs in ({"n_layers": 0}, {"n_hidden": 0}):
        with pytest.raises(ValueError, match=f"model.{next(iter(kwargs))} must be a whole number >= 1"):
            DelaySNN(10, 3, kernel_size=5, **kwargs)


def _spec_delay_layer(x, w, p, sigma, k):
    """SPEC's training-mode layer written out in float64 loops: the Gaussian kernel
    ``w g(n - (p + K//2)) / (sum_n g + 1e-7)`` of width ``|sigma| + 0.27``, the input zero-padded
    by K-1 steps on the left and (K-1)//2 on the right, then cross-correlated."""
    t_in, b, n_in = x.shape
    s = abs(sigma) + 0.27
    xp = torch.zeros(t_in + k - 1 + (k - 1) // 2, b, n_in, dtype=torch.float64)
    xp[k - 1 : k - 1 + t_in] = x.double()
    y = torch.zeros(t_in + (k - 1) // 2, b, w.shape[0], dtype=torch.float64)
    for o in range(w.shape[0]):
        for i in range(n_in):
            g = [math.exp(-0.5 * ((n - (float(p[o, i]) + k // 2)) / s) ** 2) for n in range(k)]
            for n in range(k):
                tap = float(w[o, i]) * g[n] / (sum(g) + 1e-7)
                y[:, :, o] += tap * xp[n : n + y.shape[0], :, i]
    return y


@pytest.mark.parametrize("backend", ["fast", "dcls"])
@pytest.mark.parametrize("sigma", [3.0, 0.23])
def test_training_layer_is_the_spec_formula(backend, sigma):
    k = 7
    layer = DelayLayer(4, 3, kernel_size=k, backend=backend)
    layer.set_sigma(sigma)
    x = torch.poisson(torch.full((11, 2, 4), 0.5))  # spike counts, as SHD's pooled bins
    with torch.no_grad():
        y = layer(x)
    expected = _spec_delay_layer(x, layer.weight.detach(), layer.positions.detach(), sigma, k)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_initialisation_follows_spec():
    """Weights Kaiming-uniform with the ReLU gain, U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), in every
    synaptic layer (delays or not); positions U(-(K//2), K//2); sigma K//2. Fixed delays are
    rounded to whole steps (the published ``round_pos``) at sigma 0."""
    k = 25
    for delays in ("learned", "fixed", "none"):
        model = DelaySNN(140, 20, n_hidden=256, n_layers=2, kernel_size=k, delays=delays)
        for w in (w.detach() for w in model.weight_parameters()):
            fan_in = w.shape[1]
            bound = math.sqrt(6 / fan_in)
            assert w.abs().max() <= bound
            assert w.abs().max() > 0.99 * bound and w.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        for layer in model.delay_layers():
            p = layer.positions.detach()
            assert p.min() >= -(k // 2) and p.max() <= k // 2
            assert p.min() < -(k // 2) + 0.1 and p.max() > k // 2 - 0.1
            assert p.std() == pytest.approx(2 * (k // 2) / math.sqrt(12), rel=0.05)
            if delays == "learned":
                assert layer.sigma == k // 2 and not torch.equal(p, p.round())
            else:
                assert layer.sigma == 0 and torch.equal(p, p.round())


def test_clamp_is_to_the_spec_range_on_both_sides():
    k = 9
    layer = DelayLayer(3, 2, kernel_size=k)
    with torch.no_grad():
        layer.dcls.P.copy_(torch.tensor([[-7.0, -4.6, -0.5], [0.5, 4.4, 30.0]]).reshape(layer.dcls.P.shape))
    layer.clamp_positions()
    torch.testing.assert_close(layer.positions.detach(), torch.tensor([[-4.0, -4.0, -0.5], [0.5, 4.0, 4.0]]))
    # evaluation: d = K//2 - round(p), torch's round (half to even, as the published P.round_())
    assert layer.delays().tolist() == [[8, 8, 4], [4, 0, 0]]
