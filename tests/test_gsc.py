"""GSC: the log-mel front end and the dataset loader, on generated WAVs (no network)."""

from __future__ import annotations

import inspect
import io
import logging
import math
import os
import re
import shutil
import socket
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from gsc_files import WORDS, make_gsc_root, write_wav
from omegaconf import OmegaConf

from snn_delays.data import gsc
from snn_delays.data.audio import (
    FrontEnd,
    front_end_filterbank,
    log_mel,
    mel_filterbank,
    pad_or_cut,
    power_to_db,
    resample,
)
from snn_delays.data.base import progress_bars
from snn_delays.data.download import ArchiveError, ChecksumError, MissingDataError
from snn_delays.data.gsc import GSCDataError, load_gsc

REPO = Path(__file__).resolve().parents[1]


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def tone(freq: float, n: int, rate: int) -> torch.Tensor:
    return torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / rate).float()


# ---------------------------------------------------------------- front end


def test_feature_shape_and_padding():
    feats = log_mel(noise(16000))
    assert feats.shape == (101, 140) and feats.dtype == torch.float32
    assert FrontEnd().n_frames == 101 and FrontEnd().dt_ms == 10.0
    # A batch of clips: a short one is zero-padded, a long one cut, to 1 s.
    batch = torch.stack([pad_or_cut(noise(n, n), 20000) for n in (8000, 16000, 20000)])
    out = log_mel(batch)
    assert out.shape == (3, 101, 140)
    torch.testing.assert_close(out[1], log_mel(noise(16000, 16000)), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out[2], log_mel(noise(20000, 20000)[:16000]), atol=1e-3, rtol=1e-4)
    assert (out[0, -40:] == -100.0).all()  # the padded half is silence: the power floor


def test_default_front_end_has_no_constant_band():
    fb = front_end_filterbank(FrontEnd())
    assert (fb.amax(0) > 0).all(), "every default mel filter must have weight"
    feats = log_mel(noise(16000))
    assert (feats.std(0) > 0.1).all(), "every band of a noise clip must vary over time"


def test_faithful_front_end_has_constant_bands():
    fe = FrontEnd.published()
    assert fe.n_fft == 256 and fe.f_max == 14000.0
    feats = log_mel(noise(16000), fe)
    constant = feats.std(0) == 0
    # Filters wholly above 4 kHz: 53 of 140, "a third"; all at the -100 dB floor.
    assert int(constant.sum()) == 53
    assert constant[-53:].all() and (feats[:, constant] == -100.0).all()
    assert (front_end_filterbank(fe).amax(0)[constant] == 0).all()


def reference_mel_filters(freqs: np.ndarray, f_min: float, f_max: float, n_mels: int) -> np.ndarray:
    """HTK triangles written out band by band with the natural-log form of the mel scale."""

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (math.exp(m / 1127.0) - 1.0)

    step = (mel(f_max) - mel(f_min)) / (n_mels + 1)
    out = np.zeros((len(freqs), n_mels))
    for k in range(n_mels):
        lo, c, hi = (hz(mel(f_min) + (k + i) * step) for i in range(3))
        for j, f in enumerate(freqs):
            if lo < f <= c:
                out[j, k] = (f - lo) / (c - lo)
            elif c < f < hi:
                out[j, k] = (hi - f) / (hi - c)
    return out


@pytest.mark.parametrize(
    "n_fft, rate, n_mels, f_min, f_max",
    [(512, 8000, 140, 50.0, 4000.0), (256, 8000, 140, 50.0, 14000.0), (400, 16000, 40, 0.0, 8000.0)],
)
def test_mel_filterbank_matches_reference(n_fft, rate, n_mels, f_min, f_max):
    n_freqs = n_fft // 2 + 1
    ours = mel_filterbank(n_freqs, rate, n_mels, f_min, f_max)
    assert ours.shape == (n_freqs, n_mels)
    ref = reference_mel_filters(np.arange(n_freqs) * rate / n_fft, f_min, f_max, n_mels)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)


