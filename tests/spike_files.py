"""Writers of tiny SHD/SSC files in the Zenke lab's HDF5 layout, for tests.

    spikes/times      vlen float16, seconds (one array per sample)
    spikes/units      vlen uint16, channel 0 .. 699
    labels            uint16
    extra/keys        class names (bytes)
    extra/speaker     speaker id of each sample
    extra/meta_info/  per-speaker age, body_height, gender

Use ``make_shd_root(tmp_path / "shd", ...)`` / ``make_ssc_root(...)`` to get a data root that
``load_shd`` / ``load_ssc`` (and the trainer with ``dataset.root=...``) read without
downloading anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np


def write_spike_h5(
    path: Path,
    times: Sequence[np.ndarray],
    units: Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    keys: Sequence[str] | None = None,
    speakers: Sequence[int] | np.ndarray | None = None,
    time_dtype: type = np.float16,
    unit_dtype: type = np.uint16,
) -> Path:
    """Write one spike file. ``time_dtype=np.float64`` keeps hand-made times exact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1 if len(labels) else 1
    keys = [f"class-{c}" for c in range(n_classes)] if keys is None else list(keys)
    speakers = np.zeros(len(labels), np.uint16) if speakers is None else np.asarray(speakers, np.uint16)
    with h5py.File(path, "w") as f:
        t = f.create_dataset("spikes/times", (len(times),), dtype=h5py.vlen_dtype(np.dtype(time_dtype)))
        u = f.create_dataset("spikes/units", (len(units),), dtype=h5py.vlen_dtype(np.dtype(unit_dtype)))
        for i, (ti, ui) in enumerate(zip(times, units, strict=True)):
            t[i] = np.asarray(ti, time_dtype)
            u[i] = np.asarray(ui, unit_dtype)
        f.create_dataset("labels", data=labels.astype(np.uint16) if labels.min(initial=0) >= 0 else labels)
        f.create_dataset("extra/keys", data=np.array([k.encode() for k in keys], dtype="S"))
        f.create_dataset("extra/speaker", data=speakers)
        n_speakers = int(speakers.max(initial=0)) + 1
        meta = f.create_group("extra/meta_info")
        meta.create_dataset("age", data=np.full(n_speakers, 30, np.uint8))
        meta.create_dataset("body_height", data=np.full(n_speakers, 170, np.uint8))
        meta.create_dataset("gender", data=np.array([b"female"] * n_speakers, dtype="S"))
    return path


def random_spikes(
    n_samples: int, n_classes: int, seed: int, n_channels: int = 700, duration_s: float = 0.5
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Random sorted spike trains (1 to 80 spikes each) and labels covering every class."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_samples) % n_classes)
    times, units = [], []
    for _ in range(n_samples):
        k = int(rng.integers(1, 81))
        times.append(np.sort(rng.uniform(0.0, duration_s, k)))
        units.append(rng.integers(0, n_channels, k))
    return times, units, labels


def make_spike_dataset(
    path: Path, n_samples: int, n_classes: int, seed: int, n_channels: int = 700, duration_s: float = 0.5
) -> dict[str, object]:
    """Write a random spike file; return what was written (``times``, ``units``, ``labels``)."""
    times, units, labels = random_spikes(n_samples, n_classes, seed, n_channels, duration_s)
    speakers = np.random.default_rng(seed + 1).integers(0, 5, n_samples)
    keys = [f"class-{c}" for c in range(n_classes)]  # every class named, as in the real files
    write_spike_h5(path, times, units, labels, keys=keys, speakers=speakers)
    # What the loader sees: float16 times, as in the published files.
    times = [t.astype(np.float16) for t in times]
    return {"times": times, "units": units, "labels": labels}


def make_shd_root(
    root: Path, n_train: int = 60, n_test: int = 20, n_classes: int = 20, seed: int = 0, **kwargs
) -> Path:
    """A folder with ``shd_train.h5`` and ``shd_test.h5`` (``kwargs`` to make_spike_dataset)."""
    root = Path(root)
    make_spike_dataset(root / "shd_train.h5", n_train, n_classes, seed, **kwargs)
    make_spike_dataset(root / "shd_test.h5", n_test, n_classes, seed + 100, **kwargs)
    return root


def make_ssc_root(
    root: Path,
    n_train: int = 70,
    n_valid: int = 35,
    n_test: int = 35,
    n_classes: int = 35,
    seed: int = 0,
    **kwargs,
) -> Path:
    """A folder with ``ssc_{train,valid,test}.h5`` (``kwargs`` to make_spike_dataset)."""
    root = Path(root)
    make_spike_dataset(root / "ssc_train.h5", n_train, n_classes, seed, **kwargs)
    make_spike_dataset(root / "ssc_valid.h5", n_valid, n_classes, seed + 100, **kwargs)
    make_spike_dataset(root / "ssc_test.h5", n_test, n_classes, seed + 200, **kwargs)
    return root
