"""Batch augmentations: each changes what it should and only that, seeded, on any device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from snn_delays.augment import Augment, channel_mask, time_cutmix, time_mask

CONF = Path(__file__).resolve().parent.parent / "conf" / "augment"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EVERYTHING = dict(time_masks=2, time_mask_steps=5, channel_masks=2, channel_mask_width=3, mask_prob=0.7)


def nonzero_batch(t: int = 30, b: int = 64, c: int = 12, device: str = "cpu") -> torch.Tensor:
    return torch.rand(t, b, c, device=device) + 0.5


def coded_batch(t: int = 25, b: int = 16, c: int = 3, device: str = "cpu") -> torch.Tensor:
    """``x[t, b, c] = 10000 b + 10 t + c + 1``: every value names its sample, step and channel."""
    tt, bb, cc = torch.meshgrid(torch.arange(t), torch.arange(b), torch.arange(c), indexing="ij")
    return (10000 * bb + 10 * tt + cc + 1).float().to(device)


def runs(flags: torch.Tensor) -> int:
    """Number of contiguous runs of True in a 1-d bool tensor."""
    f = flags.int()
    return int(f[0]) + int((f[1:] - f[:-1] == 1).sum())


# --- time and channel masks ---------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_time_mask_zeroes_whole_steps_and_nothing_else(device):
    torch.manual_seed(0)
    x = nonzero_batch(device=device)
    out = time_mask(x, n_masks=1, max_width=6)
    assert out.device == x.device and out.shape == x.shape
    zero = out == 0
    masked = zero.all(-1)  # (T, B): steps zeroed in every channel
    assert torch.equal(zero, masked[..., None].expand_as(zero)), "a mask covers all channels of a step"
    assert torch.equal(out[~zero], x[~zero]), "unmasked values are untouched"
    widths = masked.sum(0)
    assert int(widths.max()) <= 6 and int(widths.max()) > 0
    for b in range(x.shape[1]):
        assert runs(masked[:, b].cpu()) <= 1, "one mask is one contiguous band"


@pytest.mark.parametrize("device", DEVICES)
def test_channel_mask_zeroes_adjacent_channels_at_every_step(device):
    torch.manual_seed(1)
    x = nonzero_batch(device=device)
    out = channel_mask(x, n_masks=1, max_width=4)
    zero = out == 0
    masked = zero.all(0)  # (B, C): channels zeroed at every step
    assert torch.equal(zero, masked[None].expand_as(zero)), "a mask covers every step of a channel"
    assert torch.equal(out[~zero], x[~zero])
    widths = masked.sum(1)
    assert 0 < int(widths.max()) <= 4
    for b in range(x.shape[1]):
        assert runs(masked[b].cpu()) <= 1


def test_mask_widths_are_uniform_from_zero_to_max():
    torch.manual_seed(2)
    x = nonzero_batch(t=40, b=3000, c=2)
    widths = (time_mask(x, 1, 5) == 0).all(-1).sum(0)
    counts = torch.bincount(widths, minlength=6)
    assert len(counts) == 6, "never wider than max_width"
    assert (counts > 3000 / 6 * 0.8).all() and (counts < 3000 / 6 * 1.2).all(), counts
    # every start is possible, including the last one
    masked = (time_mask(x, 1, 5) == 0).all(-1)
    assert masked[0].any() and masked[-1].any()


def test_several_masks_and_their_probability():
    torch.manual_seed(3)
    x = nonzero_batch(t=50, b=2000, c=20)
    band = (channel_mask(x, n_masks=3, max_width=2) == 0).all(0)  # (B, C)
    assert int(band.sum(1).max()) <= 6 and any(runs(row) > 1 for row in band[:50])
    # p: each band present with probability p (width drawn from 1..W given it is present)
    hit = (time_mask(x, 1, 1, p=0.3) == 0).all(-1).any(0).float().mean()
    assert abs(float(hit) - 0.3 * 0.5) < 0.04
    assert torch.equal(time_mask(x, 4, 10, p=0.0), x)


def test_masks_do_not_modify_their_input():
    torch.manual_seed(4)
    x = nonzero_batch()
    before = x.clone()
    time_mask(x, 2, 5)
    channel_mask(x, 2, 5)
    time_cutmix(x, torch.zeros(x.shape[1], dtype=torch.long), 2)
    assert torch.equal(x, before)


def test_widths_larger_than_the_batch_are_clamped():
    torch.manual_seed(5)
    x = nonzero_batch(t=4, b=200, c=3)
    assert (time_mask(x, 1, 100) == 0).all(-1).sum(0).max() == 4
    assert (channel_mask(x, 1, 100) == 0).all(0).sum(1).max() == 3


# --- CutMix ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_cutmix_takes_one_segment_of_the_next_sample_at_the_same_steps(device):
    torch.manual_seed(6)
    t, b, c = 25, 16, 3
    x = coded_batch(t, b, c, device)
    y = torch.arange(b, device=device) % 5
    out, target = time_cutmix(x, y, n_classes=5)
    assert out.device == x.device and target.device == x.device
    source = (out // 10000).long().cpu()  # the sample each value came from
    assert torch.equal(out % 10000, x % 10000), "steps and channels stay in place"
    assert (source == source[..., :1]).all(), "a step is taken whole"
    source = source[..., 0]  # (T, B)
    for i in range(b):
        taken = source[:, i] != i
        assert (source[taken, i] == (i + 1) % b).all(), "from the next sample (mod B)"
        assert runs(taken) <= 1, "one contiguous segment"
        lam = float(taken.sum()) / t
        row = target[i].cpu()
        assert row.sum() == pytest.approx(1.0)
        expected = torch.zeros(5)
        expected[int(y[i])] += 1 - lam
        expected[int(y[(i + 1) % b])] += lam
        assert torch.allclose(row, expected), (i, row, expected)
    assert (source != torch.arange(b)).any(), "something was mixed"


def test_cutmix_segment_lengths_cover_zero_to_t_and_probability():
    torch.manual_seed(7)
    t, b = 6, 3500
    x = coded_batch(t, b, 1)
    out, _ = time_cutmix(x, torch.zeros(b, dtype=torch.long), 1)
    taken = ((out // 10000).long()[..., 0] != torch.arange(b)).sum(0)
    counts = torch.bincount(taken, minlength=t + 1)
    assert len(counts) == t + 1
    assert (counts > b / (t + 1) * 0.8).all() and (counts < b / (t + 1) * 1.2).all(), counts
    out, target = time_cutmix(x, torch.arange(b) % 2, 2, p=0.25)
    mixed = ((out // 10000).long()[..., 0] != torch.arange(b)).any(0).float().mean()
    assert abs(float(mixed) - 0.25 * t / (t + 1)) < 0.04
    assert torch.equal(time_cutmix(x, torch.arange(b) % 2, 2, p=0.0)[0], x)


def test_cutmix_label_counts_the_samples_steps_not_their_padding():
    """A zero-padded batch (samples of 5..30 steps in 30): the label weight moved to the partner
    is the share of the mixed sample's steps (its nonzero values here) that came from it. A
    segment pasted from the partner's padding (zeros) moves none."""
    torch.manual_seed(11)
    t, b = 30, 400
    lengths = torch.randint(5, t + 1, (b,))
    lengths[0] = t  # the batch is as long as its longest sample
    x = coded_batch(t, b, 2) * (torch.arange(t)[:, None] < lengths)[..., None]  # zero padding
    y = torch.arange(b) % 2
    partner = (torch.arange(b) + 1) % b
    torch.manual_seed(12)
    out, target = time_cutmix(x, y, n_classes=2)
    value, source = out[..., 0], (out[..., 0] // 10000).long()  # (T, B)
    from_partner = ((value != 0) & (source == partner)).sum(0).float()
    from_self = ((value != 0) & (source == torch.arange(b))).sum(0).float()
    lam = from_partner / (from_partner + from_self).clamp(min=1)
    expected = torch.zeros(b, 2)
    expected[torch.arange(b), y] += 1 - lam
    expected[torch.arange(b), y[partner]] += lam
    assert torch.allclose(target, expected, atol=1e-6)
    # the case that matters: zeros pasted over the sample's end, nothing of the partner's
    only_padding = (from_partner == 0) & (out != x).any(-1).any(0)
    assert only_padding.sum() > 10, "the seed should give such samples"
    assert torch.allclose(target[only_padding], F.one_hot(y[only_padding], 2).float())
    # lengths given: the same as inferred here, where every sample ends on a nonzero step
    torch.manual_seed(12)
    assert torch.equal(time_cutmix(x, y, n_classes=2, lengths=lengths)[1], target)


def test_cutmix_same_label_partner_keeps_a_one_hot_target():
    torch.manual_seed(8)
    x = nonzero_batch(t=10, b=8)
    _, target = time_cutmix(x, torch.full((8,), 3), n_classes=4)
    assert torch.allclose(target, F.one_hot(torch.full((8,), 3), 4).float())


def test_soft_target_cross_entropy_is_the_label_mixture():
    """The training loss stays ``F.cross_entropy(scores, target)``; with CutMix it mixes."""
    torch.manual_seed(9)
    x = nonzero_batch(t=20, b=6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    _, target = time_cutmix(x, y, 3)
    scores = torch.randn(6, 3)
    lam = target[torch.arange(6), y.roll(-1)]
    lam = torch.where(y == y.roll(-1), torch.zeros_like(lam), lam)
    mixture = (1 - lam) * F.cross_entropy(scores, y, reduction="none") + lam * F.cross_entropy(
        scores, y.roll(-1), reduction="none"
    )
    assert F.cross_entropy(scores, target) == pytest.approx(float(mixture.mean()), rel=1e-6)


# --- Augment --------------------------------------------------------------------------------
def test_everything_off_returns_the_batch_unchanged():
    x, y = nonzero_batch(), torch.zeros(64, dtype=torch.long)
    from_yaml = instantiate(OmegaConf.load(CONF / "none.yaml"), n_classes=5)
    for aug in (Augment(), Augment(**(EVERYTHING | dict(mask_prob=0.0))), from_yaml):
        assert not aug.active
        out, target = aug(x, y)
        assert out is x and target is y


def test_default_config_is_active_and_keeps_shapes():
    aug = instantiate(OmegaConf.load(CONF / "default.yaml"), n_classes=7)
    assert isinstance(aug, Augment) and aug.active and aug.cutmix_prob > 0
    torch.manual_seed(10)
    x, y = nonzero_batch(t=40, b=32, c=140), torch.arange(32) % 7
    out, target = aug(x, y)
    assert out.shape == x.shape and target.shape == (32, 7)
    assert torch.allclose(target.sum(1), torch.ones(32))
    assert (out == 0).any() and not torch.equal(out, x)


def test_masks_only_keeps_integer_labels():
    aug = Augment(time_masks=1, time_mask_steps=3)
    y = torch.arange(4)
    out, target = aug(nonzero_batch(b=4), y)
    assert target is y and (out == 0).any()


def test_same_seed_same_batch_other_seed_other_batch():
    aug = Augment(**EVERYTHING, cutmix_prob=0.5, n_classes=4)
    x, y = nonzero_batch(), torch.arange(64) % 4

    def draw(seed):
        torch.manual_seed(seed)
        return aug(x, y)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_runs_on_the_batch_device_without_reading_values(device):
    """On the meta device no value exists: any host read (``.item()``, ``int(t)``) would fail."""
    aug = Augment(**EVERYTHING, cutmix_prob=0.5, n_classes=4)
    x = torch.rand(30, 8, 12, device=device)
    y = torch.zeros(8, dtype=torch.long, device=device)
    if device == "cuda":  # any synchronising call raises
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out, target = aug(x, y)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == device and target.device.type == device
    assert out.shape == x.shape and target.shape == (8, 4) and target.dtype == x.dtype


BAD = [
    {"time_masks": -1},
    {"channel_mask_width": -2},
    {"mask_prob": 1.5},
    {"cutmix_prob": -0.1},
    {"cutmix_prob": 1},
]


@pytest.mark.parametrize("kwargs", BAD)
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match="augment"):
        Augment(**kwargs)


# --- audit: Augment's wiring ----------------------------------------------------------------
def test_cutmix_after_masks_weighs_labels_by_the_lengths_before_them(monkeypatch):
    """Masks come first, so a segment carries the partner's masked steps with it; and a mask
    over a sample's last steps does not make it shorter: the label weight is the share of the
    steps that came from the partner, its masked ones included (every sample here fills the
    batch, so lam = w / T)."""
    import snn_delays.augment as augment

    def zero_last_steps_of_even_samples(x, n_masks, max_width, p=1.0):
        out = x.clone()
        out[-max_width:, 0::2] = 0
        return out

    monkeypatch.setattr(augment, "time_mask", zero_last_steps_of_even_samples)
    t, b, tail = 20, 300, 8
    x = coded_batch(t, b, 2)
    y = torch.arange(b) % 2  # each sample's partner has the other label
    aug = Augment(time_masks=1, time_mask_steps=tail, cutmix_prob=1.0, n_classes=2)
    torch.manual_seed(13)
    out, target = aug(x, y)
    in_tail = 0
    for i in range(1, b, 2):  # odd samples: unmasked themselves, their partner's tail masked
        taken = (out[:, i] != x[:, i]).any(-1)  # the pasted segment (partner values or zeros)
        assert runs(taken) <= 1
        partner_values = x[:, (i + 1) % b]
        assert torch.equal(out[:-tail, i][taken[:-tail]], partner_values[:-tail][taken[:-tail]])
        assert (out[-tail:, i][taken[-tail:]] == 0).all(), "the partner's mask travels with it"
        in_tail += int(taken[-tail:].any())
        lam = float(taken.sum()) / t
        assert target[i].tolist() == pytest.approx([lam, 1 - lam]), (i, taken)
    assert in_tail > 50, "the seed should paste many segments over the masked steps"


@pytest.mark.parametrize("which", ["time", "channel"])
def test_augment_applies_mask_prob_to_each_kind_of_mask(which):
    """``mask_prob`` keeps each band with that probability, for the time and the channel masks
    alike: with width U{0..1}, a sample is masked with probability p / 2."""
    kind = (
        dict(time_masks=1, time_mask_steps=1)
        if which == "time"
        else dict(channel_masks=1, channel_mask_width=1)
    )
    aug = Augment(**kind, mask_prob=0.3)
    torch.manual_seed(14)
    x = nonzero_batch(t=10, b=4000, c=10)
    out, _ = aug(x, torch.zeros(4000, dtype=torch.long))
    zero = out == 0
    masked = zero.all(-1).any(0) if which == "time" else zero.all(0).any(-1)  # (B,)
    assert abs(float(masked.float().mean()) - 0.3 / 2) < 0.03


def test_sample_lengths_of_sparse_spike_counts():
    """A step belongs to a sample up to its last step with any nonzero channel (spike counts
    are sparse: one channel is enough), zero steps inside it included; an empty sample has 0."""
    from snn_delays.augment import sample_lengths

    x = torch.zeros(6, 3, 4)
    x[0, 0, 1] = x[4, 0, 2] = 1.0  # sample 0: steps 0 and 4, a gap between
    x[5, 2, 0] = 3.0  # sample 2: its only spike on the last step; sample 1 empty
    assert sample_lengths(x).tolist() == [5, 0, 6]
