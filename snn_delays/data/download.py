"""Fetching dataset files: verified downloads, decompression, clear errors when offline.

Nothing half-written ever sits under a final name: a download streams into ``<dest>.part``,
its md5 is checked, and only then is it renamed (``os.replace``, atomic on one filesystem);
decompression likewise writes ``<target>.part`` and renames it when complete. A file already
present under its final name is used as it is, so users may bring their own copies.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm

_CHUNK = 1 << 20
_USER_AGENT = "snn_delays (https://pypi.org/project/snn-delays)"


class MissingDataError(FileNotFoundError):
    """A dataset file is absent and could not be downloaded."""


class ChecksumError(ValueError):
    """A downloaded file's md5 differs from the pinned one."""


class ArchiveError(ValueError):
    """A downloaded archive cannot be unpacked into the expected file."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _stream(url: str, out: Path) -> str:
    """Copy ``url`` into ``out`` with a progress bar; return the md5 of the bytes."""
    digest = hashlib.md5()
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=60) as response, open(out, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=out.name[: -len(".part")]) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                f.write(block)
                digest.update(block)
                bar.update(len(block))
    return digest.hexdigest()


def download_url(url: str, dest: Path, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``<dest>.part``, checking ``md5`` when given.

    Raises ``ChecksumError`` (naming the file, the expected and the actual md5) on a mismatch,
    and whatever ``urllib`` raises (an ``OSError``) when the URL cannot be read; in every
    failure the temporary file is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part(dest)
    try:
        got = _stream(url, part)
        if md5 is not None and got != md5.lower():
            raise ChecksumError(
                f"md5 mismatch for {dest.name} downloaded from {url}: expected {md5}, got {got} "
                "(an interrupted or altered download; it was deleted, try again)"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def _unpack_to(archive: Path, out: Path) -> None:
    """Write the single data file held by ``archive`` (.gz, .zip or plain) into ``out``."""
    if archive.name.endswith(".gz"):
        with gzip.open(archive, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    elif archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.endswith(".h5") and "__MACOSX" not in m]
            if len(members) != 1:
                raise ArchiveError(f"{archive.name} should hold one .h5 file, found {members}")
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    else:
        shutil.copyfile(archive, out)


def extract(archive: Path, target: Path) -> Path:
    """Unpack ``archive`` into ``target`` through ``<target>.part``; return ``target``."""
    part = _part(target)
    try:
        _unpack_to(archive, part)
        os.replace(part, target)
    except (zipfile.BadZipFile, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ArchiveError(f"{archive.name} is not a valid archive: {err}") from err
    finally:
        part.unlink(missing_ok=True)
    return target


def _missing_message(target: Path, urls: list[str], failures: list[str]) -> str:
    lines = [
        f"dataset file {target.name} not found in {target.parent} (the folder set by dataset.root).",
        "Get it from " + " or ".join(urls) + f", decompress it and put {target.name} in {target.parent}",
    ]
    if failures:
        lines.append("Download attempts failed:\n  " + "\n  ".join(failures))
    else:
        lines.append("or allow the download with dataset.download=true.")
    return "\n".join(lines)


def ensure_file(root: Path, filename: str, urls: list[str], md5: str | None, download: bool) -> Path:
    """Return ``root/filename``, downloading and unpacking it from the first working URL.

    ``md5`` is that of the file each URL serves (the archive). An existing file is returned
    untouched, with no network access. Raises ``MissingDataError`` (a ``FileNotFoundError``)
    naming the file, the URLs and the folder when it is absent and ``download`` is false or
    every URL fails.
    """
    root = Path(root)
    target = root / filename
    if target.exists():
        return target
    failures: list[str] = []
    if download:
        root.mkdir(parents=True, exist_ok=True)
        for url in urls:
            archive = root / url.rstrip("/").rsplit("/", 1)[-1]
            try:
                if archive == target:  # served uncompressed: no unpacking step
                    return download_url(url, target, md5)
                download_url(url, archive, md5)
                return extract(archive, target)
            except (OSError, ValueError) as err:
                failures.append(f"{url}: {err}")
            finally:
                if archive != target:
                    archive.unlink(missing_ok=True)
    raise MissingDataError(_missing_message(target, urls, failures))
