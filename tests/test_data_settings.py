"""Loaders under non-default preprocessing settings: cache keys, hand-checked binning, class
names across split files, GSC front-end options, and two processes building one cache."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_at_once
from gsc_files import make_gsc_root
from spike_files import make_shd_root, make_ssc_root, write_spike_h5

from snn_delays.data import gsc, spikes

SPLITS = ("train", "valid", "test")


def _assert_same(a, b, what) -> None:
    for name in SPLITS:
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y), (what, name)
        assert torch.equal(x.lengths, y.lengths), (what, name)
    assert a.n_inputs == b.n_inputs and a.dt_ms == b.dt_ms and a.class_names == b.class_names, what


SPIKE_SETTINGS = [
    {"dt_ms": 4.0},
    {"pool": 7},
    {"n_channels": 703},
    {"max_duration_s": 0.2},
    {"start_at_first_spike": False},
    {"valid_fraction": 0.25},
    {"seed": 5},
    {"valid_fraction": 0.0},
]


def test_spike_cache_follows_every_setting(tmp_path):
    """With the default setting cached first, each other setting loads (twice, the second time
    from its own cache) exactly what binning without a cache gives; the split options reuse the
    binned files' cache instead of adding one."""
    make_shd_root(tmp_path, n_train=48, n_test=16, n_classes=4)
    spikes.load_shd(tmp_path, n_classes=4, download=False)
    for setting in SPIKE_SETTINGS:
        kwargs = {"n_classes": 4, "download": False, **setting}
        fresh = spikes.load_shd(tmp_path, cache=False, **kwargs)
        for _ in range(2):
            _assert_same(spikes.load_shd(tmp_path, **kwargs), fresh, setting)
    n_binnings = 1 + sum(not {"valid_fraction", "seed"} & set(s) for s in SPIKE_SETTINGS)
    assert len(list((tmp_path / "cache").glob("shd_train-*.pt"))) == n_binnings
    assert not list((tmp_path / "cache").glob("*.part"))


def test_ssc_cache_follows_settings(tmp_path):
    make_ssc_root(tmp_path, n_train=35, n_valid=35, n_test=35)
    default = spikes.load_ssc(tmp_path, download=False)
    for setting in ({"dt_ms": 25.0, "pool": 10}, {"max_duration_s": 0.1, "start_at_first_spike": False}):
        got = spikes.load_ssc(tmp_path, download=False, **setting)
        _assert_same(got, spikes.load_ssc(tmp_path, download=False, cache=False, **setting), setting)
        assert got.train.x.shape != default.train.x.shape, setting
    assert default.class_names == [f"class-{c}" for c in range(35)]


# Hand file: 10 channels; times in seconds (float64, exact), sample 1 starts late.
HAND_TIMES = [np.array([0.0, 0.0039, 0.004, 0.0299, 0.03, 0.5]), np.array([0.1, 0.107, 0.135])]
HAND_UNITS = [np.array([0, 2, 3, 5, 9, 9]), np.array([9, 6, 0])]


def test_hand_file_under_non_default_settings(tmp_path):
    """A spike t s after the sample's start, channel c, lands in bin floor(t / dt), input
    c // pool; spikes from max_duration_s on are dropped, so at most ceil(max / dt) bins."""
    for name in ("shd_train.h5", "shd_test.h5"):
        write_spike_h5(tmp_path / name, HAND_TIMES, HAND_UNITS, [0, 1], time_dtype=np.float64)
    kwargs = {"n_channels": 10, "n_classes": 2, "valid_fraction": 0.0, "download": False}
    opts = {"dt_ms": 4.0, "pool": 3, "max_duration_s": 0.03}
    for _ in range(2):  # binned, then from the cache
        data = spikes.load_shd(tmp_path, **kwargs, **opts)
        assert data.n_inputs == 4 and data.dt_ms == 4.0  # ceil(10 / 3): channel 9 alone
        x = data.test.x
        assert x.shape == (2, math.ceil(0.03 / 0.004), 4)
        assert data.test.lengths.tolist() == [8, 2]  # 29.9 ms -> bin 7; 30 ms on dropped
        expected = np.zeros((2, 8, 4), np.int64)
        for b, c in ((0, 0), (0, 0), (1, 1), (7, 1)):  # 0 ms ch 0, 3.9 ms ch 2, 4 ms ch 3, 29.9 ms ch 5
            expected[0, b, c] += 1
        for b, c in ((0, 3), (1, 2)):  # 0 and 7 ms after the first spike, ch 9 and 6
            expected[1, b, c] += 1
        np.testing.assert_array_equal(x.numpy(), expected)
    data = spikes.load_shd(tmp_path, **kwargs, dt_ms=4.0, pool=3, start_at_first_spike=False)
    assert data.test.lengths.tolist() == [126, 34]  # 0.5 s -> bin 125; 0.135 s -> bin 33
    assert data.test.x[1, 25].tolist() == [0, 0, 0, 1] and data.test.x[1, 26].tolist() == [0, 0, 1, 0]
    assert data.test.x[1, 33].tolist() == [1, 0, 0, 0] and int(data.test.x[1].sum()) == 3


