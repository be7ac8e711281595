"""Spiking Heidelberg Digits (SHD) and Spiking Speech Commands (SSC), binned as published.

Files (Zenke lab, https://zenkelab.org/datasets/): ``shd_{train,test}.h5`` and
``ssc_{train,valid,test}.h5``, HDF5 with

    spikes/times   ragged float, seconds, one array per sample
    spikes/units   ragged int, the channel of each spike, 0 .. n_channels-1 (700)
    labels         int, 0 .. n_classes-1
    extra/keys     class names (optional here; files that differ are warned of), extra/speaker, ...

Binning. Times are rounded to whole microseconds (the resolution other loaders use). For a
sample with spikes ``(t_k, u_k)``, ``t0 = min_k t_k`` (``start_at_first_spike``) or 0, and

    b_k = floor((t_k - t0) / dt)        c_k = floor(u_k / pool)
    x[b, c] = #{k : b_k = b, c_k = c}   over spikes with t_k - t0 < max_duration_s
    length  = max(1, max_k b_k + 1)     C = ceil(n_channels / pool)

so the 700 channels summed in groups of 5 give 140 inputs (a last partial group is summed
alone). A kept spike more than ``MAX_SPAN_S`` (60 s) after ``t0`` is an error, raised before
anything is allocated: times not in seconds, or one absurd time. Counts are kept, not clipped to 0/1. A split is ``x`` (N, T_max, C), uint8 when every
count fits (int16 otherwise), zero past each sample's length. Binned splits are cached under
``root/cache/``, keyed by the source file's name, size and mtime and every binning option.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from snn_delays.data.base import (
    DataBundle,
    Split,
    build_once,
    progress_bar,
    save_cache,
    stratified_split,
)
from snn_delays.data.download import ensure_file

FORMAT_VERSION = 1
MIRRORS = ("https://zenkelab.org/datasets/", "https://compneuro.net/datasets/")
# md5 of the ``.h5.zip`` copies served by both hosts.
ZIP_MD5 = {
    "shd_train.h5": "f3252aeb598ac776c1b526422d90eecb",
    "shd_test.h5": "1503a5064faa34311c398fb0a1ed0a6f",
    "ssc_train.h5": "d102be95e7144fcc0553d1f45ba94170",
    "ssc_valid.h5": "b4eee3516a4a90dd0c71a6ac23a8ae43",
    "ssc_test.h5": "a35ff1e9cffdd02a20eb850c17c37748",
}
_REQUIRED = ("spikes/times", "spikes/units", "labels")
# Longest span binned (seconds from a sample's first bin to its last kept spike): a longer one
# means times not in seconds (milliseconds, say) or one absurd time, and would allocate a huge
# tensor. Zenke-lab samples last about 1 s.
MAX_SPAN_S = 60.0
log = logging.getLogger(__name__)
_REFETCH = "delete the file and download it again (or replace it with a good copy)"


class DatasetFormatError(ValueError):
    """A dataset file is unreadable or does not hold what the loader expects."""


def n_inputs(n_channels: int, pool: int) -> int:
    return math.ceil(n_channels / pool)


def _flatten(times: Sequence[np.ndarray], units: Sequence[np.ndarray], first: int):
    """Concatenate ragged samples: ``(sample index, time in us, unit)`` of every spike."""
    counts = np.fromiter((len(t) for t in times), np.int64, len(times))
    unit_counts = np.fromiter((len(u) for u in units), np.int64, len(units))
    if bad := np.flatnonzero(counts != unit_counts).tolist():
        i = bad[0]
        raise ValueError(f"sample {first + i} has {counts[i]} spike times but {unit_counts[i]} units")
    sample = np.repeat(np.arange(len(times)), counts)
    if not len(sample):
        return sample, np.zeros(0), np.zeros(0, np.int64)
    t_us = np.round(np.concatenate(times).astype(np.float64) * 1e6)
    return sample, t_us, np.concatenate(units).astype(np.int64)


def _check_values(sample: np.ndarray, t_us: np.ndarray, u: np.ndarray, n_channels: int, first: int):
    bad_unit = np.flatnonzero((u < 0) | (u >= n_channels))
    if len(bad_unit):
        k = bad_unit[0]
        raise ValueError(
            f"sample {first + sample[k]} has unit {u[k]}, outside [0, {n_channels}): if the data "
            f"really has more channels set dataset.n_channels, otherwise {_REFETCH}"
        )
    bad_time = np.flatnonzero(~np.isfinite(t_us) | (t_us < 0))
    if len(bad_time):
        k = bad_time[0]
        raise ValueError(
            f"sample {first + sample[k]} has spike time {t_us[k] / 1e6} s (negative or not finite)"
        )


def bin_spikes(
    times: Sequence[np.ndarray],
    units: Sequence[np.ndarray],
    dt_ms: float = 10.0,
    pool: int = 5,
    n_channels: int = 700,
    max_duration_s: float | None = None,
    start_at_first_spike: bool = True,
    first: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Spike counts ``x`` (N, T, C) int64 and ``lengths`` (N,) of ragged samples (see module).

    ``first`` is the index of ``times[0]`` in its file, for error messages. Raises
    ``ValueError`` for mismatched ragged lengths, units out of range or bad times.
    """
    n, n_out = len(times), n_inputs(n_channels, pool)
    sample, t_us, u = _flatten(times, units, first)
    _check_values(sample, t_us, u, n_channels, first)
    if start_at_first_spike and len(t_us):
        t0 = np.full(n, np.inf)
        np.minimum.at(t0, sample, t_us)
        t_us = t_us - t0[sample]
    if max_duration_s is not None:
        keep = t_us < max_duration_s * 1e6
        sample, t_us, u = sample[keep], t_us[keep], u[keep]
    if len(t_us) and t_us.max() > MAX_SPAN_S * 1e6:  # checked before any allocation
        k = int(np.argmax(t_us))
        since = " after its first spike" if start_at_first_spike else ""
        raise ValueError(
            f"sample {first + sample[k]} has a spike {t_us[k] / 1e6:g} s{since}, beyond the "
            f"{MAX_SPAN_S:g} s the loader bins (MAX_SPAN_S): spike times must be in seconds; if "
            "the recordings really are this long, crop them with dataset.max_duration_s"
        )
    bins = np.floor(t_us / (dt_ms * 1e3)).astype(np.int64)
    lengths = np.ones(n, np.int64)
    np.maximum.at(lengths, sample, bins + 1)
    n_bins = int(lengths.max()) if n else 1
    flat = (sample * n_bins + bins) * n_out + u // pool
    x = np.bincount(flat, minlength=n * n_bins * n_out).reshape(n, n_bins, n_out)
    return x, lengths


