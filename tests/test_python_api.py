"""The package used from Python (a notebook) rather than the Hydra CLI: what a researcher would
naturally do either works or fails with an error naming what to do."""

from __future__ import annotations

import pytest
import torch

from snn_delays.checkpoints import read_checkpoint
from snn_delays.data.base import Split, batches
from snn_delays.delays import DelayLayer
from snn_delays.model import DelaySNN


def _net(**kwargs) -> DelaySNN:
    torch.manual_seed(0)
    return DelaySNN(6, 3, n_hidden=8, n_layers=1, kernel_size=5, **kwargs)


@pytest.mark.parametrize("backend", ["fast", "dcls"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_wrong_channel_count_is_refused(backend, mode):
    """An input with the wrong channel count ran the fast path's C kernels out of bounds: with
    more channels a segmentation fault, with fewer a silently wrong forward (training) and an
    error only in the backward; the evaluation path raised conv1d's message."""
    layer = DelayLayer(6, 4, 5, backend=backend)
    getattr(layer, mode)()
    for bad in (torch.rand(10, 2, 5), torch.rand(10, 6)):
        with pytest.raises(ValueError, match=r"time-major input \(T, B, 6\)"):
            layer(bad)
    model = getattr(_net(delay_backend=backend), mode)()
    with pytest.raises(ValueError, match=r"time-major input \(T, B, n_inputs=6\), got shape \(10, 2, 5\)"):
        model(torch.rand(10, 2, 5))


@pytest.mark.parametrize("delays", ["learned", "none"])
def test_one_sample_without_batch_dimension_names_the_fix(delays):
    """``model(x)`` on one (T, C) sample (what ``sample_input`` returns) failed with
    ``not enough values to unpack`` (training) or an F.pad message (evaluation)."""
    model = _net(delays=delays)
    x = (torch.rand(10, 6) < 0.3).float()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with pytest.raises(ValueError, match=r"x\.unsqueeze\(1\)"):
            model(x)
    assert model(x.unsqueeze(1)).shape[1:] == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_classes": 0}, "n_classes .* whole number >= 1, got 0"),
        ({"n_inputs": 6.0}, "n_inputs .* whole number >= 1, got 6.0"),
        ({"dt_ms": 0.0}, "dt_ms .* > 0, got 0.0"),
        ({"dt_ms": -1.0}, "dt_ms .* > 0, got -1.0"),
        ({"max_delay_ms": -10.0}, "max_delay_ms must be a number >= 0, got -10.0"),
        ({"kernel_size": 7.0}, "kernel_size .* odd and >= 1, got 7.0"),
    ],
)
def test_bad_sizes_are_refused_by_name(kwargs, message):
    """These failed with torch internals (``min(): Expected reduction dim``, ``new(): argument
    'size'``), a ZeroDivisionError, or a message about a kernel size of -249."""
    args = {"n_inputs": 6, "n_classes": 3, "n_hidden": 8, "n_layers": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        DelaySNN(**args)


def test_state_dict_loads_across_backends():
    """The two backends hold the same parameters: a state dict moves between them and gives
    the same outputs (training and evaluation)."""
    fast = _net(delay_backend="fast", dropout=0.0)
    dcls = _net(delay_backend="dcls", dropout=0.0)
    dcls.load_state_dict(fast.state_dict())
    x = (torch.rand(20, 4, 6) < 0.3).float()
    for mode in ("train", "eval"):
        a, b = getattr(fast, mode)()(x), getattr(dcls, mode)()(x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_read_checkpoint_of_a_run_directory_says_what_to_pass(tmp_path):
    """Passing the run directory said ``no such checkpoint file`` of a folder that exists."""
    with pytest.raises(FileNotFoundError, match=r"is a directory.*find_checkpoint"):
        read_checkpoint(tmp_path)


def _split(n: int = 10) -> Split:
    return Split(torch.rand(n, 7, 3), torch.full((n,), 7), torch.arange(n) % 2)


def test_boolean_mask_selects_samples():
    """A boolean mask, the natural way to select one class, was read as the indices 0 and 1:
    ``subset(y == 0)`` gave a split of N samples, copies of the first two."""
    split = _split()
    mask = split.y == 0
    sub = split.subset(mask)
    assert len(sub) == int(mask.sum()) and torch.equal(sub.x, split.x[mask])
    seen = torch.cat([idx for _, _, idx in batches(split, 3, indices=mask)])
    assert torch.equal(seen, torch.nonzero(mask).flatten())
    assert len(split.subset([1, 2])) == 2  # a list of indices too


@pytest.mark.parametrize("size", [0, -1, 2.0])
def test_bad_batch_size_is_refused(size):
    """``batch_size=-1`` silently yielded no batch (an evaluation over nothing), 0 raised
    ``range() arg 3 must not be zero``."""
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        next(batches(_split(), size))


def test_split_needs_three_dimensions():
    """A (N, T) split was accepted and yielded 2-D batches the model could not take."""
    with pytest.raises(ValueError, match=r"\(N, T_max, C\)"):
        Split(torch.rand(10, 7), torch.full((10,), 7), torch.arange(10))
    assert len(Split(torch.rand(2, 7, 3), [7, 5], [0, 1])) == 2  # lengths and labels as lists


def test_delay_convolutions_called_directly_refuse_mismatched_shapes():
    """fast_delays' C kernels read by the sizes they are given: x with more channels than the
    weight has inputs read out of bounds (a segmentation fault) before the layer's own check."""
    from snn_delays import fast_delays

    x, w = torch.rand(20, 2, 7), torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"got x \(20, 2, 7\), weight \(4, 6\), \(4, 6\)"):
        fast_delays.delay_conv(x, w, torch.zeros(4, 6), 2.0, 9, impl="c")
    with pytest.raises(ValueError, match=r"weight \(4, 6\), \(6, 4\)"):
        fast_delays.integer_delay_conv(
            torch.rand(20, 2, 6), w, torch.zeros(6, 4, dtype=torch.long), 9, impl="c"
        )
    y = fast_delays.integer_delay_conv(
        torch.rand(20, 2, 6), w, torch.zeros(4, 6, dtype=torch.long), 9, impl="c"
    )
    assert y.shape == (24, 2, 4)


def test_dropout_keeps_one_mask_per_sample_and_neuron_over_time():
    """SPEC, "The network": Dropout with one mask shared over time (a neuron silenced for a
    sample is silent at every step), kept units scaled by 1 / (1 - p); nothing dropped in eval."""
    from snn_delays.model import TimeDropout

    torch.manual_seed(0)
    drop = TimeDropout(0.25).train()
    out = drop(torch.ones(40, 64, 32))
    assert torch.equal(out, out[:1].expand_as(out)), "one mask for every time step"
    assert torch.unique(out).tolist() == pytest.approx([0.0, 1 / 0.75])
    assert float((out[0] == 0).float().mean()) == pytest.approx(0.25, abs=0.04)
    x = torch.rand(5, 2, 3)
    assert torch.equal(drop.eval()(x), x)


def test_plif_reports_the_time_constant_it_learns():
    """``SpikingNeurons.tau`` of a PLIF (logged and plotted) is spikingjelly's 1 / sigmoid(w):
    its initial value at the start, the learned one after w moves."""
    from snn_delays.neurons import SpikingNeurons

    plif = SpikingNeurons(1.5, kind="plif")
    assert plif.tau == pytest.approx(1.5)
    with torch.no_grad():
        plif.node.w.fill_(0.0)  # sigmoid(0) = 1/2
    assert plif.tau == pytest.approx(2.0)
