"""SHD/SSC loading: binning, splits, cache, downloads (file:// only) and bad-file errors."""

from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import io
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_at_once
from hydra import compose, initialize_config_dir
from spike_files import make_shd_root, make_spike_dataset, make_ssc_root, write_spike_h5

from snn_delays.data import download, spikes
from snn_delays.data.base import progress_bars, stratified_split
from snn_delays.train import CONF_DIR, run

REPO = Path(__file__).resolve().parents[1]

# Hand example: 12 channels in groups of 5 -> 3 inputs, the last one of 2 channels.
HAND_TIMES = [
    np.array([0.105, 0.107, 0.118, 0.131]),
    np.array([]),
    np.array([0.0, 0.001, 0.009, 0.0095, 0.02]),
]
HAND_UNITS = [np.array([0, 4, 5, 11]), np.array([], np.int64), np.array([11, 10, 11, 3, 7])]


def _dense(n_bins: int, entries: dict[tuple[int, int], int]) -> np.ndarray:
    x = np.zeros((n_bins, 3), np.int64)
    for (b, c), v in entries.items():
        x[b, c] = v
    return x


def _bin_hand(**kwargs):
    return spikes.bin_spikes(HAND_TIMES, HAND_UNITS, dt_ms=10.0, pool=5, n_channels=12, **kwargs)


def test_bins_start_at_first_spike():
    x, lengths = _bin_hand()
    assert x.shape == (3, 3, 3)
    assert lengths.tolist() == [3, 1, 3]
    # sample 0: 0, 2, 13, 26 ms after its first spike; channels 0, 4 | 5 | 11
    np.testing.assert_array_equal(x[0], _dense(3, {(0, 0): 2, (1, 1): 1, (2, 2): 1}))
    np.testing.assert_array_equal(x[1], 0)
    # sample 2: 0, 1, 9, 9.5, 20 ms; channels 11, 10, 11 (partial group) | 3 | 7
    np.testing.assert_array_equal(x[2], _dense(3, {(0, 2): 3, (0, 0): 1, (2, 1): 1}))


def test_bins_start_at_zero():
    x, lengths = _bin_hand(start_at_first_spike=False)
    assert lengths.tolist() == [14, 1, 3]
    np.testing.assert_array_equal(x[0], _dense(14, {(10, 0): 2, (11, 1): 1, (13, 2): 1}))
    np.testing.assert_array_equal(x[2, :3], _dense(3, {(0, 2): 3, (0, 0): 1, (2, 1): 1}))


def test_bins_max_duration_drops_late_spikes():
    x, lengths = _bin_hand(max_duration_s=0.02)  # keeps [0, 20) ms after the first spike
    assert lengths.tolist() == [2, 1, 1]
    np.testing.assert_array_equal(x[0], _dense(2, {(0, 0): 2, (1, 1): 1}))
    np.testing.assert_array_equal(x[2], _dense(2, {(0, 2): 3, (0, 0): 1}))  # zero-padded


def test_hand_file_loads_exactly(tmp_path):
    for name in ("shd_train.h5", "shd_test.h5"):
        write_spike_h5(tmp_path / name, HAND_TIMES, HAND_UNITS, [0, 1, 1], time_dtype=np.float64)
    data = spikes.load_shd(tmp_path, n_channels=12, n_classes=2, valid_fraction=0.0, download=False)
    expected, lengths = _bin_hand()
    assert data.n_inputs == 3 and data.n_classes == 2 and data.dt_ms == 10.0 and data.name == "shd"
    for split in (data.train, data.test):
        assert split.x.dtype == torch.uint8
        np.testing.assert_array_equal(split.x.numpy(), expected)
        assert split.lengths.tolist() == lengths.tolist()
        assert split.y.dtype == torch.int64 and split.y.tolist() == [0, 1, 1]
    assert data.valid.x.shape == (0, 3, 3) and len(data.valid) == 0
    assert data.class_names == ["class-0", "class-1"]


def test_large_counts_are_kept_as_int16(tmp_path):
    times, units = [np.full(300, 0.01), np.array([0.5])], [np.zeros(300, np.int64), np.array([699])]
    path = write_spike_h5(tmp_path / "a.h5", times, units, [0, 1], time_dtype=np.float64)
    binning = spikes._binning(10.0, 5, 700, None, True)
    split, _ = spikes.load_spike_split(path, binning, n_classes=2, cache_dir=None)
    assert split.x.dtype == torch.int16 and int(split.x[0, 0, 0]) == 300 and int(split.x[1, 0, 139]) == 1
    assert split.lengths.tolist() == [1, 1]


