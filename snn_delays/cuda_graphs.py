"""CUDA graphs for the training and evaluation steps: captured once, replayed for every batch.

On a GPU the SNN's training step is bound by the host, not the GPU: a few hundred small
kernels (LIF, BatchNorm, dropout, the delay products and the Gaussian kernel of every layer,
two Adam optimizers) are each launched from Python. A CUDA graph records the step's kernels
once and replays them with a single launch. A graph reads its batch from fixed input
buffers (:class:`StaticInputs`); the trainer gathers each batch straight into them
(:meth:`GraphedSteps.buffer`), so a graphed step holds no more copies of the batch than an
eager one. ``trainer.cuda_graphs=auto`` (the default) turns this on for one process on a
CUDA device; ``true`` asks for it with a warning where it cannot run, ``false`` turns it off.

What a graph bakes in: sigma (the Gaussian kernel's width and the taps each path visits), the
learning rates and Adam betas of the epoch (the schedulers step once per epoch), and the
batch's shape. So :class:`GraphedSteps` captures anew at the start of every epoch (the first
batch of an epoch runs eagerly, on a side stream, which also warms up lazily initialised
state, then the next batch of the same shape is captured and run; a batch of another shape
before the capture is a new warm-up), and a batch of another shape than the graph's (the last,
smaller batch) runs eagerly. The optimizers run with ``capturable=True`` (their step counts
live on the GPU; :func:`set_capturable`). The evaluation step bakes in nothing that changes (parameters and BatchNorm
statistics are read from their memory at each replay; the integer delays are computed from
the positions inside the graph), so its graph is captured once for the run; with
``model.round_eval=false`` the evaluated network reads sigma too, and is captured again
whenever sigma changes. Should a capture fail (a kernel that synchronises with the host,
say), training goes on without graphs.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)
Body = Callable[[Tensor, Tensor], tuple[Tensor, ...]]
Capture = Callable[[Callable[[], tuple[Tensor, ...]]], tuple[Callable[[], None], tuple[Tensor, ...]]]


_STREAMS: dict[int, torch.cuda.Stream] = {}


def graph_stream() -> torch.cuda.Stream:
    """The one side stream of every capture and every eager step of graphed runners (warm-ups,
    batches of another shape) on the current device.

    PyTorch keeps a cuBLAS workspace (32 MiB on Hopper), allocated from the caching allocator,
    for each stream that ever ran a cuBLAS product, for the life of the process: a fresh side
    stream per epoch would add one workspace per epoch (up to the 32 streams of PyTorch's pool),
    and eager steps on the main stream one more (replays launch no cuBLAS call from the host).
    """
    device = torch.cuda.current_device()
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


def cuda_capture(body: Callable[[], tuple[Tensor, ...]]) -> tuple[Callable[[], None], tuple[Tensor, ...]]:
    """Record ``body`` as a CUDA graph and run it once; returns ``(replay, outputs)``.

    ``outputs`` are the graph's own tensors: every replay overwrites them. Captured on
    :func:`graph_stream`, where the warm-up ran.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=graph_stream()):
        outputs = body()
    graph.replay()
    return graph.replay, outputs


def capture_refusal(*optimizers: torch.optim.Optimizer | None) -> str | None:
    """Why one of ``optimizers`` cannot step inside a CUDA graph (no ``capturable`` option in
    some param group: SGD, say), or None."""
    for opt in optimizers:
        if opt is not None and not all("capturable" in group for group in opt.param_groups):
            return f"{type(opt).__name__} cannot step inside a CUDA graph"
    return None


def set_capturable(flag: bool, *optimizers: torch.optim.Optimizer | None) -> None:
    """``capturable=flag`` for every param group; step counts moved next to their parameters
    (``True``: the graph steps them on the GPU) or to the CPU (``False``: eager updates).

    A checkpoint of a graphed run holds ``capturable=True``: resuming it eagerly, or on the
    CPU (where capturable optimizers refuse to step), needs it off again.
    """
    if flag and (reason := capture_refusal(*optimizers)):
        raise ValueError(f"trainer.cuda_graphs: {reason}")
    for opt in optimizers:
        if opt is None or capture_refusal(opt):
            continue
        for group in opt.param_groups:
            group["capturable"] = flag
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "step" in state:
                    device = p.device if flag else torch.device("cpu")
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(device)


Layout = tuple[torch.Size, tuple[int, ...], torch.dtype, torch.device]