def peak_hz(x: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(x.double() * torch.hann_window(len(x), dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * rate / len(x)


def test_resampler_keeps_pass_band_and_removes_aliases():
    low = resample(tone(1000.0, 16000, 16000), 16000, 8000)
    assert low.shape == (8000,)
    assert peak_hz(low, 8000) == pytest.approx(1000.0, abs=1.0)
    assert low[500:-500].abs().max() == pytest.approx(1.0, abs=0.01)  # unit gain in the pass band
    # 6 kHz is above the new Nyquist (4 kHz): a naive decimation would alias it to 2 kHz.
    high = resample(tone(6000.0, 16000, 16000), 16000, 8000)
    assert high[500:-500].pow(2).mean().sqrt() < 0.01 * math.sqrt(0.5)  # > 40 dB down


def test_resampler_matches_the_direct_formula():
    """The polyphase convolution equals y[j] = sum_i x[i] h(i/f_in - j/f_out) summed directly."""
    for f_in, f_out in [(16000, 8000), (3, 2), (2, 3), (44100, 16000)]:
        x = noise(60, f_in).double()
        y = resample(x, f_in, f_out)
        assert len(y) == math.ceil(60 * f_out / f_in)
        fc = 0.99 * min(f_in, f_out)
        i = np.arange(60)
        for j in range(len(y)):
            u = np.clip(fc * (i / f_in - j / f_out), -6, 6)
            h = (fc / f_in) * np.sinc(u) * np.cos(np.pi * u / 12) ** 2
            assert float(y[j]) == pytest.approx(float(x.numpy() @ h), abs=1e-9)


def test_top_db_floor_is_per_clip():
    power = torch.tensor([[[1.0, 1e-6]], [[1e-2, 1e-9]]])
    db = power_to_db(power, top_db=30.0)
    torch.testing.assert_close(db, torch.tensor([[[0.0, -30.0]], [[-20.0, -50.0]]]))
    assert power_to_db(torch.zeros(1, 1, 1)).item() == pytest.approx(-100.0)


def test_matches_torchaudio_published_pipeline_when_available():
    try:
        import torchaudio.transforms as T
    except Exception:  # absent or broken (it must not be needed)
        pytest.skip("torchaudio not importable")
    x = noise(12000)[None]
    wave = torch.nn.functional.pad(x, (0, 4000))
    wave = T.Resample(16000, 8000)(wave)
    spec = T.Spectrogram(n_fft=256, hop_length=80, power=2)(wave)
    mel = T.MelScale(n_mels=140, sample_rate=8000, f_min=50, f_max=14000, n_stft=129)(spec)
    ref = T.AmplitudeToDB()(mel).squeeze(0).t()
    torch.testing.assert_close(log_mel(x, FrontEnd.published()), ref, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def gsc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsc")
    return root, make_gsc_root(root, n_per_word=4)


@pytest.fixture
def fresh_root(tmp_path):
    return tmp_path, make_gsc_root(tmp_path, n_per_word=3)


def test_splits_follow_the_list_files(gsc_root):
    root, files = gsc_root
    data = load_gsc(root=root, download=False, cache=False)
    assert (data.name, data.n_inputs, data.n_classes, data.dt_ms) == ("gsc", 140, 35, 10.0)
    assert data.class_names == sorted(WORDS) == list(gsc.CLASSES)
    assert (len(data.train), len(data.valid), len(data.test)) == (2 * 35, 35, 35)
    split = gsc.split_files(files.data_dir)
    assert split == {"train": sorted(files.train), "valid": sorted(files.valid), "test": sorted(files.test)}
    names = [set(v) for v in split.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert not any("_background_noise_" in f for v in split.values() for f in v)
    for part, rel in ((data.train, split["train"]), (data.test, split["test"])):
        assert part.x.shape == (len(rel), 101, 140) and part.x.dtype == torch.float32
        assert (part.lengths == 101).all()
        assert [data.class_names[i] for i in part.y] == [f.split("/")[0] for f in rel]
    clip, _ = sf.read(files.data_dir / split["test"][3], dtype="float32")
    torch.testing.assert_close(data.test.x[3], log_mel(torch.from_numpy(clip)), atol=1e-3, rtol=1e-4)


def test_features_are_cached_and_reused(fresh_root, monkeypatch):
    root, _ = fresh_root
    first = load_gsc(root=root, download=False)
    cached = list((root / "cache").glob("gsc_*.pt"))
    assert len(cached) == 1 and not list((root / "cache").glob("*.part"))

    def fail(*args, **kwargs):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(gsc, "compute_features", fail)
    again = load_gsc(root=root, download=False)
    for a, b in ((first.train, again.train), (first.test, again.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    with pytest.raises(AssertionError, match="recomputed"):  # other parameters, other key
        load_gsc(root=root, download=False, faithful=True)
    monkeypatch.undo()
    load_gsc(root=root, download=False, n_mels=40, cache=False)
    assert len(list((root / "cache").glob("gsc_*.pt"))) == 1


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _bad_missing_listed(data_dir: Path) -> str:
    _append(data_dir / "testing_list.txt", "yes/deadbeef_nohash_9.wav")
    return "yes/deadbeef_nohash_9.wav"


def _bad_rate(data_dir: Path) -> str:
    path = data_dir / "cat" / "0badrate_nohash_0.wav"
    write_wav(path, np.zeros(8000, np.float32), 8000)
    return str(path)


def _bad_empty(data_dir: Path) -> str:
    path = data_dir / "dog" / "0empty_nohash_0.wav"
    write_wav(path, np.zeros(0, np.float32))
    return str(path)


def _bad_unreadable(data_dir: Path) -> str:
    path = data_dir / "go" / "0garbage_nohash_0.wav"
    path.write_bytes(b"RIFF\x00\x00not a wav at all")
    return str(path)


def _bad_label(data_dir: Path) -> str:
    _append(data_dir / "validation_list.txt", "unknown/abc_nohash_0.wav")
    return "validation_list.txt"


def _bad_truncated(data_dir: Path) -> str:
    """The header declares 16000 frames; half the bytes are there (an interrupted copy)."""
    path = data_dir / "bed" / "0truncated_nohash_0.wav"
    write_wav(path, 0.1 * np.ones(16000, np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return str(path)


def _bad_nan(data_dir: Path) -> str:
    path = data_dir / "bird" / "0nan_nohash_0.wav"
    sf.write(path, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    return str(path)


def _bad_list_encoding(data_dir: Path) -> str:
    with open(data_dir / "testing_list.txt", "ab") as f:
        f.write(b"yes/caf\xe9_nohash_0.wav\n")  # latin-1, not UTF-8
    return "testing_list.txt"


def _bad_empty_split(data_dir: Path) -> str:
    (data_dir / "testing_list.txt").write_text("")
    return "testing_list.txt"


@pytest.mark.parametrize(
    "corrupt",
    [
        _bad_missing_listed,
        _bad_rate,
        _bad_empty,
        _bad_unreadable,
        _bad_label,
        _bad_truncated,
        _bad_nan,
        _bad_list_encoding,
        _bad_empty_split,
    ],
    ids=lambda f: f.__name__,
)
def test_bad_input_names_the_file(fresh_root, corrupt):
    root, files = fresh_root
    name = corrupt(files.data_dir)
    with pytest.raises(GSCDataError, match=re.escape(name)):
        load_gsc(root=root, download=False, cache=False)


def test_read_clip_refuses_truncated_and_non_finite_but_reads_extra_chunks(tmp_path):
    samples = 0.25 * np.ones(16000, np.float32)
    # A float WAV has extra chunks (fact, PEAK) before its data; a LIST chunk of odd length is
    # padded: neither may pass for a truncation.
    for subtype in ("PCM_16", "FLOAT"):
        path = tmp_path / f"{subtype}.wav"
        with sf.SoundFile(path, "w", 16000, 1, subtype=subtype) as f:
            f.title = "odd"
            f.write(samples)
        torch.testing.assert_close(gsc.read_clip(path), torch.from_numpy(samples), atol=1e-4, rtol=0)
        raw = path.read_bytes()
        path.write_bytes(raw[:-2])  # one frame (or half of one) missing
        with pytest.raises(GSCDataError, match="truncated"):
            gsc.read_clip(path)
    path = tmp_path / "inf.wav"
    sf.write(path, np.where(np.arange(16000) == 7, np.inf, 0).astype(np.float32), 16000, subtype="FLOAT")
    with pytest.raises(GSCDataError, match="non-finite"):
        gsc.read_clip(path)


def test_uppercase_wav_is_a_clip_and_foreign_folders_are_reported(fresh_root, caplog):
    _, files = fresh_root
    data_dir = files.data_dir
    old = data_dir / files.train[0]
    old.rename(old.with_suffix(".WAV"))
    write_wav(data_dir / "hello" / "a_nohash_0.wav", np.zeros(16000, np.float32))
    (data_dir / "misc").mkdir()
    with caplog.at_level(logging.INFO, logger=gsc.__name__):
        split = gsc.split_files(data_dir)
    assert f"{old.parent.name}/{old.stem}.WAV" in split["train"]
    assert len(split["train"]) == len(files.train)
    reports = [r.getMessage() for r in caplog.records if "hello" in r.getMessage()]
    assert len(reports) == 1 and "misc" in reports[0] and "_background_noise_" not in reports[0]


# ---------------------------------------------------------------- feature cache


def test_a_replaced_wav_is_not_served_stale_features(fresh_root):
    root, files = fresh_root
    first = load_gsc(root=root, download=False)
    rel = gsc.split_files(files.data_dir)["test"][0]
    path = files.data_dir / rel
    before = path.stat()
    n = sf.info(path).frames
    write_wav(path, 0.3 * noise(n, 5).numpy())  # same length, so the same size: only mtime tells
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == before.st_size
    again = load_gsc(root=root, download=False)
    fresh = log_mel(gsc.read_clip(path))
    torch.testing.assert_close(again.test.x[0], fresh, atol=1e-3, rtol=1e-4)
    assert not torch.equal(again.test.x[0], first.test.x[0])


def test_a_bad_cache_is_recomputed_with_a_warning(fresh_root, caplog):
    root, files = fresh_root
    first = load_gsc(root=root, download=False)
    (cached,) = (root / "cache").glob("gsc_*.pt")
    sizes = {"train": len(files.train), "valid": len(files.valid), "test": len(files.test)}
    bad_contents = {
        "refused by weights_only": {"train": np.zeros(3)},  # pickle.UnpicklingError
        "missing splits": {"train": torch.zeros(3)},
        "wrong shapes": {k: torch.zeros(n, 101, 40) for k, n in sizes.items()},
        "not a dict": torch.zeros(3),
    }
    for what, content in bad_contents.items():
        torch.save(content, cached)
        caplog.clear()
        again = load_gsc(root=root, download=False)
        assert str(cached) in caplog.text and "recomputing" in caplog.text, what
        for a, b in ((first.train, again.train), (first.test, again.test)):
            assert torch.equal(a.x, b.x), what
    assert not list((root / "cache").glob("*.part"))


def _save_fails(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"half a cache")  # what a full disk leaves
    raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")


@pytest.mark.parametrize("failure", ["disk full", "cache is a file"])
def test_a_cache_that_cannot_be_written_is_a_warning(fresh_root, monkeypatch, caplog, failure):
    root, _ = fresh_root
    if failure == "disk full":
        monkeypatch.setattr(gsc.torch, "save", _save_fails)
    else:
        (root / "cache").write_text("not a folder")
    data = load_gsc(root=root, download=False)
    assert (len(data.train), len(data.valid), len(data.test)) == (35, 35, 35)
    assert "continuing without it" in caplog.text and str(root / "cache" / "gsc_") in caplog.text
    if failure == "disk full":
        assert [p.name for p in (root / "cache").iterdir()] == [".lock"]  # no .part left behind
    else:
        assert (root / "cache").read_text() == "not a folder"


def test_missing_dataset_without_download(tmp_path):
    with pytest.raises(MissingDataError, match="speech_commands_v0.02"):
        load_gsc(root=tmp_path, download=False)


def test_valid_fraction_is_refused(gsc_root):
    with pytest.raises(ValueError, match="valid_fraction"):
        load_gsc(root=gsc_root[0], download=False, valid_fraction=0.1)


@pytest.mark.parametrize("top_db", [-80.0, 0.0, float("nan")])
def test_a_top_db_that_is_not_positive_is_refused(gsc_root, top_db):
    """<= 0 would floor every value at the clip's peak (constant features), NaN give NaNs."""
    with pytest.raises(ValueError, match="top_db"):
        load_gsc(root=gsc_root[0], download=False, cache=False, top_db=top_db)


@pytest.fixture
def archive(tmp_path):
    """A flat .tar.gz like the official one, built from a generated folder."""
    src = make_gsc_root(tmp_path / "src", n_per_word=3).data_dir
    path = tmp_path / "speech_commands_v0.02.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for item in sorted(src.iterdir()):
            tar.add(item, arcname=f"./{item.name}")
    return path


def test_download_verify_and_extract(tmp_path, archive, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setattr(gsc, "ARCHIVE_URL", archive.as_uri())
    monkeypatch.setattr(gsc, "ARCHIVE_SHA256", "0" * 64)
    with pytest.raises(ChecksumError, match="sha256"):
        load_gsc(root=root)
    assert not (root / gsc.FOLDER).exists() and not list(root.glob("*.tar.gz"))

    monkeypatch.setattr(gsc, "ARCHIVE_SHA256", gsc.sha256sum(archive))
    # Leftovers of an interrupted extraction are discarded, never taken as complete.
    stale = root / (gsc.FOLDER + ".extracting")
    (stale / "yes").mkdir(parents=True)
    (stale / "validation_list.txt").write_text("")
    data = load_gsc(root=root, cache=False)
    assert (len(data.train), len(data.valid), len(data.test)) == (35, 35, 35)
    assert (root / gsc.FOLDER / gsc.MARKER).is_file() and not stale.exists()
    assert not (root / archive.name).exists()  # deleted once extracted


@pytest.mark.parametrize("shown", [True, False])
def test_data_bars_follow_progress_bars(tmp_path, archive, monkeypatch, capsys, caplog, shown):
    """The download, extraction and feature bars drew on stderr with ``trainer.progress=false``
    and on every torchrun rank; ``progress_bars(False)`` hides them, and each stage still says
    what it does in a log line."""
    monkeypatch.setattr(gsc, "ARCHIVE_URL", archive.as_uri())
    monkeypatch.setattr(gsc, "ARCHIVE_SHA256", gsc.sha256sum(archive))
    with caplog.at_level(logging.INFO, logger="snn_delays"), progress_bars(shown):
        load_gsc(root=tmp_path / "root", cache=False)
    err = capsys.readouterr().err
    for bar in (f"{archive.name}:", f"extracting {archive.name}:", "log-mel train:", "log-mel test:"):
        assert (bar in err) is shown, (bar, err)
    assert shown or err == ""
    lines = [r.getMessage() for r in caplog.records]
    for stage in (f"downloading {archive.name}", f"extracting {archive.name}", "computing the log-mel"):
        assert any(m.startswith(stage) for m in lines), (stage, lines)


def test_a_filesystem_refusing_locks_is_prepared_without_one(tmp_path, archive, monkeypatch):
    """A cluster filesystem mounted without locks (Lustre without ``flock``, some NFS) refuses
    ``flock`` with ENOSYS or ENOLCK: the first GSC load failed with that error. It now goes on
    without the lock (each rank does the work itself, as alone)."""
    import errno
    import fcntl

    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.setattr(gsc, "ARCHIVE_URL", archive.as_uri())
    monkeypatch.setattr(gsc, "ARCHIVE_SHA256", gsc.sha256sum(archive))
    data = load_gsc(root=tmp_path / "root")
    assert len(data.train) == 35 and len(list((tmp_path / "root" / "cache").glob("gsc_*.pt"))) == 1


def test_existing_folder_is_used_without_download(gsc_root, monkeypatch):
    monkeypatch.setattr(gsc, "download_url", lambda *a, **k: pytest.fail("tried to download"))
    load_gsc(root=gsc_root[0], download=True, cache=False)


def test_root_with_tilde_is_expanded(tmp_path, monkeypatch):
    make_gsc_root(tmp_path / "home" / "gsc", n_per_word=3)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gsc, "download_url", lambda *a, **k: pytest.fail("tried to download"))
    data = load_gsc(root="~/gsc", download=True)
    assert len(data.test) == 35
    assert (tmp_path / "home" / "gsc" / "cache").is_dir() and not (tmp_path / "~").exists()


def test_download_without_network_says_what_to_do(tmp_path, monkeypatch):
    def offline(url, dest, md5=None):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(gsc, "download_url", offline)
    with pytest.raises(MissingDataError) as info:
        load_gsc(root=tmp_path / "root")
    message = str(info.value)
    for part in (str(tmp_path / "root" / gsc.FOLDER), gsc.ARCHIVE_URL, "dataset.download", "name resolution"):
        assert part in message
    assert "extract it into that folder" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_a_refused_archive_member_leaves_no_scratch_folder(tmp_path, monkeypatch):
    src = make_gsc_root(tmp_path / "src", n_per_word=3).data_dir
    bad = tmp_path / "speech_commands_v0.02.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for item in sorted(src.iterdir()):
            tar.add(item, arcname=item.name)
        member = tarfile.TarInfo("../evil.txt")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    monkeypatch.setattr(gsc, "ARCHIVE_URL", bad.as_uri())
    monkeypatch.setattr(gsc, "ARCHIVE_SHA256", gsc.sha256sum(bad))
    root = tmp_path / "root"
    with pytest.raises(ArchiveError, match="outside"):
        load_gsc(root=root)
    assert not (root / (gsc.FOLDER + ".extracting")).exists() and not (root / gsc.FOLDER).exists()
    assert not (root / "evil.txt").exists()


def test_archive_without_lists_is_rejected(tmp_path, monkeypatch):
    bad = tmp_path / "bad.tar.gz"
    (tmp_path / "x.txt").write_text("hello")
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(tmp_path / "x.txt", arcname="x.txt")
    monkeypatch.setattr(gsc, "ARCHIVE_URL", bad.as_uri())
    monkeypatch.setattr(gsc, "ARCHIVE_SHA256", gsc.sha256sum(bad))
    with pytest.raises(ValueError, match="validation_list.txt"):
        load_gsc(root=tmp_path / "root")
    assert not (tmp_path / "root" / gsc.FOLDER).exists()


def test_config_keys_are_the_loader_arguments(gsc_root):
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "gsc.yaml")
    assert cfg._target_ == "snn_delays.data.gsc.load_gsc"
    params = inspect.signature(load_gsc).parameters
    keys = set(cfg) - {"_target_"}
    assert keys == set(params)
    for key in keys:
        assert cfg[key] == params[key].default, key
    from hydra.utils import instantiate

    cfg.root, cfg.download, cfg.cache = str(gsc_root[0]), False, False
    assert instantiate(cfg).n_inputs == 140


def test_fixture_writes_the_requested_layout(tmp_path):
    files = make_gsc_root(tmp_path, words=["yes", "no"], n_per_word=5, sample_rate=8000, seed=3)
    assert len(files.train) == 6 and len(files.valid) == len(files.test) == 2
    info = sf.info(files.data_dir / files.train[0])
    assert info.samplerate == 8000 and 0.5 <= info.duration <= 1.2
    assert (files.data_dir / "_background_noise_").is_dir()
    shutil.rmtree(files.data_dir)


def _prepare_gsc_in_a_process(root: str, url: str, sha: str, out) -> None:
    """A torchrun rank's first GSC load: download and extract (each member slowed, so that two
    processes overlap)."""
    import time as _time

    from snn_delays.data import gsc as g

    g.ARCHIVE_URL, g.ARCHIVE_SHA256 = url, sha
    members = g._safe_members

    def slow(tar, archive):
        for member in members(tar, archive):
            _time.sleep(0.005)
            yield member

    g._safe_members = slow
    try:
        out.put(str(g.ensure_extracted(Path(root), True)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        out.put(f"{type(err).__name__}: {err}")


def test_two_processes_preparing_gsc_at_once_wait_for_each_other(tmp_path, archive):
    """torchrun's ranks all reach the first GSC download at once. Both extracted into one scratch
    folder, and the second wiped the first's work (and then deleted its archive): now one
    prepares it while the other waits, then finds the folder."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    root, out = tmp_path / "root", ctx.Queue()
    args = (str(root), archive.as_uri(), gsc.sha256sum(archive), out)
    procs = [ctx.Process(target=_prepare_gsc_in_a_process, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [str(root / gsc.FOLDER)] * 2
    assert (root / gsc.FOLDER / gsc.MARKER).is_file() and not (root / (gsc.FOLDER + ".extracting")).exists()
    assert len(load_gsc(root=root, download=False, cache=False).train) == 35


# ---------------------------------------------------------------- audit: front end and lists


def reference_log_mel(x: np.ndarray, fe: FrontEnd) -> np.ndarray:
    """The default front end on a clip already at ``fe.target_rate``, written out in numpy:
    reflect-padded centred frames, a periodic Hann window of ``win_length`` centred in
    ``n_fft``, power ``|rfft|^2``, HTK mel triangles, then ``10 log10(max(., 1e-10))``."""
    half = fe.n_fft // 2
    padded = np.pad(np.asarray(x, np.float64), half, mode="reflect")
    n = np.arange(fe.win_length)
    window = np.zeros(fe.n_fft)
    left = (fe.n_fft - fe.win_length) // 2
    window[left : left + fe.win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * n / fe.win_length)
    starts = range(0, len(x) + 1, fe.hop_length)
    frames = np.stack([padded[s : s + fe.n_fft] * window for s in starts])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.arange(half + 1) * fe.target_rate / fe.n_fft
    mel = power @ reference_mel_filters(freqs, fe.f_min, fe.target_rate / 2, fe.n_mels)
    return 10.0 * np.log10(np.maximum(mel, 1e-10))


def test_log_mel_matches_a_numpy_reference():
    """Window, padding and power of the spectrogram, checked without torchaudio (whose test
    is skipped where it is not importable): the default front end, resampling left out."""
    fe = FrontEnd(sample_rate=8000, target_rate=8000)
    x = 0.1 * noise(8000, 3)
    ours = log_mel(x, fe)
    assert ours.shape == (101, 140)
    np.testing.assert_allclose(ours.numpy(), reference_log_mel(x.numpy(), fe), atol=1e-3, rtol=0)


@pytest.mark.parametrize("fe", [FrontEnd(), FrontEnd.published()], ids=["default", "faithful"])
def test_log_mel_band_limits_before_it_decimates(fe):
    """A 6 kHz tone is above the 4 kHz Nyquist frequency of 8 kHz: the front end must filter it
    out, not fold it onto 2 kHz (what keeping every other sample does)."""
    above = log_mel(tone(6000.0, 16000, 16000), fe)[10:-10]  # away from the clip's edges
    inside = log_mel(tone(2000.0, 16000, 16000), fe)[10:-10]
    assert float(above.max()) < float(inside.max()) - 40.0


def test_a_split_without_some_word_keeps_the_word_labels(fresh_root):
    """Labels are the word's index among the 35, whatever words a split happens to hold."""
    root, files = fresh_root
    valid = [f for f in files.valid if not f.startswith("backward/")]
    (files.data_dir / "validation_list.txt").write_text("".join(f"{r}\n" for r in valid))
    data = load_gsc(root=root, download=False, cache=False)
    assert len(data.valid) == 34 and len(data.train) == 36
    assert data.valid.y.tolist() == [WORDS.index(f.split("/")[0]) for f in sorted(valid)]
    assert data.valid.y.min() == 1  # "backward" (label 0) is absent, nothing shifted onto it


def test_a_clip_in_both_lists_is_refused(fresh_root):
    """A clip in validation_list.txt and testing_list.txt would score the model on a clip it was
    selected on: an error naming it."""
    _, files = fresh_root
    _append(files.data_dir / "testing_list.txt", files.valid[3])
    with pytest.raises(GSCDataError, match=re.escape(files.valid[3])):
        gsc.split_files(files.data_dir)


def test_an_archive_already_in_the_root_is_verified_before_use(tmp_path, archive, monkeypatch):
    """An archive under the download's name (left there, or another version) is used only if its
    sha256 is the pinned one; otherwise the download replaces it."""
    root = tmp_path / "root"
    root.mkdir()
    (root / archive.name).write_bytes(b"not the speech commands archive")
    monkeypatch.setattr(gsc, "ARCHIVE_URL", archive.as_uri())
    monkeypatch.setattr(gsc, "ARCHIVE_SHA256", gsc.sha256sum(archive))
    data_dir = gsc.ensure_extracted(root, True)
    assert (data_dir / gsc.MARKER).is_file() and not (root / archive.name).exists()
    assert sum(len(v) for v in gsc.split_files(data_dir).values()) == 3 * 35


def test_files_left_by_an_interrupted_extraction_do_not_enter_the_dataset(tmp_path, archive, monkeypatch):
    root = tmp_path / "root"
    stale = root / (gsc.FOLDER + ".extracting") / "yes" / "0stale_nohash_0.wav"
    write_wav(stale, np.zeros(16000, np.float32))
    monkeypatch.setattr(gsc, "ARCHIVE_URL", archive.as_uri())
    monkeypatch.setattr(gsc, "ARCHIVE_SHA256", gsc.sha256sum(archive))
    data_dir = gsc.ensure_extracted(root, True)
    assert not (data_dir / "yes" / stale.name).exists()
    assert "yes/" + stale.name not in gsc.split_files(data_dir)["train"]