def test_random_file_matches_binning_and_labels(tmp_path):
    written = make_spike_dataset(tmp_path / "shd_train.h5", 50, 5, seed=3)
    shutil.copy(tmp_path / "shd_train.h5", tmp_path / "shd_test.h5")
    data = spikes.load_shd(tmp_path, n_classes=5, valid_fraction=0.0, download=False, cache=False)
    x, lengths = spikes.bin_spikes(written["times"], written["units"])
    assert data.train.x.shape == (50, lengths.max(), 140) and data.n_inputs == 140
    np.testing.assert_array_equal(data.train.x.numpy(), x)
    assert data.train.lengths.tolist() == lengths.tolist()
    assert data.train.y.tolist() == written["labels"].tolist()
    assert int(data.train.x.sum()) == sum(len(t) for t in written["times"])


def test_shd_validation_is_stratified_and_seeded(tmp_path):
    make_shd_root(tmp_path, n_train=200, n_test=20, n_classes=4)
    full = spikes.load_shd(tmp_path, n_classes=4, valid_fraction=0.0, download=False).train
    data = spikes.load_shd(tmp_path, n_classes=4, valid_fraction=0.1, seed=7, download=False)
    assert torch.bincount(data.valid.y).tolist() == [5] * 4
    assert torch.bincount(data.train.y).tolist() == [45] * 4
    keep, held = stratified_split(full.y, 0.1, 7)
    assert torch.equal(data.valid.x, full.x[held]) and torch.equal(data.train.x, full.x[keep])
    other = spikes.load_shd(tmp_path, n_classes=4, valid_fraction=0.1, seed=8, download=False)
    assert not torch.equal(other.valid.x, data.valid.x)
    assert len(data.test) == 20


def test_ssc_uses_its_own_validation_file(tmp_path):
    make_ssc_root(tmp_path, n_train=70, n_valid=35, n_test=35)
    data = spikes.load_ssc(tmp_path, download=False)
    assert (len(data.train), len(data.valid), len(data.test)) == (70, 35, 35)
    assert data.name == "ssc" and data.n_classes == 35 and data.n_inputs == 140
    assert sorted(data.valid.y.tolist()) == list(range(35))


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    make_shd_root(tmp_path, n_train=40, n_test=10, n_classes=4)
    first = spikes.load_shd(tmp_path, n_classes=4, download=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert not list((tmp_path / "cache").glob("*.part"))

    def no_binning(*args, **kwargs):
        raise AssertionError("binned again instead of using the cache")

    monkeypatch.setattr(spikes, "bin_spikes", no_binning)
    second = spikes.load_shd(tmp_path, n_classes=4, download=False)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)
    assert second.class_names == first.class_names
    with pytest.raises(AssertionError, match="binned again"):  # another option, another key
        spikes.load_shd(tmp_path, n_classes=4, dt_ms=5.0, download=False)
    stat = (tmp_path / "shd_test.h5").stat()
    os.utime(tmp_path / "shd_test.h5", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="binned again"):  # a changed file, another key
        spikes.load_shd(tmp_path, n_classes=4, download=False)