def _count_dtype(peak: int) -> np.dtype:
    if peak <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    return np.dtype(np.int16 if peak <= np.iinfo(np.int16).max else np.int32)


def _compact(x: np.ndarray) -> np.ndarray:
    return x.astype(_count_dtype(int(x.max()) if x.size else 0))


def _stack(chunks: list[np.ndarray], n_out: int) -> np.ndarray:
    """Zero-pad chunks (n_i, T_i, C) to the longest T and stack them in the narrowest dtype."""
    peak = max((int(c.max()) for c in chunks if c.size), default=0)
    n_bins = max((c.shape[1] for c in chunks), default=1)
    x = np.zeros((sum(len(c) for c in chunks), n_bins, n_out), _count_dtype(peak))
    start = 0
    for c in chunks:
        x[start : start + len(c), : c.shape[1]] = c
        start += len(c)
    return x


def _open_datasets(f: h5py.File, path: Path) -> tuple[Any, Any, np.ndarray]:
    missing = [key for key in _REQUIRED if key not in f]
    if missing:
        raise DatasetFormatError(
            f"{path}: not a Zenke-lab spike file, it lacks {', '.join(missing)} "
            f"(needs {', '.join(_REQUIRED)}): {_REFETCH}"
        )
    times, units, labels = f["spikes/times"], f["spikes/units"], f["labels"][()]
    for key, kinds, what in (("spikes/times", "fiu", "number"), ("spikes/units", "iu", "integer")):
        dataset = f[key]
        if not isinstance(dataset, h5py.Dataset):
            base, got = None, "a group"
        elif (base := h5py.check_vlen_dtype(dataset.dtype)) is None:
            got = f"{dataset.dtype} {dataset.shape}"
        else:
            got = f"{base} arrays {dataset.shape}"
        if base is None or dataset.ndim != 1 or base.kind not in kinds:
            raise DatasetFormatError(
                f"{path}: {key} must hold one {what} array per sample (a 1-D variable-length "
                f"dataset), got {got}: {_REFETCH}"
            )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if not len(times) == len(units) == len(labels):
        raise DatasetFormatError(
            f"{path}: {len(times)} spike-time arrays, {len(units)} unit arrays and {len(labels)} "
            f"labels should all be equal: {_REFETCH}"
        )
    return times, units, labels