def test_validation_split_is_per_class_seeded_and_leaves_test_alone(tmp_path):
    make_shd_root(tmp_path, n_train=80, n_test=16, n_classes=4)
    base = {"n_classes": 4, "download": False}
    full = spikes.load_shd(tmp_path, valid_fraction=0.0, **base)
    a = spikes.load_shd(tmp_path, valid_fraction=0.25, seed=1, **base)
    b = spikes.load_shd(tmp_path, valid_fraction=0.25, seed=2, dt_ms=5.0, **base)
    c = spikes.load_shd(tmp_path, valid_fraction=0.25, seed=1, dt_ms=5.0, **base)
    assert torch.bincount(a.valid.y).tolist() == [5] * 4 and torch.bincount(a.train.y).tolist() == [15] * 4
    # the same samples held out for the same seed whatever dt_ms (spikes per sample tell them)
    assert torch.equal(a.valid.x.sum((1, 2)), c.valid.x.sum((1, 2))) and torch.equal(a.valid.y, c.valid.y)
    assert not torch.equal(b.valid.x.sum((1, 2)), c.valid.x.sum((1, 2)))  # another seed
    for d in (a, b, c):
        assert torch.equal(d.test.y, full.test.y) and len(d.test) == 16
    assert torch.equal(a.test.x, full.test.x)


# ---------------------------------------------------------------- class names across files


def test_class_names_that_differ_across_split_files_are_warned_of(tmp_path):
    """A test file whose extra/keys order the classes otherwise than the training file's may give
    labels that mean other classes: a warning naming both files (also when cached). Not an error:
    the integer labels are the dataset's classes, and the names only label the figures."""
    keys = ["zero", "one", "two"]
    times, units = [np.array([0.01])] * 3, [np.array([1])] * 3
    write_spike_h5(tmp_path / "shd_train.h5", times, units, [0, 1, 2], keys=keys)
    write_spike_h5(tmp_path / "shd_test.h5", times, units, [0, 1, 2], keys=keys[::-1])
    kwargs = {"n_classes": 3, "valid_fraction": 0.0, "download": False}
    for cache in (False, True, True):
        with pytest.warns(UserWarning, match=r"shd_train\.h5 and .*shd_test\.h5.*label 0"):
            assert spikes.load_shd(tmp_path, cache=cache, **kwargs).class_names == keys
    write_spike_h5(tmp_path / "shd_test.h5", times, units, [0, 1, 2], keys=keys)
    assert spikes.load_shd(tmp_path, **kwargs).class_names == keys

    ssc = make_ssc_root(tmp_path / "ssc", n_train=35, n_valid=35, n_test=35)
    names = [f"class-{c}" for c in range(35)]
    other = names[:5] + ["renamed"] + names[6:]
    rng = np.random.default_rng(0)
    ts, us = (
        [np.sort(rng.uniform(0, 0.2, 4)) for _ in range(35)],
        [rng.integers(0, 700, 4) for _ in range(35)],
    )
    write_spike_h5(ssc / "ssc_valid.h5", ts, us, np.arange(35), keys=other)
    with pytest.warns(UserWarning, match=re.escape("label 5 is 'class-5' in one, 'renamed'")):
        assert spikes.load_ssc(ssc, download=False).class_names == names


# ---------------------------------------------------------------- GSC


@pytest.fixture
def gsc_root(tmp_path):
    make_gsc_root(tmp_path, n_per_word=3)
    return tmp_path


def test_gsc_cache_follows_top_db_and_n_mels(gsc_root):
    default = gsc.load_gsc(gsc_root, download=False)
    for setting in ({"top_db": 20.0}, {"n_mels": 32}, {"faithful": True, "n_mels": 32}):
        got = gsc.load_gsc(gsc_root, download=False, **setting)
        _assert_same(got, gsc.load_gsc(gsc_root, download=False, cache=False, **setting), setting)
        assert got.train.x.shape[-1] == got.n_inputs == setting.get("n_mels", 140)
    top = gsc.load_gsc(gsc_root, download=False, top_db=20.0).train.x
    assert not torch.equal(top, default.train.x)
    span = top.amax(dim=(1, 2)) - top.amin(dim=(1, 2))
    assert float(span.max()) <= 20.0 + 1e-4  # each clip floored at its peak - top_db
    assert len(list((gsc_root / "cache").glob("gsc_*.pt"))) == 4
    # feature_batch_size changes memory, not results: the cache is shared
    _assert_same(gsc.load_gsc(gsc_root, download=False, feature_batch_size=7, cache=False), default, "batch")


