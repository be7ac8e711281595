"""A small generated spike dataset that only delays can solve.

Every sample is a volley: each of ``n_channels`` channels fires exactly once, at
``start + offset[c, channel]``, where ``offset[c]`` is a permutation of ``0..n_channels-1``
(times in steps) that defines class ``c`` and ``start`` is random. At every time step exactly
one channel fires, whatever the class, so the classes have the same rates, the same channels
and no coincidences: they differ only in the relative timing of spikes across channels. A
network with near-memoryless neurons (tau close to 1 step) cannot tell them apart without
delays; with delays ``d = n_channels - 1 - offset`` a neuron receives the whole volley at once.
Optional noise spikes make it harder. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import torch

from snn_delays.data.base import DataBundle, Split


def _class_offsets(n_classes: int, n_channels: int, gen: torch.Generator) -> torch.Tensor:
    offsets = torch.stack([torch.randperm(n_channels, generator=gen) for _ in range(n_classes)])
    if n_classes > 1 and len(torch.unique(offsets, dim=0)) < n_classes:
        raise ValueError("dataset: too few channels for distinct class patterns; raise n_channels")
    return offsets


def _make_split(
    n: int, offsets: torch.Tensor, n_steps: int, noise_rate: float, gen: torch.Generator
) -> Split:
    n_classes, n_channels = offsets.shape
    y = torch.randint(n_classes, (n,), generator=gen)
    start = torch.randint(n_steps - n_channels + 1, (n,), generator=gen)
    x = torch.zeros(n, n_steps, n_channels, dtype=torch.uint8)
    times = start[:, None] + offsets[y]  # (n, channels)
    x[torch.arange(n)[:, None], times, torch.arange(n_channels)[None, :]] = 1
    if noise_rate > 0:
        x |= (torch.rand(n, n_steps, n_channels, generator=gen) < noise_rate).to(torch.uint8)
    return Split(x, torch.full((n,), n_steps), y)


def make_synthetic(
    n_classes: int = 4,
    n_channels: int = 8,
    n_steps: int = 24,
    n_train: int = 512,
    n_valid: int = 128,
    n_test: int = 256,
    noise_rate: float = 0.0,
    seed: int = 0,
) -> DataBundle:
    """Build the dataset; ``n_steps`` must leave room for a volley (>= n_channels)."""
    if n_steps < n_channels:
        raise ValueError(f"dataset.n_steps ({n_steps}) must be >= dataset.n_channels ({n_channels})")
    gen = torch.Generator().manual_seed(seed)
    offsets = _class_offsets(n_classes, n_channels, gen)
    splits = [_make_split(n, offsets, n_steps, noise_rate, gen) for n in (n_train, n_valid, n_test)]
    names = [f"pattern{c}" for c in range(n_classes)]
    return DataBundle(
        "synthetic", *splits, n_inputs=n_channels, n_classes=n_classes, dt_ms=10.0, class_names=names
    )