def _class_names(f: h5py.File) -> list[str]:
    if "extra/keys" not in f:
        return []
    return [k.decode() if isinstance(k, bytes) else str(k) for k in f["extra/keys"][()]]


def read_spike_file(path: Path, binning: dict[str, Any], chunk: int = 512) -> dict[str, Any]:
    """Read and bin one file: ``{"x", "lengths", "y", "class_names"}`` (tensors, list)."""
    try:
        with h5py.File(path, "r") as f:
            times, units, labels = _open_datasets(f, path)
            chunks, lengths = [], []
            starts = range(0, len(labels), chunk)
            log.info("binning %d samples of %s (%s ms bins)", len(labels), path, binning["dt_ms"])
            for a in progress_bar(starts, desc=f"binning {path.name}", disable=len(starts) < 8):
                x, n_bins = bin_spikes(times[a : a + chunk], units[a : a + chunk], **binning, first=a)
                chunks.append(_compact(x))
                lengths.append(n_bins)
            names = _class_names(f)
    except DatasetFormatError:
        raise
    except ValueError as err:
        raise DatasetFormatError(f"{path}: {err}") from err
    except OSError as err:
        raise DatasetFormatError(
            f"{path}: cannot be read as HDF5 ({err}); it is truncated or corrupt: {_REFETCH}"
        ) from err
    x = _stack(chunks, n_inputs(binning["n_channels"], binning["pool"]))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    return {
        "x": torch.from_numpy(x),
        "lengths": torch.from_numpy(lengths),
        "y": torch.from_numpy(labels.astype(np.int64)),
        "class_names": names,
    }


def cache_path(path: Path, cache_dir: Path, binning: dict[str, Any]) -> Path:
    """Cache file for ``path`` binned with ``binning``; any change of either changes it."""
    stat = path.stat()
    key = {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "version": FORMAT_VERSION}
    text = json.dumps({**key, **binning}, sort_keys=True)
    return cache_dir / f"{path.stem}-{hashlib.sha1(text.encode()).hexdigest()[:16]}.pt"