@pytest.mark.parametrize("setting", [{"feature_batch_size": -1}, {"feature_batch_size": 0}, {"n_mels": 0}])
def test_gsc_refuses_sizes_below_one_and_caches_nothing(gsc_root, setting):
    """feature_batch_size is not in the cache key: -1 computed no feature at all (the
    uninitialised output tensor was cached, then served to every later run of the same front
    end); n_mels 0 gave inputs of width 0."""
    with pytest.raises(ValueError, match="feature_batch_size >= 1"):
        gsc.load_gsc(gsc_root, download=False, **setting)
    assert not (gsc_root / "cache").exists()


# ---------------------------------------------------------------- two processes at once


def _load_in_child(kind: str, root: str, start, out) -> None:
    """A torchrun rank's first load of ``root``: returns a digest of the data and how many
    files (spike files, or GSC splits) this process binned or computed itself."""
    import time

    done = []
    if kind == "shd":
        read = spikes.read_spike_file

        def counted(path, binning, **kwargs):
            done.append(path)
            time.sleep(0.5)  # the other process reaches the cache meanwhile
            return read(path, binning, **kwargs)

        spikes.read_spike_file = counted
        start.wait()
        data = spikes.load_shd(root, n_classes=4, download=False)
    else:
        compute = gsc.compute_features

        def counted(*args, **kwargs):
            done.append(args[1])
            time.sleep(0.5)
            return compute(*args, **kwargs)

        gsc.compute_features = counted
        start.wait()
        data = gsc.load_gsc(root, download=False)
    digest = [float(getattr(data, s).x.double().sum()) for s in SPLITS] + data.valid.y.tolist()
    out.put((digest, len(done)))


def _load_in_two_processes(kind: str, root: Path) -> list[tuple[list, int]]:
    return run_at_once(_load_in_child, kind, str(root))


def _digest(data) -> list:
    return [float(getattr(data, s).x.double().sum()) for s in SPLITS] + data.valid.y.tolist()


def test_two_processes_build_one_cache(tmp_path):
    """Two ranks of a job binning the same root at once: both get the same data, the cache holds
    one file per split file and no temporary file, and a later load reads it. Both binned
    every file (a torchrun job on a node of 8 GPUs binned SSC 8 times over, each rank with
    its own copy in memory): now one bins each file, the other waits and reads the cache."""
    make_shd_root(tmp_path, n_train=200, n_test=40, n_classes=4)
    (a, n_a), (b, n_b) = _load_in_two_processes("shd", tmp_path)
    assert a == b and n_a + n_b == 2  # shd_train.h5 and shd_test.h5, once each
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.name != ".lock")
    assert cached == ["shd_test", "shd_train"]
    assert _digest(spikes.load_shd(tmp_path, n_classes=4, download=False)) == a


def test_two_processes_compute_the_gsc_features_once(gsc_root):
    (a, n_a), (b, n_b) = _load_in_two_processes("gsc", gsc_root)
    assert a == b and n_a + n_b == 3  # train, valid, test, once each
    assert len(list((gsc_root / "cache").glob("gsc_*.pt"))) == 1
    assert not list((gsc_root / "cache").glob("*.part"))
    assert _digest(gsc.load_gsc(gsc_root, download=False)) == a


def test_same_root_twice_in_one_process_gives_independent_tensors(gsc_root, tmp_path):
    """The second load (from the cache, memory-mapped for GSC) is not changed by writing into
    the first's tensors, nor is the cache file."""
    a = gsc.load_gsc(gsc_root, download=False)
    ref = a.train.x.clone()
    a.train.x.zero_()
    assert torch.equal(gsc.load_gsc(gsc_root, download=False).train.x, ref)
    root = Path(tmp_path / "shd")
    make_shd_root(root, n_train=20, n_test=8, n_classes=4)
    b = spikes.load_shd(root, n_classes=4, download=False)
    ref = b.test.x.clone()
    b.test.x.zero_()
    assert torch.equal(spikes.load_shd(root, n_classes=4, download=False).test.x, ref)


@pytest.mark.parametrize("setting", [{"pool": 2.5}, {"n_channels": 700.5}])
def test_fractional_pool_or_channels_are_refused(tmp_path, setting):
    """pool=2.5 binned 700 channels in groups of int(2.5) = 2 (350 inputs) while the bundle
    announced ceil(700 / 2.5) = 280 inputs to the model."""
    make_shd_root(tmp_path, n_train=20, n_test=8, n_classes=4)
    with pytest.raises(ValueError, match="whole numbers"):
        spikes.load_shd(tmp_path, n_classes=4, download=False, cache=False, **setting)
    data = spikes.load_shd(tmp_path, n_classes=4, pool=5.0, n_channels=700.0, download=False)
    assert data.n_inputs == data.train.x.shape[-1] == 140
