"""Dataset containers shared by every loader.

Every split is held as one dense tensor ``x`` of shape ``(N, T_max, C)`` (sample-major on
disk and in memory), per-sample valid lengths and integer labels. Batches are produced
time-major, ``(T, B, C)``, zero-padded to the longest sample of the batch, as in the
published code. Holding whole splits as tensors lets them live on the training device, so
an epoch never goes back to the host for data.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import numbers
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class Split:
    """One split: inputs ``x`` (N, T_max, C), ``lengths`` (N,) valid steps, ``y`` (N,) labels."""

    x: Tensor
    lengths: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        self.lengths, self.y = torch.as_tensor(self.lengths), torch.as_tensor(self.y)
        if self.x.dim() != 3:
            raise ValueError(f"split x must be (N, T_max, C), got shape {tuple(self.x.shape)}")
        n = self.x.shape[0]
        if self.lengths.shape != (n,) or self.y.shape != (n,):
            raise ValueError(
                f"split tensors disagree: x {tuple(self.x.shape)}, "
                f"lengths {tuple(self.lengths.shape)}, y {tuple(self.y.shape)}"
            )
        # Lengths stay on the CPU: batch lengths are read there without a device sync.
        self.lengths = self.lengths.cpu().long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.lengths, self.y.to(device))

    def subset(self, index: Tensor) -> Split:
        index = _as_index(index)
        dev = self.x.device
        return Split(self.x[index.to(dev)], self.lengths[index], self.y[index.to(dev)])


@dataclass
class DataBundle:
    """Train / validation / test splits and the sizes the model is built from."""

    name: str
    train: Split
    valid: Split
    test: Split
    n_inputs: int
    n_classes: int
    dt_ms: float
    class_names: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> DataBundle:
        return DataBundle(
            self.name,
            self.train.to(device),
            self.valid.to(device),
            self.test.to(device),
            self.n_inputs,
            self.n_classes,
            self.dt_ms,
            list(self.class_names),
        )


def batches(
    split: Split,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    indices: Tensor | None = None,
    into: Callable[[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device], Tensor] | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(x, y, index)``: ``x`` float32 (T, B, C) padded to the batch's longest sample.

    ``indices`` restricts the iteration to a subset (a distributed shard, say); ``generator``
    (a CPU generator) makes the shuffle reproducible. ``into(shape, stride, dtype, device)``
    gives the tensor to write ``x`` into (a CUDA graph's input buffer,
    :meth:`snn_delays.cuda_graphs.GraphedSteps.buffer`); it may hand back the previous
    batch's tensor, overwritten, so a caller that keeps batches must not pass it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    order = _as_index(indices) if indices is not None else torch.arange(len(split))
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    dev = split.x.device
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        t = int(split.lengths[idx].max())
        idx_dev = idx.to(dev, non_blocking=True)
        if into is None:
            x = split.x[idx_dev, :t].float().transpose(0, 1)
        else:  # the layout of the line above (sample-major memory), written in place
            n, c = len(idx), split.x.shape[2]
            x = into((t, n, c), (c, t * c, 1), torch.float32, dev)
            x.copy_(split.x[idx_dev, :t].transpose(0, 1))
        yield x, split.y[idx_dev], idx


def _as_index(index: Tensor) -> Tensor:
    """Sample indices on the CPU; a boolean mask becomes the indices it selects."""
    index = torch.as_tensor(index).cpu()
    return index.nonzero().flatten() if index.dtype == torch.bool else index.long()


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)``: ``fraction`` of every class held out, seeded.

    A class of ``n`` samples gives ``round(fraction * n)``, and with ``fraction > 0`` at least
    one when ``n >= 2`` (a class of a few samples would otherwise give none, and a small file no
    validation split at all); classes as large as SHD's split exactly by the rounding. Raises
    ``ValueError`` when ``fraction > 0`` holds out nothing (no class has two samples).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dataset.valid_fraction must be in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    keep, held = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    labels = labels.cpu()
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            n_held = max(n_held, 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    held_out = torch.cat(held)
    if fraction > 0 and not len(held_out):
        raise ValueError(
            f"dataset.valid_fraction={fraction} holds out nothing: {len(labels)} training samples, "
            "no class with two or more; use a larger training file or dataset.valid_fraction=0"
        )
    return torch.sort(torch.cat(keep)).values, torch.sort(held_out).values


def part_path(path: Path) -> Path:
    """This process's temporary name for ``path`` (two processes never share one): a file is
    written there in full, then renamed into place."""
    return path.with_name(f"{path.name}.{os.getpid()}.part")


def save_cache(path: Path, obj: Any) -> Exception | None:
    """``torch.save(obj)`` to ``path`` through :func:`part_path`, never half-written and never
    raising: the error when it could not be written (a full disk makes ``torch.save`` raise a
    ``RuntimeError``; a ``cache`` path that is a file, an ``OSError``), for the caller to warn
    of. The temporary file is removed in every case."""
    part = part_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, part)
        os.replace(part, path)
    except (OSError, RuntimeError) as err:
        return err
    finally:
        with contextlib.suppress(OSError):  # NotADirectoryError when the cache folder is a file
            part.unlink(missing_ok=True)
    return None


_PROGRESS = contextvars.ContextVar("snn_delays_data_progress", default=True)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show (``True``, the default outside any block) or hide the data-preparation bars
    (download, extraction, binning, features) inside the block. The trainer hides them with
    ``trainer.progress=false`` and on every torchrun rank but the first; each stage still logs
    one INFO line when it starts."""
    token = _PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar, disabled where :func:`progress_bars` hides them."""
    kwargs["disable"] = kwargs.get("disable", False) or not _PROGRESS.get()
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def one_process_at_a_time(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` inside the block.

    torchrun's ranks all reach a first download, extraction or cache build at once: under the
    lock the first does the work while the others wait (logging that they do, ``what`` saying
    what the work is), then find it done. Without ``fcntl`` (Windows), where the lock file
    cannot be made (a read-only dataset folder) or where the filesystem refuses locks (a
    cluster filesystem mounted without them), there is no lock and each process does the work
    itself, as it would alone (every file is written atomically, so that is only slower).
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    locked = None
    if fcntl is not None:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            locked = open(lock, "a")  # noqa: SIM115 (closed below, after the block)
            try:
                fcntl.flock(locked, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another process is %s (lock %s): waiting for it", what, lock)
                fcntl.flock(locked, fcntl.LOCK_EX)
        except OSError as err:
            log.debug("no lock on %s (%s): this process is %s itself", lock, err, what)
            if locked is not None:
                locked.close()
                locked = None
    try:
        yield
    finally:
        if locked is not None:
            fcntl.flock(locked, fcntl.LOCK_UN)
            locked.close()


def file_stamp(path: Path) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of ``path``, ``None`` when absent: whether another process wrote it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def build_once(
    path: Path,
    read: Callable[[Path], Any],
    make: Callable[[], Any],
    save: Callable[[Path, Any], None],
    what: str,
) -> tuple[Any, bool]:
    r"""The value cached at ``path``, or ``make()``'s, then ``save``\ d there; and whether it came
    from the cache. ``read`` gives ``None`` for a file it cannot use (and says why).

    torchrun's ranks all reach a missing cache at once: under ``<folder>/.lock``
    (:func:`one_process_at_a_time`, ``what`` naming the work) the first makes it while the
    others wait, then read what it wrote."""
    seen = file_stamp(path)
    value = read(path) if seen is not None else None
    if value is not None:
        return value, True
    with one_process_at_a_time(path.parent / ".lock", what):
        now = file_stamp(path)
        if now is not None and now != seen:  # written meanwhile
            value = read(path)
        if value is not None:
            return value, True
        value = make()
        save(path, value)
    return value, False
