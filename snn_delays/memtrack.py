"""Peak tensor memory of a block of PyTorch code, counted the same way on any device.

``torch.cuda.max_memory_allocated`` exists only on CUDA, and a CPU process's resident size
mixes tensors with the allocator's and libraries' own memory. :class:`TensorMemory` counts
what both have in common, the storage of the tensors that the operators inside the block
create, while they are alive::

    with TensorMemory() as mem:
        model(x).sum().backward()
    print(mem.peak_bytes)  # most bytes of new tensors alive at one time

It sees every operator PyTorch dispatches, the backward's included (a dispatch mode), and
follows each new storage until it is freed (a finalizer on the storage, which PyTorch keeps
as one Python object for as long as the storage lives). Storages that existed before the
block (parameters, inputs, and the views of them that operators return) are not counted, nor
is memory that kernels take for themselves (cuFFT/cuDNN/cuBLAS workspaces, a C library's
buffers). So on the CPU, with the CUDA path's operators (``SNN_DELAYS_NO_C=fast_delays``), it
estimates what a training step asks of the CUDA caching allocator beyond its inputs.
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages created inside the block: ``live_bytes`` now,
    ``peak_bytes`` at most, ``allocated_bytes`` in all (each storage counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocated_bytes = 0
        self._lock = threading.Lock()  # finalizers may run on the autograd engine's threads
        self._mine: dict[int, int] = {}  # storage id -> bytes, alive and counted
        self._foreign: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._note_foreign(t)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    @staticmethod
    def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less
            return None

    def _note_foreign(self, t: torch.Tensor) -> None:
        storage = self._storage(t)
        if storage is not None and storage._cdata not in self._mine:
            self._foreign.setdefault(storage._cdata, storage)

    def _track(self, t: torch.Tensor) -> None:
        storage = self._storage(t)
        if storage is None:
            return
        key = storage._cdata
        if key in self._mine or key in self._foreign:
            return
        size = storage.nbytes()
        with self._lock:
            self._mine[key] = size
            self.allocated_bytes += size
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        with self._lock:
            self.live_bytes -= self._mine.pop(key, 0)

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        with self._lock:
            self.peak_bytes = self.live_bytes


def reset_peak_memory(device: torch.device | str) -> None:
    """Start :func:`peak_mib`'s peak anew from what is held now: Hydra's launcher runs a ``-m``
    sweep's jobs in one process, and each job's peak included the jobs before it. CUDA: the
    caching allocator's peak statistics; Linux: ``VmHWM`` (``/proc/self/clear_refs``);
    elsewhere nothing can be reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the resident high-water mark to the current resident size
    except OSError:
        pass


def peak_mib(device: torch.device | str) -> float | None:
    """The most memory held so far, in MiB. CUDA: the caching allocator's peak of allocated
    memory on ``device`` (since ``torch.cuda.reset_peak_memory_stats``). Elsewhere: the
    process's resident high-water mark (Linux ``VmHWM``, since :func:`reset_peak_memory`; else
    the peak since the start), which counts the interpreter and libraries too; None where the
    platform has neither (Windows)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource  # not on Windows
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