def test_damaged_cache_is_rebuilt(tmp_path):
    make_shd_root(tmp_path, n_train=20, n_test=10, n_classes=4)
    first = spikes.load_shd(tmp_path, n_classes=4, download=False)
    for cached in (tmp_path / "cache").glob("*.pt"):
        cached.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cache"):
        again = spikes.load_shd(tmp_path, n_classes=4, download=False)
    assert torch.equal(first.test.x, again.test.x)


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_existing_files_are_used_without_download(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.setattr(spikes, "MIRRORS", ("https://invalid.example/",))
    make_ssc_root(tmp_path)
    assert len(spikes.load_ssc(tmp_path, download=True).train) == 70
    assert (
        download.ensure_file(tmp_path, "ssc_test.h5", ["bogus://x"], "0" * 32, True)
        == tmp_path / "ssc_test.h5"
    )


def test_relative_root_resolves_against_cwd(tmp_path, monkeypatch):
    make_shd_root(tmp_path / "data" / "shd", n_train=20, n_test=10, n_classes=4)
    monkeypatch.chdir(tmp_path)
    assert len(spikes.load_shd("data/shd", n_classes=4, download=False).test) == 10


def test_missing_file_offline_names_file_url_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        spikes.load_shd(tmp_path / "shd", download=False)
    message = str(info.value)
    assert isinstance(info.value, download.MissingDataError)
    assert "shd_train.h5" in message and str(tmp_path / "shd") in message
    assert "https://zenkelab.org/datasets/shd_train.h5.zip" in message
    assert "https://compneuro.net/datasets/shd_train.h5.zip" in message
    assert "dataset.root" in message and "dataset.download" in message


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A 'server' folder holding one spike file as .h5, .h5.zip and .h5.gz."""
    server = tmp_path / "server"
    make_spike_dataset(server / "shd_train.h5", 10, 2, seed=0)
    with zipfile.ZipFile(server / "shd_train.h5.zip", "w") as zf:
        zf.write(server / "shd_train.h5", "shd_train.h5")
    with open(server / "shd_train.h5", "rb") as src, gzip.open(server / "shd_train.h5.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return server


def _leftovers(folder: Path) -> list[str]:
    """What ``folder`` holds, but the (empty) lock file one download at a time leaves."""
    if not folder.exists():
        return []
    lock = folder / ".download.lock"
    assert not lock.exists() or lock.stat().st_size == 0
    return sorted(p.name for p in folder.iterdir() if p != lock)


@pytest.mark.parametrize("suffix", [".zip", ".gz"])
def test_download_verifies_and_unpacks(served, tmp_path, suffix):
    root = tmp_path / "root"
    archive = served / f"shd_train.h5{suffix}"
    urls = [(served / "absent.zip").as_uri(), archive.as_uri()]  # first mirror fails
    got = download.ensure_file(root, "shd_train.h5", urls, _md5(archive), download=True)
    assert got == root / "shd_train.h5"
    assert got.read_bytes() == (served / "shd_train.h5").read_bytes()
    assert _leftovers(root) == ["shd_train.h5"]  # no .part, no archive


@pytest.mark.parametrize("suffix", [".zip", ".gz"])
def test_download_with_wrong_md5_leaves_nothing(served, tmp_path, suffix):
    root = tmp_path / "root"
    archive = served / f"shd_train.h5{suffix}"
    with pytest.raises(download.MissingDataError) as info:
        download.ensure_file(root, "shd_train.h5", [archive.as_uri()], "0" * 32, download=True)
    message = str(info.value)
    assert "shd_train.h5" in message and "0" * 32 in message and _md5(archive) in message
    assert _leftovers(root) == []
    with pytest.raises(download.ChecksumError, match=_md5(archive)):
        download.download_url(archive.as_uri(), root / archive.name, md5="0" * 32)
    assert _leftovers(root) == []


def test_download_url_keeps_archive(served, tmp_path):
    archive = served / "shd_train.h5.gz"
    dest = download.download_url(archive.as_uri(), tmp_path / "x" / archive.name, _md5(archive))
    assert dest.read_bytes() == archive.read_bytes() and _leftovers(dest.parent) == [archive.name]


def test_bad_archive_is_reported(tmp_path):
    bogus = tmp_path / "server" / "shd_train.h5.zip"
    bogus.parent.mkdir()
    bogus.write_bytes(b"not a zip")
    with pytest.raises(download.MissingDataError, match="not a valid archive"):
        download.ensure_file(tmp_path / "root", "shd_train.h5", [bogus.as_uri()], None, True)
    assert _leftovers(tmp_path / "root") == []


def test_load_shd_downloads_through_mirrors(served, tmp_path, monkeypatch):
    shutil.copy(served / "shd_train.h5.zip", served / "shd_test.h5.zip")
    md5 = _md5(served / "shd_train.h5.zip")
    monkeypatch.setattr(spikes, "MIRRORS", (served.as_uri() + "/",))
    monkeypatch.setattr(spikes, "ZIP_MD5", {"shd_train.h5": md5, "shd_test.h5": md5})
    data = spikes.load_shd(tmp_path / "root", n_classes=2, valid_fraction=0.0)
    assert len(data.train) == len(data.test) == 10
    assert sorted(_leftovers(tmp_path / "root")) == ["cache", "shd_test.h5", "shd_train.h5"]


def _serve_shd(served: Path, monkeypatch) -> None:
    """``load_shd`` downloads from ``served``, and bins one sample per chunk (so that even a
    tiny file draws the binning bar)."""
    shutil.copy(served / "shd_train.h5.zip", served / "shd_test.h5.zip")
    md5 = _md5(served / "shd_train.h5.zip")
    monkeypatch.setattr(spikes, "MIRRORS", (served.as_uri() + "/",))
    monkeypatch.setattr(spikes, "ZIP_MD5", {"shd_train.h5": md5, "shd_test.h5": md5})
    monkeypatch.setattr(spikes, "read_spike_file", functools.partial(spikes.read_spike_file, chunk=1))


STAGES = ("downloading shd_train.h5.zip", "unpacking shd_train.h5.zip", "binning 10 samples of")


@pytest.mark.parametrize("shown", [True, False])
def test_data_bars_follow_progress_bars(served, tmp_path, monkeypatch, capsys, caplog, shown):
    """The download and binning bars drew on stderr whatever the setting; inside
    ``progress_bars(False)`` they are hidden, and each stage still says what it does in a log
    line."""
    _serve_shd(served, monkeypatch)
    with caplog.at_level(logging.INFO, logger="snn_delays"), progress_bars(shown):
        spikes.load_shd(tmp_path / "root", n_classes=2, valid_fraction=0.0)
    err = capsys.readouterr().err
    assert ("shd_train.h5.zip:" in err and "binning shd_train.h5:" in err) is shown, err
    assert shown or err == ""
    lines = [r.getMessage() for r in caplog.records]
    for stage in STAGES:
        assert any(m.startswith(stage) for m in lines), (stage, lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="snn_delays"):
        spikes.load_shd(tmp_path / "root", n_classes=2, valid_fraction=0.0)
    assert "binning" not in capsys.readouterr().err  # bars are shown again, and binning is cached
    assert any(r.getMessage().startswith("shd_train.h5 binned, from cache") for r in caplog.records)


@pytest.mark.parametrize("progress", ["true", "false"])
def test_trainer_progress_hides_the_data_bars(served, tmp_path, monkeypatch, capfd, progress):
    """``trainer.progress=false`` (the SLURM script's setting) left a first run's download and
    binning bars in the job's output."""
    _serve_shd(served, monkeypatch)
    root = tmp_path / "root"
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "dataset=shd",
                f"dataset.root={root}",
                "dataset.n_classes=2",
                "dataset.valid_fraction=0",
                "model.n_hidden=8",
                "trainer.epochs=1",
                "logger=none",
                f"trainer.progress={progress}",
            ],
        )
    run(cfg, tmp_path / "run")
    err = capfd.readouterr().err
    assert ("binning shd_train.h5:" in err) is (progress == "true"), err
    assert ("shd_train.h5.zip:" in err) is (progress == "true"), err


