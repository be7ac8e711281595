"""Google Speech Commands v0.02 (35 words) as log-mel features.

Layout (as in the archive)::

    <root>/speech_commands_v0.02/<word>/<speaker>_nohash_<n>.wav    16 kHz mono WAV, <= 1 s
    <root>/speech_commands_v0.02/validation_list.txt                 lines like right/abc_nohash_0.wav
    <root>/speech_commands_v0.02/testing_list.txt
    <root>/speech_commands_v0.02/_background_noise_/                 not a class, never read

Validation and test clips are those the two list files name; training is every other WAV in
the 35 word folders. Features (see ``snn_delays.data.audio``) are computed once and cached under
``<root>/cache/``, keyed by the front-end parameters, the three file lists and each file's size
and modification time (so a replaced WAV is never served stale features).

Download: the archive (2.3 GB) is fetched only when the extracted folder is absent (a folder
you bring yourself is used as it is). Its sha256 is checked against the value torchaudio pins
for the same URL; it is unpacked into a temporary sibling folder, checked for the two list
files, given a completion marker and only then renamed into place, so an interrupted
extraction is never taken for a complete one (the next run starts the extraction afresh). The
archive is deleted once extracted.

Every WAV must be 16 kHz mono: a clip at another rate is an error, not resampled, since GSC
v0.02 holds nothing else and a stray rate means a foreign or damaged file. Bad input raises
``GSCDataError`` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from snn_delays.data.audio import FrontEnd, log_mel, pad_or_cut
from snn_delays.data.base import (
    DataBundle,
    Split,
    build_once,
    one_process_at_a_time,
    progress_bar,
    save_cache,
)
from snn_delays.data.download import ArchiveError, ChecksumError, MissingDataError, download_url

log = logging.getLogger(__name__)

CLASSES = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward",
    "four", "go", "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one",
    "right", "seven", "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow",
    "yes", "zero",
)  # fmt: skip
FOLDER = "speech_commands_v0.02"
VALID_LIST, TEST_LIST = "validation_list.txt", "testing_list.txt"
ARCHIVE_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
# torchaudio's pinned sha256 for this URL (torchaudio.datasets.speechcommands._CHECKSUMS).
ARCHIVE_SHA256 = "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58"
MARKER = ".extracted"
SAMPLE_RATE = 16000
CACHE_FORMAT = 1  # bump when the cached content changes for the same parameters


class GSCDataError(ValueError):
    """A file of the dataset is missing, unreadable or not what GSC holds; names the file."""


def load_gsc(
    root: str | Path = "datasets/gsc",
    n_mels: int = 140,
    faithful: bool = False,
    top_db: float | None = None,
    valid_fraction: float | None = None,
    download: bool = True,
    cache: bool = True,
    seed: int = 0,
    feature_batch_size: int = 256,
) -> DataBundle:
    """Load GSC-35 as a ``DataBundle`` of ``(N, n_frames, n_mels)`` float32 log-mel features.

    ``faithful`` reproduces the published front end (mel upper edge above Nyquist: about a
    third of the bands constant); the default is the corrected one (``audio`` module).
    ``valid_fraction`` must stay ``None``: GSC has an official validation list. ``seed`` is
    accepted for a uniform loader signature; nothing here is random.
    """
    if valid_fraction is not None:
        raise ValueError(
            f"dataset.valid_fraction={valid_fraction}: GSC uses its official validation_list.txt; "
            "leave it null"
        )
    del seed
    # feature_batch_size is not in the cache key (it changes memory, not results): a value < 1
    # must not compute (and cache) empty features; n_mels < 1 would give no inputs at all.
    if feature_batch_size < 1 or n_mels < 1:
        raise ValueError(
            f"need dataset.n_mels >= 1 and dataset.feature_batch_size >= 1, got {n_mels} and "
            f"{feature_batch_size}"
        )
    # top_db <= 0 floors every value at the clip's peak (constant features), NaN makes them NaN:
    # either would be computed and cached without a word.
    if top_db is not None and not top_db > 0:
        raise ValueError(
            f"dataset.top_db must be a number > 0 (dB below each clip's peak) or null, got {top_db}"
        )
    fe = FrontEnd.published(n_mels, top_db) if faithful else FrontEnd(n_mels=n_mels, top_db=top_db)
    root = Path(root).expanduser()
    data_dir = ensure_extracted(root, download)
    files = split_files(data_dir)
    splits = _cached_features(root / "cache", data_dir, files, fe, cache, feature_batch_size)
    return DataBundle(
        "gsc",
        *(splits[name] for name in ("train", "valid", "test")),
        n_inputs=n_mels,
        n_classes=len(CLASSES),
        dt_ms=fe.dt_ms,
        class_names=list(CLASSES),
    )


# ---------------------------------------------------------------- download and extraction


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_extracted(root: Path, download: bool) -> Path:
    """Return ``root/speech_commands_v0.02``, downloading and extracting it when absent.

    ``MissingDataError`` (naming the folder, the URL and the manual steps) when it is absent and
    ``download`` is false or the download fails (no network, say).
    """
    data_dir = root / FOLDER
    if data_dir.is_dir():
        return data_dir
    if not download:
        raise MissingDataError(
            f"GSC not found: no folder {data_dir}. Download {ARCHIVE_URL}, extract it into that "
            "folder, or allow the download with dataset.download=true."
        )
    with one_process_at_a_time(root / f".{FOLDER}.lock", "preparing GSC"):
        if data_dir.is_dir():  # another process (a torchrun rank) made it while this one waited
            return data_dir
        return _download_and_extract(root, data_dir)


def _download_and_extract(root: Path, data_dir: Path) -> Path:
    archive = root / ARCHIVE_URL.rsplit("/", 1)[-1]
    # An archive left by an interrupted extraction is reused only if it verifies.
    if not (archive.is_file() and sha256sum(archive) == ARCHIVE_SHA256):
        try:
            download_url(ARCHIVE_URL, archive, md5=None)
        except OSError as err:  # urllib.error.URLError (no network, HTTP error) is an OSError
            raise MissingDataError(
                f"GSC not found: no folder {data_dir}, and the download (dataset.download=true) of "
                f"{ARCHIVE_URL} failed: {err}. Download it yourself and extract it into that folder "
                "(or put the archive in its parent folder), then run again."
            ) from err
        got = sha256sum(archive)
        if got != ARCHIVE_SHA256:
            archive.unlink()
            raise ChecksumError(
                f"sha256 mismatch for {archive.name} from {ARCHIVE_URL}: expected {ARCHIVE_SHA256}, "
                f"got {got} (deleted; try again)"
            )
    _extract(archive, data_dir)
    archive.unlink()
    return data_dir


def _safe_members(tar: tarfile.TarFile, archive: Path):
    """Plain files and folders inside the target only (links and devices are skipped)."""
    for member in tar:
        if member.name.startswith("/") or ".." in Path(member.name).parts:
            raise ArchiveError(f"{archive.name}: refusing to extract {member.name!r} outside the folder")
        if member.isfile() or member.isdir():
            yield member


def _extract(archive: Path, data_dir: Path) -> None:
    """Unpack into ``<data_dir>.extracting``, check, mark complete, rename to ``data_dir``."""
    tmp = data_dir.with_name(data_dir.name + ".extracting")
    if tmp.exists():  # left by an interrupted run: never trusted, start again
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:  # on any failure (a refused member included) the scratch folder goes
        try:
            with tarfile.open(archive) as tar:
                members = _safe_members(tar, archive)
                log.info("extracting %s into %s", archive.name, data_dir)
                for member in progress_bar(members, desc=f"extracting {archive.name}", unit="file"):
                    tar.extract(member, tmp, **kwargs)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise ArchiveError(f"{archive} could not be extracted: {err}") from err
        # The official archive is flat; accept one top-level folder holding the lists as well.
        content = tmp
        subdirs = [p for p in tmp.iterdir() if p.is_dir()]
        if not (tmp / VALID_LIST).exists() and len(subdirs) == 1:
            content = subdirs[0]
        missing = [name for name in (VALID_LIST, TEST_LIST) if not (content / name).is_file()]
        if missing:
            raise ArchiveError(f"{archive} extracted without {', '.join(missing)}: not a GSC archive")
        (content / MARKER).write_text(f"{archive.name} sha256 {ARCHIVE_SHA256}\n")
        os.replace(content, data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if content != tmp:
        shutil.rmtree(tmp)


# ---------------------------------------------------------------- file lists


def _read_list(data_dir: Path, name: str, available: set[str]) -> list[str]:
    path = data_dir / name
    if not path.is_file():
        raise GSCDataError(f"GSC list file missing: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw[: err.start].count(b"\n") + 1
        raise GSCDataError(
            f"{path}, line {lineno}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.strip().replace("\\", "/").removeprefix("./")
        if not entry:
            continue
        if entry.split("/")[0] not in CLASSES or entry.count("/") != 1:
            raise GSCDataError(f"{path}, line {lineno}: {entry!r} is not <one of the 35 words>/<file>.wav")
        if entry not in available:
            raise GSCDataError(f"{path}, line {lineno}: names {data_dir / entry}, which does not exist")
        entries.append(entry)
    return entries


def split_files(data_dir: Path) -> dict[str, list[str]]:
    """Relative WAV paths per split (``train``, ``valid``, ``test``), each sorted, none empty.

    A clip is a file ending in ``.wav`` in any case; folders other than the 35 words are not
    read (one warning lists them, ``_background_noise_`` aside).
    """
    available: list[str] = []
    for word in CLASSES:
        folder = data_dir / word
        if not folder.is_dir():
            raise GSCDataError(f"GSC word folder missing: {folder} (an incomplete copy of the dataset?)")
        names = (e.name for e in os.scandir(folder) if e.name.lower().endswith(".wav") and e.is_file())
        available += [f"{word}/{name}" for name in names]
    ignored = sorted(
        e.name
        for e in os.scandir(data_dir)
        if e.is_dir() and e.name not in CLASSES and e.name != "_background_noise_"
    )
    if ignored:
        log.warning(
            "GSC: ignoring folders of %s that are none of the 35 words: %s", data_dir, ", ".join(ignored)
        )
    avail = set(available)
    valid = _read_list(data_dir, VALID_LIST, avail)
    test = _read_list(data_dir, TEST_LIST, avail)
    both = set(valid) & set(test)
    if both:
        raise GSCDataError(f"{data_dir / VALID_LIST} and {TEST_LIST} both list {data_dir / min(both)}")
    held = set(valid) | set(test)
    train = [f for f in available if f not in held]
    for name, listed in ((VALID_LIST, valid), (TEST_LIST, test)):
        if not listed:
            raise GSCDataError(f"{data_dir / name} lists no clip: its split would be empty")
    if not train:
        raise GSCDataError(
            f"no training clips in {data_dir}: every WAV is listed in {VALID_LIST} or {TEST_LIST}"
        )
    return {"train": sorted(train), "valid": sorted(set(valid)), "test": sorted(set(test))}


# ---------------------------------------------------------------- features


def _missing_data_bytes(raw: bytes) -> int:
    """How many bytes of the RIFF ``data`` chunk its header declares but the file lacks.

    0 when complete, or when the header is not a plain RIFF/WAVE one (left to soundfile) or
    declares an unknown size (0 or 0xFFFFFFFF, as streaming writers do).
    """
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return 0
    offset = 12
    while offset + 8 <= len(raw):
        chunk, size = raw[offset : offset + 4], int.from_bytes(raw[offset + 4 : offset + 8], "little")
        if chunk == b"data":
            return 0 if size in (0, 0xFFFFFFFF) else max(0, size - (len(raw) - offset - 8))
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    return 0


def read_clip(path: Path) -> Tensor:
    """A 16 kHz mono WAV as a float32 tensor in [-1, 1]; ``GSCDataError`` naming it otherwise.

    A truncated file (fewer sample bytes than its header declares) and non-finite samples (a
    float WAV holding NaN or inf) are errors, not a shorter clip or NaN features.
    """
    try:
        raw = path.read_bytes()
        data, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise GSCDataError(f"cannot read WAV {path}: {err}") from err
    missing = _missing_data_bytes(raw)
    if missing:
        raise GSCDataError(
            f"{path} is truncated: its header declares {missing} more bytes of samples than the file "
            "holds (an interrupted copy or download?)"
        )
    if rate != SAMPLE_RATE:
        raise GSCDataError(f"{path} is sampled at {rate} Hz; GSC clips must be {SAMPLE_RATE} Hz")
    if data.shape[1] != 1:
        raise GSCDataError(f"{path} has {data.shape[1]} channels; GSC clips must be mono")
    if data.shape[0] == 0:
        raise GSCDataError(f"{path} is empty (no samples)")
    if not np.isfinite(data).all():
        raise GSCDataError(f"{path} holds non-finite samples (NaN or inf)")
    return torch.from_numpy(np.ascontiguousarray(data[:, 0]))


def compute_features(
    data_dir: Path, files: list[str], fe: FrontEnd, batch_size: int = 256, desc: str = "gsc"
) -> Tensor:
    """Features ``(len(files), n_frames, n_mels)`` of the listed clips, in batches."""
    x = torch.empty(len(files), fe.n_frames, fe.n_mels)
    log.info("computing the log-mel features of %d %s clips", len(files), desc)
    with progress_bar(total=len(files), desc=f"log-mel {desc}", unit="clip") as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            waves = torch.stack([pad_or_cut(read_clip(data_dir / f), fe.clip_samples) for f in chunk])
            x[start : start + len(chunk)] = log_mel(waves, fe)
            bar.update(len(chunk))
    return x


def _labels(files: list[str]) -> Tensor:
    index = {word: i for i, word in enumerate(CLASSES)}
    return torch.tensor([index[f.split("/")[0]] for f in files], dtype=torch.long)


def _file_stamps(data_dir: Path, files: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """``[st_size, st_mtime_ns]`` of every listed file (one ``stat`` each)."""
    stamps: dict[str, list[list[int]]] = {}
    for name, rels in files.items():
        stamps[name] = []
        for rel in rels:
            try:
                st = os.stat(data_dir / rel)
            except OSError as err:
                raise GSCDataError(f"cannot read WAV {data_dir / rel}: {err}") from err
            stamps[name].append([st.st_size, st.st_mtime_ns])
    return stamps


def cache_key(fe: FrontEnd, files: dict[str, list[str]], data_dir: Path) -> str:
    """Key of the features of ``files`` (under ``data_dir``): any change of a file changes it."""
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "front_end": asdict(fe),
            "files": files,
            "stamps": _file_stamps(data_dir, files),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_cache(path: Path, files: dict[str, list[str]], fe: FrontEnd) -> dict[str, Tensor] | None:
    """The cached features, or ``None`` (with a warning naming it) when unreadable or not fitting."""
    try:
        xs = torch.load(path, mmap=True, weights_only=True)
        if not isinstance(xs, dict) or set(xs) != set(files):
            what = sorted(xs) if isinstance(xs, dict) else type(xs).__name__
            raise ValueError(f"holds {what}, expected the splits {sorted(files)}")
        for name, fl in files.items():
            x, want = xs[name], (len(fl), fe.n_frames, fe.n_mels)
            if not isinstance(x, Tensor) or tuple(x.shape) != want or x.dtype != torch.float32:
                what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} features are {what}, expected {want} torch.float32")
    except Exception as err:  # a damaged cache is recomputed, never fatal
        log.warning("unreadable GSC cache %s (%s): recomputing", path, err)
        return None
    log.info("GSC features from cache %s", path)
    return xs


def _write_cache(path: Path, xs: dict[str, Tensor]) -> None:
    if (err := save_cache(path, xs)) is not None:
        log.warning("could not write the GSC cache %s (%s); continuing without it", path, err)


def _compute_all(
    data_dir: Path, files: dict[str, list[str]], fe: FrontEnd, batch_size: int
) -> dict[str, Tensor]:
    return {name: compute_features(data_dir, fl, fe, batch_size, name) for name, fl in files.items()}


def _cached_features(
    cache_dir: Path, data_dir: Path, files: dict[str, list[str]], fe: FrontEnd, cache: bool, batch_size: int
) -> dict[str, Split]:
    path = cache_dir / f"gsc_{cache_key(fe, files, data_dir)}.pt" if cache else None
    if path is None:
        xs = _compute_all(data_dir, files, fe, batch_size)
    else:
        xs, _ = build_once(
            path,
            lambda p: _read_cache(p, files, fe),
            lambda: _compute_all(data_dir, files, fe, batch_size),
            _write_cache,
            "computing the GSC features",
        )
    return {
        name: Split(xs[name], torch.full((len(fl),), fe.n_frames), _labels(fl)) for name, fl in files.items()
    }