class StaticInputs:
    """The input buffers graphs read, one per layout (shape, strides, dtype, device).

    Runners that share one (the training and evaluation steps) share the buffer of a common
    layout. A buffer lives while a graph or a caller holds it (the registry's references are
    weak), so a dropped graph frees its buffer with it.
    """

    def __init__(self) -> None:
        self._buffers: weakref.WeakValueDictionary[Layout, Tensor] = weakref.WeakValueDictionary()

    def buffer(
        self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """The tensor to write the next batch of this layout into (made if none is held)."""
        buf = self._buffers.get(_key(shape, stride, dtype, device))
        if buf is None:
            buf = self.adopt(torch.empty_strided(shape, stride, dtype=dtype, device=device))
        return buf

    def adopt(self, t: Tensor) -> Tensor:
        """Make ``t`` itself the buffer of its layout: graphs will read it in place, and later
        batches of that layout are written into it. ``t`` is returned."""
        self._buffers[_strided_layout(t)] = t
        return t

    def take(self, t: Tensor) -> tuple[Tensor, bool]:
        """``(buffer, copied)``: the buffer of ``t``'s layout, holding ``t``'s values; ``t``
        itself (not copied) if it is that buffer. A tensor the caller made is never adopted
        here: the caller may still use it, or it may be a view of its data."""
        buf = self._buffers.get(_strided_layout(t))
        if buf is t:
            return t, False
        if buf is None:
            return self.adopt(t.clone()), True
        buf.copy_(t)
        return buf, True


class GraphedSteps:
    """``steps(x, target)`` runs ``body(x, target)``, from a graph where the shape allows.

    ``body`` is one whole training step (forward, backward, optimizer, clamping) returning
    tensors; :meth:`new_epoch` drops the graph. The returned tensors are the graph's outputs,
    overwritten by the next replay: read or accumulate them before the next call.

    The graph reads ``x`` and ``target`` from buffers of ``inputs`` (by default its own). A
    batch that is already that buffer (written through :meth:`buffer`, or adopted) is read in
    place; any other is copied in. ``capture`` and ``side_stream`` exist for tests, which
    replay the body eagerly on the CPU.
    """

    def __init__(
        self,
        body: Body,
        capture: Capture = cuda_capture,
        side_stream: bool = True,
        inputs: StaticInputs | None = None,
    ) -> None:
        self.body, self.capture, self.side_stream = body, capture, side_stream
        self.inputs = inputs if inputs is not None else StaticInputs()
        self.captures = 0  # graphs recorded so far
        self.replays = 0
        self.batch_copies = 0  # batches copied into the graph's input buffer (not written there)
        self.failed = False  # a capture failed: every later step runs eagerly
        self.new_epoch()

    def buffer(
        self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """Where to write the next batch ``x`` of this layout: the graph's input buffer when it
        has one of the layout, so the step reads the batch in place. The tensor is overwritten
        by the next batch of the same layout: drop or finish with the previous batch first.
        Pass this as ``batches(..., into=steps.buffer)``."""
        return self.inputs.buffer(shape, stride, dtype, device)

    @property
    def captured(self) -> bool:
        """At least one graph was recorded and none failed: the steps really replayed."""
        return self.captures > 0 and not self.failed

    def new_epoch(self) -> None:
        self._replay: Callable[[], None] | None = None
        self._inputs: tuple[Tensor, Tensor] | None = None
        self._outputs: tuple[Tensor, ...] = ()
        self._warm: tuple | None = None  # the layout of the last eager warm-up's batch

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, ...]:
        if self.failed:
            return self._eager(x, target)
        if self._replay is not None:
            static_x, static_t = self._inputs
            if _same_layout(x, static_x) and _same_layout(target, static_t):
                if x is not static_x:
                    static_x.copy_(x)
                    self.batch_copies += 1
                if target is not static_t:
                    static_t.copy_(target)
                self._replay()
                self.replays += 1
                return self._outputs
            return self._eager(x, target)  # another shape: the epoch's last, smaller batch
        layouts = (_layout(x), _layout(target))
        if self._warm != layouts:
            # the first batch of the epoch, or one of a shape not run since: eager. A capture
            # only records a shape whose lazy state (DFT matrices, Triton autotuning, cuFFT
            # plans) a warm-up made: made inside a capture, it fails.
            self._warm = layouts
            return self._eager(x, target)
        (static_x, copied), (static_t, _) = self.inputs.take(x), self.inputs.take(target)
        self.batch_copies += copied
        self._inputs = (static_x, static_t)
        try:
            self._replay, self._outputs = self.capture(lambda: self.body(*self._inputs))
        except RuntimeError as err:  # e.g. a host synchronisation inside the step
            # Nothing ran on the GPU during the failed capture: this batch runs again, eagerly.
            log.warning("CUDA graph capture failed, training without graphs from here: %s", err)
            self.failed, self._inputs = True, None
            return self._eager(x, target)
        self.captures += 1
        return self._outputs

    def _eager(self, x: Tensor, target: Tensor) -> tuple[Tensor, ...]:
        """The body, run now on the capturing stream (:func:`graph_stream`): its cuBLAS
        workspace serves the eager steps too, and the main stream needs none of its own."""
        with self._side():
            return self.body(x, target)

    @contextlib.contextmanager
    def _side(self):  # noqa: ANN202
        if not (self.side_stream and torch.cuda.is_available()):
            yield
            return
        stream = graph_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)


def _layout(t: Tensor) -> tuple:
    return t.shape, t.dtype, t.device


def _key(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Layout:
    return torch.Size(shape), tuple(stride), dtype, torch.device(device)


def _strided_layout(t: Tensor) -> Layout:
    return _key(t.shape, t.stride(), t.dtype, t.device)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return _layout(a) == _layout(b)