# --- bad files: every error names the file ------------------------------------------------


def _load_bad(path: Path, **kwargs):
    binning = spikes._binning(10.0, 5, kwargs.pop("n_channels", 700), None, True)
    return spikes.load_spike_split(path, binning, kwargs.pop("n_classes", 20), cache_dir=None)


def _expect_error(path: Path, *words: str, **kwargs) -> str:
    with pytest.raises(spikes.DatasetFormatError, match=re.escape(str(path))) as info:
        _load_bad(path, **kwargs)
    for word in words:
        assert word in str(info.value)
    return str(info.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "shd_train.h5"
    make_spike_dataset(path, 30, 4, seed=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "truncated or corrupt", "download it again")


def test_corrupt_bytes(tmp_path):
    path = tmp_path / "shd_test.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _expect_error(path, "truncated or corrupt")


def test_missing_spike_times(tmp_path):
    path = tmp_path / "a.h5"
    make_spike_dataset(path, 5, 2, seed=0)
    with h5py.File(path, "a") as f:
        del f["spikes/times"]
    _expect_error(path, "spikes/times")


@pytest.mark.parametrize("unit", [700, -1])
def test_unit_out_of_range(tmp_path, unit):
    path = write_spike_h5(
        tmp_path / "a.h5",
        [np.array([0.1, 0.2])] * 2,
        [np.array([3, 4]), np.array([5, unit])],
        [0, 1],
        unit_dtype=np.int16,
    )
    _expect_error(path, f"sample 1 has unit {unit}", "n_channels")


def test_unit_beyond_configured_channels(tmp_path):
    path = write_spike_h5(tmp_path / "a.h5", [np.array([0.1])], [np.array([650])], [0])
    _expect_error(path, "650", "dataset.n_channels", n_channels=600)


def test_label_out_of_range(tmp_path):
    path = write_spike_h5(tmp_path / "a.h5", [np.array([0.1])] * 2, [np.array([1])] * 2, [0, 20])
    _expect_error(path, "outside [0, 20)", "dataset.n_classes")


def test_ragged_lengths_disagree(tmp_path):
    path = write_spike_h5(tmp_path / "a.h5", [np.array([0.1, 0.2])], [np.array([1])], [0])
    _expect_error(path, "sample 0 has 2 spike times but 1 units")
    path = write_spike_h5(tmp_path / "b.h5", [np.array([0.1])] * 2, [np.array([1])] * 2, [0, 1, 1])
    _expect_error(path, "3 labels")


def test_config_keys_match_loaders(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    hydra_utils = pytest.importorskip("hydra.utils")
    make_shd_root(tmp_path / "shd", n_train=40, n_test=10)
    make_ssc_root(tmp_path / "ssc")
    for name, loader in (("shd", spikes.load_shd), ("ssc", spikes.load_ssc)):
        cfg = omegaconf.OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml")
        assert set(cfg) - {"_target_"} == set(inspect.signature(loader).parameters)
        cfg.root, cfg.download = str(tmp_path / name), False
        data = hydra_utils.instantiate(cfg)
        assert data.name == name and data.n_inputs == 140


# --- archives already in the folder, concurrent and incomplete downloads -------------------


def _offline(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


def _mirrors(served: Path, name: str = "shd_train.h5.zip") -> list[str]:
    return [f"https://zenkelab.invalid/datasets/{name}", (served / name).as_uri()]


@pytest.mark.parametrize("allow_download", [True, False])
def test_archive_placed_by_hand_is_unpacked_offline_and_kept(served, tmp_path, monkeypatch, allow_download):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(served / "shd_train.h5.zip", root)
    _offline(monkeypatch)
    md5 = _md5(served / "shd_train.h5.zip")
    got = download.ensure_file(root, "shd_train.h5", _mirrors(served), md5, allow_download)
    assert got.read_bytes() == (served / "shd_train.h5").read_bytes()
    assert _leftovers(root) == ["shd_train.h5", "shd_train.h5.zip"]  # the user's archive stays


@pytest.mark.parametrize("allow_download", [True, False])
def test_bad_archive_placed_by_hand_is_named_and_kept(served, tmp_path, monkeypatch, allow_download):
    root = tmp_path / "root"
    root.mkdir()
    good = (served / "shd_train.h5.zip").read_bytes()
    (root / "shd_train.h5.zip").write_bytes(good[: len(good) // 2])  # an interrupted copy
    _offline(monkeypatch)
    for md5, words in ((_md5(served / "shd_train.h5.zip"), "md5"), (None, "not a valid archive")):
        with pytest.raises(download.MissingDataError) as info:
            download.ensure_file(root, "shd_train.h5", _mirrors(served), md5, allow_download)
        message = str(info.value)
        assert str(root / "shd_train.h5.zip") in message and "left in place" in message and words in message
        assert (root / "shd_train.h5.zip").read_bytes() == good[: len(good) // 2]
        assert _leftovers(root) == ["shd_train.h5.zip"]
    if allow_download:  # a mirror still gives the file; the bad archive is not touched
        monkeypatch.undo()
        urls = [(served / "shd_train.h5.zip").as_uri()]
        download.ensure_file(root, "shd_train.h5", urls, _md5(served / "shd_train.h5.zip"), True)
        assert (root / "shd_train.h5").read_bytes() == (served / "shd_train.h5").read_bytes()
        assert (root / "shd_train.h5.zip").read_bytes() == good[: len(good) // 2]


def test_other_processes_temporary_files_are_left_alone(served, tmp_path):
    """Every rank of a torchrun job fetches at once: each writes its own temporary files."""
    root = tmp_path / "root"
    root.mkdir()
    others = {"shd_train.h5.part": b"another rank's extraction", "shd_train.h5.zip.part": b"its download"}
    for name, data in others.items():
        (root / name).write_bytes(data)
    archive = served / "shd_train.h5.zip"
    download.ensure_file(root, "shd_train.h5", [archive.as_uri()], _md5(archive), True)
    assert (root / "shd_train.h5").read_bytes() == (served / "shd_train.h5").read_bytes()
    assert {name: (root / name).read_bytes() for name in others} == others
    assert _leftovers(root) == sorted(["shd_train.h5", *others])


def _fetch_in_child(root: str, url: str, md5: str, start, out) -> None:
    """A torchrun rank's first load: fetch through ``ensure_file``, counting the downloads."""
    import time

    stream, streamed = download._stream, []

    def counted(*args):
        streamed.append(args[0])
        time.sleep(0.5)  # the other process arrives meanwhile
        return stream(*args)

    download._stream = counted
    start.wait()
    got = download.ensure_file(Path(root), "shd_train.h5", [url], md5, True)
    out.put(
        (
            got.read_bytes() == (Path(url[len("file://") :]).parent / "shd_train.h5").read_bytes(),
            len(streamed),
        )
    )


def test_two_processes_download_once(served, tmp_path):
    """Every rank of a torchrun job downloaded the file (8 downloads of SSC on a node of 8
    GPUs); one downloads now while the other waits, then finds the file."""
    archive = served / "shd_train.h5.zip"
    results = run_at_once(_fetch_in_child, str(tmp_path / "root"), archive.as_uri(), _md5(archive))
    assert all(same for same, _ in results) and sum(n for _, n in results) == 1, results
    assert _leftovers(tmp_path / "root") == ["shd_train.h5"]


def test_file_finished_by_another_process_ends_the_mirror_loop(served, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    calls = []

    def other_rank_finishes(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise AssertionError("tried the next mirror although the file is there")
        shutil.copy(served / "shd_train.h5", root / "shd_train.h5")  # meanwhile, another rank
        raise urllib.error.URLError("mirror down")

    monkeypatch.setattr(urllib.request, "urlopen", other_rank_finishes)
    got = download.ensure_file(root, "shd_train.h5", _mirrors(served), None, True)
    assert got.read_bytes() == (served / "shd_train.h5").read_bytes() and len(calls) == 1


class _DroppedResponse(io.BytesIO):
    """A response whose connection drops: half of the announced Content-Length arrives."""

    def __init__(self, body: bytes):
        super().__init__(body)
        self.headers = {"Content-Length": str(2 * len(body))}


def test_incomplete_transfer_is_rejected_without_md5(served, tmp_path, monkeypatch):
    body = (served / "shd_train.h5.gz").read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _DroppedResponse(body))
    root = tmp_path / "root"
    with pytest.raises(urllib.error.ContentTooShortError, match=f"got {len(body)} of {2 * len(body)}"):
        download.download_url("https://example.invalid/shd_train.h5.gz", root / "shd_train.h5.gz")
    assert _leftovers(root) == []
    with pytest.raises(download.MissingDataError, match="incomplete download"):
        download.ensure_file(root, "shd_train.h5", ["https://example.invalid/shd_train.h5.gz"], None, True)
    assert _leftovers(root) == []


# --- cache write failures, implausible files ------------------------------------------------


@pytest.mark.parametrize("failure", ["disk full", "cache is a file"])
def test_cache_write_failure_only_warns(tmp_path, monkeypatch, failure):
    make_shd_root(tmp_path, n_train=20, n_test=10, n_classes=4)
    if failure == "disk full":

        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed")

        monkeypatch.setattr(torch, "save", full)
    else:
        (tmp_path / "cache").write_text("not a folder")
    with pytest.warns(UserWarning, match="continuing without it"):
        data = spikes.load_shd(tmp_path, n_classes=4, download=False)
    assert len(data.test) == 10
    if failure == "disk full":
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]  # no .part left behind


def test_times_not_in_seconds_are_refused(tmp_path):
    times = [np.array([0.0, 120.5, 480.0]), np.array([0.0, 0.2])]  # milliseconds
    units = [np.array([0, 1, 2]), np.array([3, 4])]
    path = write_spike_h5(tmp_path / "a.h5", times, units, [0, 1], time_dtype=np.float32)
    _expect_error(path, "sample 0", "480 s", "seconds", "MAX_SPAN_S", "dataset.max_duration_s", n_channels=12)
    # Cropping bounds the span: the check applies to the spikes that are kept.
    x, lengths = spikes.bin_spikes(times, units, pool=5, n_channels=12, max_duration_s=1.0)
    assert lengths.tolist() == [1, 21] and x.shape == (2, 21, 3)


def test_float_units_are_refused(tmp_path):
    path = write_spike_h5(
        tmp_path / "a.h5", [np.array([0.1, 0.2])], [np.array([3.7, 4.2])], [0], unit_dtype=np.float32
    )
    _expect_error(path, "spikes/units", "integer", "float32")


@pytest.mark.parametrize("key", ["spikes/times", "spikes/units"])
def test_spikes_must_be_arrays_per_sample(tmp_path, key):
    path = tmp_path / "a.h5"
    make_spike_dataset(path, 6, 2, seed=0)
    with h5py.File(path, "a") as f:
        del f[key]
        f[key] = np.zeros(6, np.float64 if key == "spikes/times" else np.int64)  # one number each
    _expect_error(path, key, "per sample", "variable-length")


def test_empty_split_file_is_refused(tmp_path):
    path = write_spike_h5(tmp_path / "shd_test.h5", [], [], np.zeros(0, np.uint16))
    _expect_error(path, "no samples")
    make_shd_root(tmp_path / "shd", n_train=20, n_test=10, n_classes=4)
    write_spike_h5(tmp_path / "shd" / "shd_train.h5", [], [], np.zeros(0, np.uint16))
    with pytest.raises(spikes.DatasetFormatError, match=re.escape(str(tmp_path / "shd" / "shd_train.h5"))):
        spikes.load_shd(tmp_path / "shd", n_classes=4, download=False)


def test_small_classes_still_give_a_validation_split():
    labels = torch.arange(4).repeat_interleave(3)  # 3 per class: round(0.1 * 3) = 0
    keep, held = stratified_split(labels, 0.1, seed=0)
    assert torch.bincount(labels[held]).tolist() == [1] * 4 and len(keep) == 8
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(12))
    with pytest.raises(ValueError, match=r"dataset\.valid_fraction=0\.1 holds out nothing: 4 training"):
        stratified_split(torch.arange(4), 0.1, seed=0)  # one sample per class
    assert len(stratified_split(torch.arange(4), 0.0, seed=0)[1]) == 0


def test_split_of_full_size_classes_is_unchanged():
    """Classes of the size of SHD's split exactly as ``round(fraction * n)`` says (as published)."""
    labels = torch.randperm(8156, generator=torch.Generator().manual_seed(1)) % 20
    keep, held = stratified_split(labels, 0.1, seed=0)
    gen, expected = torch.Generator().manual_seed(0), []
    for c in range(20):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        expected.append(idx[: int(round(0.1 * len(idx)))])
    assert torch.equal(held, torch.sort(torch.cat(expected)).values) and len(keep) + len(held) == 8156


def test_class_names_of_wrong_count_are_dropped(tmp_path):
    times, units, labels = [np.array([0.1])] * 4, [np.array([1])] * 4, [0, 1, 2, 3]
    path = write_spike_h5(tmp_path / "a.h5", times, units, labels, keys=["zero", "one"])
    with pytest.warns(UserWarning, match="extra/keys") as record:
        _, names = _load_bad(path, n_classes=4)
    assert names == [] and str(path) in str(record[0].message)
    write_spike_h5(path, times, units, labels, keys=["a", "b", "c", "d"])
    assert _load_bad(path, n_classes=4)[1] == ["a", "b", "c", "d"]


# --- audit: bin edges, chunked reads, split files, pinned checksums, batches ------------------


def test_times_on_a_bin_edge_in_float32_open_their_bin(tmp_path):
    """float32 stores 10 ms as 9.99999978 ms: rounded to whole microseconds it opens bin 1 (as it
    would in exact arithmetic), not bin 0. Differences from the first spike are taken after the
    rounding too (80 ms - 70 ms is one bin, although 0.08f - 0.07f < 0.01)."""
    times = [np.array([0.0, 0.01, 0.02, 0.03], np.float32), np.array([0.07, 0.08], np.float32)]
    units = [np.array([0, 5, 10, 0]), np.array([0, 0])]
    path = write_spike_h5(tmp_path / "a.h5", times, units, [0, 1], time_dtype=np.float32)
    binning = spikes._binning(10.0, 5, 15, None, True)
    split, _ = spikes.load_spike_split(path, binning, n_classes=2, cache_dir=None)
    expected = np.zeros((2, 4, 3), np.int64)
    for b, c in ((0, 0), (1, 1), (2, 2), (3, 0)):  # 0, 10, 20, 30 ms, channels 0, 5, 10, 0
        expected[0, b, c] = 1
    expected[1, 0, 0] = expected[1, 1, 0] = 1  # 0 and 10 ms after the first spike
    np.testing.assert_array_equal(split.x.numpy(), expected)
    assert split.lengths.tolist() == [4, 2]


def test_counts_above_255_survive_a_read_in_chunks(tmp_path):
    """A file is binned in chunks of samples, each kept in its narrowest dtype, then stacked:
    a count of 256 in a later chunk (and the longest sample there) must come out exact, with
    every sample in its place."""
    times = [
        np.array([0.0]),
        np.array([0.0, 0.015]),
        np.array([0.0, *[0.005] * 256, 0.045]),  # 256 spikes in bin 0 of channel group 1
        np.array([]),
        np.array([0.0, 0.012]),
    ]
    units = [np.array([0]), np.array([1, 2]), np.array([0, *[7] * 256, 699]), np.array([], np.int64)]
    units.append(np.array([699, 699]))
    path = write_spike_h5(tmp_path / "a.h5", times, units, [0, 1, 2, 3, 4], time_dtype=np.float64)
    binning = spikes._binning(10.0, 5, 700, None, True)
    expected = np.zeros((5, 5, 140), np.int64)
    expected[0, 0, 0] = 1
    expected[1, 0, 0] = expected[1, 1, 0] = 1
    expected[2, 0, 0], expected[2, 0, 1], expected[2, 4, 139] = 1, 256, 1
    expected[4, 0, 139] = expected[4, 1, 139] = 1
    for chunk in (2, 512):  # three chunks (2 + 2 + 1 samples), then one
        data = spikes.read_spike_file(path, binning, chunk=chunk)
        np.testing.assert_array_equal(data["x"].numpy(), expected)
        assert data["lengths"].tolist() == [1, 2, 5, 1, 2] and data["y"].tolist() == [0, 1, 2, 3, 4]


def test_errors_name_the_sample_by_its_index_in_the_file(tmp_path):
    """Files are binned in chunks: a bad spike in a later chunk names its index in the file."""
    times, units = [np.array([0.1])] * 5, [np.array([1])] * 5
    units[3] = np.array([700])
    path = write_spike_h5(tmp_path / "a.h5", times, units, [0, 1, 0, 1, 0], unit_dtype=np.int16)
    binning = spikes._binning(10.0, 5, 700, None, True)
    with pytest.raises(spikes.DatasetFormatError, match="sample 3 has unit 700"):
        spikes.read_spike_file(path, binning, chunk=2)


def test_ssc_splits_come_from_their_own_files(tmp_path):
    """Validation from ssc_valid.h5 and test from ssc_test.h5, not the other way round (with
    files of one size, a swap went unseen)."""
    make_ssc_root(tmp_path, n_train=35, n_valid=35, n_test=70)
    data = spikes.load_ssc(tmp_path, download=False, cache=False)
    assert (len(data.train), len(data.valid), len(data.test)) == (35, 35, 70)
    for split, name in ((data.train, "train"), (data.valid, "valid"), (data.test, "test")):
        with h5py.File(tmp_path / f"ssc_{name}.h5", "r") as f:
            assert split.y.tolist() == f["labels"][()].tolist(), name
            spikes_per_sample = [len(t) for t in f["spikes/times"]]
        assert split.x.sum((1, 2)).tolist() == spikes_per_sample, name


def test_load_shd_verifies_the_pinned_md5(served, tmp_path, monkeypatch):
    """The loaders pass each file's pinned md5 to the download: a mirror serving another file is
    refused, and nothing is left under the file's name."""
    shutil.copy(served / "shd_train.h5.zip", served / "shd_test.h5.zip")
    monkeypatch.setattr(spikes, "MIRRORS", (served.as_uri() + "/",))
    monkeypatch.setattr(spikes, "ZIP_MD5", {"shd_train.h5": "0" * 32, "shd_test.h5": "0" * 32})
    root = tmp_path / "root"
    with pytest.raises(download.MissingDataError, match="md5 mismatch") as info:
        spikes.load_shd(root, n_classes=2, valid_fraction=0.0)
    assert _md5(served / "shd_train.h5.zip") in str(info.value)
    assert _leftovers(root) == []


def test_a_truncated_archive_leaves_no_partial_file(served, tmp_path):
    """Unpacking goes through a temporary file: a .gz cut short (an interrupted copy on the
    mirror) must not leave a half file under the final name, which later runs would take as
    complete."""
    bad = tmp_path / "bad" / "shd_train.h5.gz"
    bad.parent.mkdir()
    good = (served / "shd_train.h5.gz").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    root = tmp_path / "root"
    with pytest.raises(download.MissingDataError, match="not a valid archive"):
        download.ensure_file(root, "shd_train.h5", [bad.as_uri()], None, True)
    assert _leftovers(root) == []


def test_a_zip_holding_two_spike_files_is_refused(served, tmp_path):
    two = tmp_path / "two" / "shd_train.h5.zip"
    two.parent.mkdir()
    with zipfile.ZipFile(two, "w") as zf:
        zf.write(served / "shd_train.h5", "shd_test.h5")
        zf.write(served / "shd_train.h5", "shd_train.h5")
    root = tmp_path / "root"
    with pytest.raises(download.MissingDataError, match="one .h5 file"):
        download.ensure_file(root, "shd_train.h5", [two.as_uri()], None, True)
    assert _leftovers(root) == []


def test_download_false_never_fetches(served, tmp_path):
    """With download=False a missing file is an error even when a URL would serve it."""
    root = tmp_path / "root"
    archive = served / "shd_train.h5.zip"
    with pytest.raises(download.MissingDataError, match="dataset.download=true"):
        download.ensure_file(root, "shd_train.h5", [archive.as_uri()], _md5(archive), False)
    assert _leftovers(root) == []


def test_batches_are_padded_to_their_longest_sample_and_shuffled_by_the_generator():
    from snn_delays.data.base import Split, batches

    lengths = torch.tensor([2, 5, 3, 1, 4])
    x = torch.zeros(5, 6, 2, dtype=torch.uint8)  # padded to 6 steps in the split
    for i, n in enumerate(lengths.tolist()):
        x[i, :n] = 10 * i + torch.arange(1, n + 1)[:, None]  # nonzero on the sample's own steps
    split = Split(x, lengths, torch.arange(5))
    got = list(batches(split, 2))
    assert [tuple(b.shape) for b, _, _ in got] == [(5, 2, 2), (3, 2, 2), (4, 1, 2)]
    for xb, yb, idx in got:
        assert yb.tolist() == idx.tolist()
        for j, i in enumerate(idx.tolist()):
            torch.testing.assert_close(xb[:, j], x[i, : len(xb)].float())  # time-major (T, B, C)

    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([idx for _, _, idx in batches(split, 2, shuffle=True, generator=gen)]).tolist()

    torch.manual_seed(0)
    first = order(1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert order(1) == first and sorted(first) == list(range(5))
    assert any(order(s) != first for s in range(2, 6))
