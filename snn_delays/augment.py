r"""Training-batch augmentations for time-major inputs ``x`` (T, B, C).

All three act on a padded batch as :func:`snn_delays.data.base.batches` yields it, draw their
randomness from torch's global RNG on the batch's device (``torch.manual_seed`` seeds them) and
never read a value back to the host. Widths and positions are integers drawn uniformly:

* **Time masks** (SpecAugment): per sample, ``n_masks`` bands, each kept with probability
  ``p``, of width ``w ~ U{0..W}`` steps starting at ``s ~ U{0..T-w}``:
  ``x'[t, b, :] = 0`` for ``s <= t < s + w``, every other value untouched.
* **Channel masks**: the same over channels, ``x'[:, b, c] = 0`` for ``s <= c < s + w``.
* **Time-segment CutMix**: sample ``b`` takes a segment of its partner ``b' = (b + 1) mod B``
  (the batch is already shuffled) at the same time steps. With probability ``p`` the segment
  has width ``w ~ U{0..T}`` at ``s ~ U{0..T-w}`` (else ``w = 0``):
  ``x'[t, b] = x[t, b']`` for ``s <= t < s + w``, else ``x[t, b]``; the target becomes the
  mixture ``(1 - lam) * onehot(y[b]) + lam * onehot(y[b'])`` with ``lam`` the share of the
  mixed sample's steps that come from the partner, counting only each sample's own steps, not
  its zero padding: ``lam = P / (P + S)``, ``P`` the steps ``t < L[b']`` inside the segment,
  ``S`` the steps ``t < L[b]`` outside it (``lam = 0`` where both are 0). ``L`` is each sample's
  length, by default the steps up to its last nonzero one (the binned spike samples end at
  their last spike). Where both samples fill the batch, ``lam = w / T``; a segment that falls
  in the partner's padding pastes zeros and moves no label weight (the published code's
  ``lam`` counted the padded batch's steps, giving label weight to pasted zeros).

The loss then stays ``F.cross_entropy(scores, target)``: with class probabilities as targets
it is ``-sum_c target[b, c] log_softmax(scores[b])[c]``, i.e. ``(1 - lam) CE(y) + lam CE(y')``.

The published code had these (``TN_mask_aug_proba``, ``cutmix_aug_proba``) switched off for its
reported runs; so is :class:`Augment` by default (``conf/augment/none.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _bands(n_masks: int, max_width: int, length: int, batch: int, p: float, device: torch.device) -> Tensor:
    """(batch, length) bool, True inside any of ``n_masks`` random bands per sample."""
    max_width = min(max_width, length)
    shape = (n_masks, batch)
    width = (torch.rand(shape, device=device) * (max_width + 1)).long().clamp_(max=max_width)
    if p < 1.0:
        width = width * (torch.rand(shape, device=device) < p)
    start = torch.minimum((torch.rand(shape, device=device) * (length - width + 1)).long(), length - width)
    pos = torch.arange(length, device=device)
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])  # (n_masks, batch, length)
    return inside.any(0)


def time_mask(x: Tensor, n_masks: int, max_width: int, p: float = 1.0) -> Tensor:
    """Zero ``n_masks`` bands of up to ``max_width`` time steps per sample (see module)."""
    if n_masks == 0 or max_width == 0:
        return x
    t, b, _ = x.shape
    return x.masked_fill(_bands(n_masks, max_width, t, b, p, x.device).T[..., None], 0)


def channel_mask(x: Tensor, n_masks: int, max_width: int, p: float = 1.0) -> Tensor:
    """Zero ``n_masks`` bands of up to ``max_width`` adjacent channels per sample (see module)."""
    if n_masks == 0 or max_width == 0:
        return x
    _, b, c = x.shape
    return x.masked_fill(_bands(n_masks, max_width, c, b, p, x.device)[None], 0)


def sample_lengths(x: Tensor) -> Tensor:
    """(B,) steps of each sample of a zero-padded batch: up to its last nonzero step (0 if none)."""
    steps = torch.arange(1, x.shape[0] + 1, device=x.device)[:, None]  # (T, 1)
    return ((x != 0).any(-1) * steps).amax(0)


def time_cutmix(
    x: Tensor, y: Tensor, n_classes: int, p: float = 1.0, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Paste a time segment of sample ``(b+1) mod B`` into sample ``b``; soft targets (B, n_classes).

    ``lengths`` (B,): each sample's steps before its padding (default :func:`sample_lengths`).
    Returns ``(x', target)`` with ``target`` float, rows summing to 1 (see module).
    """
    t, b, _ = x.shape
    partner = torch.arange(b, device=x.device).roll(-1)
    segment = _bands(1, t, t, b, p, x.device).T  # (T, B)
    x_out = torch.where(segment[..., None], x[:, partner], x)
    lengths = sample_lengths(x) if lengths is None else lengths.to(x.device)
    real = torch.arange(t, device=x.device)[:, None] < lengths  # (T, B): a sample's own steps
    dtype = x.dtype if x.is_floating_point() else torch.float32
    from_partner = (segment & real[:, partner]).sum(0).to(dtype)
    from_self = (~segment & real).sum(0).to(dtype)
    lam = from_partner / (from_partner + from_self).clamp(min=1)
    target = torch.zeros(b, n_classes, device=x.device, dtype=lam.dtype)
    target.scatter_add_(1, y[:, None], (1 - lam)[:, None])
    target.scatter_add_(1, y[partner][:, None], lam[:, None])
    return x_out, target


@dataclass
class Augment:
    """The augmentations of one training batch: masks first, then CutMix, as published.

    ``__call__(x, y)`` returns ``(x', target)``. ``target`` is ``y`` itself (int64 labels) unless
    CutMix is on, then class probabilities (B, n_classes); ``F.cross_entropy`` takes either.
    With everything off (the default) it returns ``x`` and ``y`` unchanged. ``n_classes``
    comes from the data at build time (``instantiate(cfg.augment, n_classes=...)``).
    """

    time_masks: int = 0  # bands per sample
    time_mask_steps: int = 0  # width W: each band is U{0..W} steps
    channel_masks: int = 0
    channel_mask_width: int = 0  # adjacent channels per band, U{0..W}
    mask_prob: float = 1.0  # each band is applied with this probability
    cutmix_prob: float = 0.0  # per sample
    n_classes: int | None = None

    def __post_init__(self) -> None:
        for name in ("time_masks", "time_mask_steps", "channel_masks", "channel_mask_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("mask_prob", "cutmix_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.cutmix_prob > 0 and self.n_classes is None:
            raise ValueError("augment.cutmix_prob > 0 needs n_classes (pass it when instantiating)")

    @property
    def active(self) -> bool:
        masks = self.mask_prob > 0 and (
            self.time_masks * self.time_mask_steps > 0 or self.channel_masks * self.channel_mask_width > 0
        )
        return masks or self.cutmix_prob > 0

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # the samples' lengths before the masks, which may zero a sample's last steps
        lengths = sample_lengths(x) if self.cutmix_prob > 0 else None
        if self.mask_prob > 0:
            x = time_mask(x, self.time_masks, self.time_mask_steps, self.mask_prob)
            x = channel_mask(x, self.channel_masks, self.channel_mask_width, self.mask_prob)
        if self.cutmix_prob > 0:
            return time_cutmix(x, y, self.n_classes, self.cutmix_prob, lengths)
        return x, y
