"""Fetching dataset files: verified downloads, decompression, clear errors when offline.

Nothing half-written ever sits under a final name: a download streams into
``<dest>.<pid>.part``, its length and md5 are checked, and only then is it renamed
(``os.replace``, atomic on one filesystem); decompression likewise writes
``<target>.<pid>.part`` and renames it when complete. torchrun's ranks download one at a time (a
lock file, ``<root>/.download.lock``): the first fetches the file, the others then find it.
Where the filesystem refuses locks they fetch at once, and the process id in the temporary names
keeps their files apart. A file already present under its final name is used as it is, so users
may bring their own copies; an archive present under the name a URL serves is verified and
unpacked without any network access, and is never deleted (only an archive a download wrote is).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from snn_delays.data.base import one_process_at_a_time, part_path, progress_bar

_CHUNK = 1 << 20
_USER_AGENT = "snn_delays (https://pypi.org/project/snn-delays)"

log = logging.getLogger(__name__)


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


def _stream(url: str, out: Path, name: str) -> str:
    """Copy ``url`` into ``out`` with a progress bar; return the md5 of the bytes.

    Raises ``urllib.error.ContentTooShortError`` (an ``OSError``) when fewer bytes arrive than
    the server announced (a dropped connection ends the stream without an error).
    """
    digest = hashlib.md5()
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    size = 0
    with urllib.request.urlopen(request, timeout=60) as response, open(out, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        announced = f" ({total / 1e6:.0f} MB)" if total else ""
        log.info("downloading %s%s from %s into %s", name, announced, url, out.parent)
        with progress_bar(total=total, unit="B", unit_scale=True, desc=name) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                f.write(block)
                digest.update(block)
                size += len(block)
                bar.update(len(block))
    if total is not None and size < total:
        raise urllib.error.ContentTooShortError(
            f"incomplete download of {name} from {url}: got {size} of {total} bytes "
            "(the connection dropped; it was deleted, try again)",
            None,
        )
    return digest.hexdigest()


def download_url(url: str, dest: Path, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``<dest>.<pid>.part``, checking ``md5`` when given.

    Raises ``ChecksumError`` (naming the file, the expected and the actual md5) on a mismatch,
    ``urllib.error.ContentTooShortError`` when fewer bytes arrive than the server announced, and
    whatever ``urllib`` raises (an ``OSError``) when the URL cannot be read; in every failure
    the temporary file is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    try:
        _fetch(url, part, md5, dest.name)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def _fetch(url: str, out: Path, md5: str | None, name: str) -> None:
    """Stream ``url`` into ``out`` and check its md5 when given (``name`` for messages)."""
    got = _stream(url, out, name)
    if md5 is not None and got != md5.lower():
        raise ChecksumError(
            f"md5 mismatch for {name} downloaded from {url}: expected {md5}, got {got} "
            "(an interrupted or altered download; it was deleted, try again)"
        )


def _unpack_to(archive: Path, out: Path, name: str) -> None:
    """Write the single data file held by ``archive`` (``name`` .gz, .zip or plain) into ``out``."""
    if name.endswith(".gz"):
        with gzip.open(archive, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    elif name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.endswith(".h5") and "__MACOSX" not in m]
            if len(members) != 1:
                raise ArchiveError(f"{name} should hold one .h5 file, found {members}")
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    else:
        shutil.copyfile(archive, out)


def extract(archive: Path, target: Path, name: str | None = None) -> Path:
    """Unpack ``archive`` into ``target`` through ``<target>.<pid>.part``; return ``target``.

    ``name`` (default ``archive.name``) gives the format by its suffix and names the archive in
    errors.
    """
    name = archive.name if name is None else name
    part = part_path(target)
    if name != target.name:
        log.info("unpacking %s into %s", name, target)
    try:
        _unpack_to(archive, part, name)
        os.replace(part, target)
    except (zipfile.BadZipFile, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ArchiveError(f"{name} is not a valid archive: {err}") from err
    finally:
        part.unlink(missing_ok=True)
    return target


def _missing_message(target: Path, urls: list[str], failures: list[str], download: bool) -> str:
    lines = [
        f"dataset file {target.name} not found in {target.parent} (the folder set by dataset.root).",
        "Get it from " + " or ".join(urls) + f", decompress it and put {target.name} in {target.parent}",
    ]
    if not download:
        lines.append("or allow the download with dataset.download=true.")
    if failures:
        lines.append("These attempts failed:\n  " + "\n  ".join(failures))
    return "\n".join(lines)


def _archive_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def ensure_file(root: Path, filename: str, urls: list[str], md5: str | None, download: bool) -> Path:
    """Return ``root/filename``, unpacking or downloading it from the first working URL.

    ``md5`` is that of the file each URL serves (the archive). An existing file is returned
    untouched, with no network access. An archive already in ``root`` under the name a URL
    serves (one fetched by hand) is verified and unpacked first, with no network access even
    when ``download`` is false, and kept; a downloaded archive is deleted once unpacked. After
    each failure, a ``root/filename`` that appeared meanwhile (another process fetched it) is
    returned. Downloads hold ``root/.download.lock``: one process at a time fetches. Raises
    ``MissingDataError`` (a ``FileNotFoundError``) naming the file, the URLs, the folder and
    every failed attempt when nothing gave the file.
    """
    root = Path(root)
    target = root / filename
    if target.exists():
        return target
    failures: list[str] = []
    local = dict.fromkeys(root / _archive_name(url) for url in urls)
    for archive in (a for a in local if a != target and a.is_file()):
        try:  # fetched by hand (or left by another run): no network, and never deleted here
            if md5 is not None and (got := md5sum(archive)) != md5.lower():
                raise ChecksumError(f"md5 is {got}, expected {md5} (an incomplete or different copy)")
            return extract(archive, target)
        except (OSError, ValueError) as err:
            failures.append(f"{archive} (already there; left in place, delete or replace it): {err}")
            if target.exists():
                return target
    if download:
        root.mkdir(parents=True, exist_ok=True)
        # torchrun's ranks: one downloads while the others wait, then find the file
        with one_process_at_a_time(root / ".download.lock", f"downloading {filename}"):
            if target.exists():
                return target
            _download_first(root, target, urls, md5, failures)
            if target.exists():
                return target
    raise MissingDataError(_missing_message(target, urls, failures, download))


def _download_first(root: Path, target: Path, urls: list[str], md5: str | None, failures: list[str]) -> None:
    """Make ``target`` from the first URL that gives it, adding each failure to ``failures``;
    stop as soon as ``target`` exists (another process, without a lock, fetched it)."""
    for url in urls:
        name = _archive_name(url)
        try:
            if root / name == target:  # served uncompressed: no unpacking step
                download_url(url, target, md5)
                return
            fetched = part_path(root / name)  # this process's own copy, deleted once unpacked
            try:
                _fetch(url, fetched, md5, name)
                extract(fetched, target, name)
                return
            finally:
                fetched.unlink(missing_ok=True)
        except (OSError, ValueError) as err:
            failures.append(f"{url}: {err}")
            if target.exists():
                return