def _read_cache(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = torch.load(path, weights_only=True)
        if not {"x", "lengths", "y", "class_names"} <= set(data):
            raise ValueError("missing entries")
        return data
    except Exception as err:  # a damaged cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable cache {path} ({err}); binning again", stacklevel=2)
        return None


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    err = save_cache(path, data)
    if err is not None:
        warnings.warn(f"could not write the cache {path} ({err}); continuing without it", stacklevel=2)


def _binned_through_cache(path: Path, binning: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    cached = cache_path(path, cache_dir, binning)
    data, from_cache = build_once(
        cached, _read_cache, lambda: read_spike_file(path, binning), _write_cache, f"binning {path.name}"
    )
    if from_cache:
        log.info("%s binned, from cache %s", path.name, cached)
    return data


def load_spike_split(
    path: Path, binning: dict[str, Any], n_classes: int, cache_dir: Path | None
) -> tuple[Split, list[str]]:
    """One binned split of a spike file (cached when ``cache_dir`` is given), labels checked."""
    if cache_dir is None:
        data = read_spike_file(path, binning)
    else:
        data = _binned_through_cache(path, binning, cache_dir)
    y = data["y"]
    if not len(y):
        raise DatasetFormatError(f"{path}: holds no samples (0 labels): {_REFETCH}")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise DatasetFormatError(
            f"{path}: labels span {int(y.min())}..{int(y.max())}, outside [0, {n_classes}): set "
            f"dataset.n_classes to this file's number of classes, or {_REFETCH}"
        )
    names = list(data["class_names"])
    if names and len(names) != n_classes:
        warnings.warn(
            f"{path}: extra/keys holds {len(names)} class names for {n_classes} classes; "
            "ignoring them (classes are shown by number)",
            stacklevel=2,
        )
        names = []
    return Split(data["x"], data["lengths"], y), names


def _binning(dt_ms: float, pool: int, n_channels: int, max_duration_s: float | None, start: bool) -> dict:
    # a fractional pool or channel count would bin int(value) but size the model from the value
    if dt_ms <= 0 or pool < 1 or n_channels < 1 or pool != int(pool) or n_channels != int(n_channels):
        raise ValueError(
            "need dataset.dt_ms > 0 and whole numbers pool >= 1, n_channels >= 1; "
            f"got {dt_ms}, {pool}, {n_channels}"
        )
    if max_duration_s is not None and max_duration_s <= 0:
        raise ValueError(f"dataset.max_duration_s must be positive or null, got {max_duration_s}")
    return {
        "dt_ms": float(dt_ms),
        "pool": int(pool),
        "n_channels": int(n_channels),
        "max_duration_s": None if max_duration_s is None else float(max_duration_s),
        "start_at_first_spike": bool(start),
    }


def _agreed_names(root: Path, names: dict[str, list[str]]) -> list[str]:
    """The class names of a dataset's files (files without names aside), the first file's. Files
    that name a label differently get a warning naming both: the labels are used as they are
    (the integers are the dataset's classes), but that file may follow another class order."""
    named = [(f, n) for f, n in names.items() if n]
    if not named:
        return []
    first, ref = named[0]
    for f, n in named[1:]:
        c = next((c for c, (a, b) in enumerate(zip(ref, n, strict=True)) if a != b), None)
        if c is not None:
            warnings.warn(
                f"{root / first} and {root / f} name the classes differently (label {c} is "
                f"{ref[c]!r} in one, {n[c]!r} in the other): if their labels follow different class "
                f"orders, relabel one file; the figures use {first}'s names",
                stacklevel=3,
            )
    return ref


def _split(root: Path, filename: str, binning: dict, n_classes: int, download: bool, cache: bool):
    urls = [base + filename + ".zip" for base in MIRRORS]
    path = ensure_file(root, filename, urls, ZIP_MD5.get(filename), download)
    return load_spike_split(path, binning, n_classes, root / "cache" if cache else None)


def load_shd(
    root: str | Path = "datasets/shd",
    dt_ms: float = 10.0,
    pool: int = 5,
    n_channels: int = 700,
    n_classes: int = 20,
    max_duration_s: float | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    cache: bool = True,
    start_at_first_spike: bool = True,
) -> DataBundle:
    """SHD; validation is a stratified, seeded ``valid_fraction`` of the training file.

    ``root`` is resolved against the working directory. ``valid_fraction = 0`` gives an empty
    validation split (SHD has none of its own).
    """
    root = Path(root).expanduser().absolute()
    binning = _binning(dt_ms, pool, n_channels, max_duration_s, start_at_first_spike)
    full, train_names = _split(root, "shd_train.h5", binning, n_classes, download, cache)
    test, test_names = _split(root, "shd_test.h5", binning, n_classes, download, cache)
    names = _agreed_names(root, {"shd_train.h5": train_names, "shd_test.h5": test_names})
    keep, held = stratified_split(full.y, valid_fraction, seed)
    train = full if len(held) == 0 else full.subset(keep)
    return DataBundle(
        "shd", train, full.subset(held), test, n_inputs(n_channels, pool), n_classes, float(dt_ms), names
    )


def load_ssc(
    root: str | Path = "datasets/ssc",
    dt_ms: float = 10.0,
    pool: int = 5,
    n_channels: int = 700,
    n_classes: int = 35,
    max_duration_s: float | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    cache: bool = True,
    start_at_first_spike: bool = True,
) -> DataBundle:
    """SSC with its own validation file; ``valid_fraction`` and ``seed`` are unused (kept so
    every spike dataset config has the same keys)."""
    del valid_fraction, seed
    root = Path(root).expanduser().absolute()
    binning = _binning(dt_ms, pool, n_channels, max_duration_s, start_at_first_spike)
    files = [f"ssc_{s}.h5" for s in ("train", "valid", "test")]
    splits = [_split(root, f, binning, n_classes, download, cache) for f in files]
    (train, _), (valid, _), (test, _) = splits
    names = _agreed_names(root, {f: split_names for f, (_, split_names) in zip(files, splits, strict=True)})
    return DataBundle("ssc", train, valid, test, n_inputs(n_channels, pool), n_classes, float(dt_ms), names)
