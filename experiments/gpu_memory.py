"""What is allocated at a GPU step's peak, and by what: the CUDA allocator's own trace.

    python experiments/gpu_memory.py --variant dcls|fast|fast+graphs [--network shd] [--sigma 0.23] [--stacks python]

One variant per process (``gpu_check.sh`` part 7 runs the three), recorded from the start:
the model and the input are built with the allocator's history on
(``torch.cuda.memory._record_memory_history``, C++ frames included), then the training step
runs three times (with ``+graphs``: eager warm-up, capture, one replay, as ``bench.py`` runs
it), then the evaluation step three times. The trace is replayed to find the most bytes
allocated at one time (it should equal ``max_memory_allocated``, printed beside it) and what
was alive then, grouped by origin: the C++ function that asked for it (which names the
workspaces that cuBLAS, cuFFT and cuDNN take through the caching allocator) and the innermost
line of this project (or spikingjelly, DCLS, the benchmark) above it, then summed by kind.
A timeline gives the bytes still allocated after each phase (what a warm-up, a capture or a
replay leaves behind: graph outputs, a stream's workspaces).

This is what ``bench.py``'s ``--tensor-memory`` (the live tensors, counted the same way on the
CPU) cannot see: workspaces and the graphs' pools.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict
from collections.abc import Iterable

import torch

MIB = 2**20
OURS = ("snn_delays/", "spikingjelly/", "DCLS/", "dcls/", "experiments/")
# C++ frames of the allocation itself (the allocator, empty(), the dispatcher): skipped, so that
# an allocation is named by the function that asked for it
PLUMBING = re.compile(
    r"Alloc|alloc|empty|c10::|at::_ops::|wrapper_|Dispatcher|TensorIterator|make_intrusive|at::detail::"
    r"|^\?\?$|^_?Py|^$"  # unsymbolised frames, the interpreter's own
)
KINDS = (  # (pattern in an origin, kind), the first that matches
    (re.compile(r"getNewWorkspace|Blas\w*Workspace"), "cuBLAS workspace"),
    (re.compile(r"_exec_fft"), "cuFFT work area (and its input copies)"),
    (re.compile(r"cudnn|Workspace::Workspace|conv_plan", re.I), "cuDNN (outputs and workspaces)"),
)


def origin(frames: Iterable[dict]) -> str:
    """Who asked for one allocation, from its frames (innermost first): the innermost C++
    function past the allocator's plumbing (with C++ stacks), then the innermost line of this
    project (else of any Python file)."""
    frames = list(frames)
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    cpp = next(
        (
            f["name"].split("(")[0]
            for f in frames
            if f not in python and not PLUMBING.search(f.get("name", ""))
        ),
        None,
    )
    ours = [f for f in python if any(part in f["filename"] for part in OURS)]
    line = None
    if ours or python:
        frame = (ours or python)[0]
        filename = frame["filename"]
        cut = max((filename.find(p) for p in OURS if p in filename), default=filename.rfind("/") + 1)
        line = f"{filename[cut:]}:{frame.get('line')} {frame.get('name')}"
    return " <- ".join(part for part in (cpp, line) if part) or "(no frame)"


def kind(label: str) -> str:
    return next((name for pattern, name in KINDS if pattern.search(label)), "tensors")


def peak_of(trace: list[dict], base: int = 0) -> tuple[int, int, dict[int, tuple[int, str]]]:
    """Replay allocator events: (peak bytes, index of the event that reached it, what was
    alive then: address -> (bytes, origin)). ``base``: bytes allocated before the trace."""
    live: dict[int, tuple[int, list]] = {}
    now = peak = base
    at, alive = -1, {}
    for i, event in enumerate(trace):
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            now += event["size"]
            if now > peak:
                peak, at, alive = now, i, dict(live)
        elif action == "free_completed" and event["addr"] in live:
            now -= live.pop(event["addr"])[0]
    return peak, at, {addr: (size, origin(frames)) for addr, (size, frames) in alive.items()}


def grouped(alive: dict[int, tuple[int, str]]) -> list[tuple[int, int, str]]:
    """(bytes, count, origin), the largest first."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, label in alive.values():
        groups[label][0] += size
        groups[label][1] += 1
    return sorted(((b, n, label) for label, (b, n) in groups.items()), reverse=True)


def main() -> None:
    from bench import NETWORKS, build_network, collect, graph_runners, step_bodies  # run from experiments/

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="fast+graphs", choices=("dcls", "fast", "fast+graphs"))
    parser.add_argument("--network", default="shd", choices=sorted(NETWORKS))
    parser.add_argument("--sigma", type=float, default=0.23)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument(
        "--stacks",
        default="all",
        choices=("all", "python"),
        help="all: C++ frames too, which name the workspaces (slower to symbolise)",
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    collect(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks=args.stacks)
    torch.cuda.reset_peak_memory_stats(device)
    backend = "dcls" if args.variant == "dcls" else "fast"
    n_in, *_, batch = NETWORKS[args.network]
    # as bench.py's rows: the reference with spikingjelly's LIF (the published code), the fast
    # backend with auto's (the Triton LIF on CUDA); read when the neurons are built
    os.environ["SNN_DELAYS_NEURON_IMPL"] = "spikingjelly" if backend == "dcls" else "auto"
    model = build_network(args.network, backend).to(device)
    model.set_sigma(args.sigma)
    gen = torch.Generator().manual_seed(0)
    spikes = torch.rand(100, batch, n_in, generator=gen) < 0.05
    x = (spikes.float() * torch.randint(1, 3, spikes.shape, generator=gen)).to(device)
    no_target = torch.zeros(1, device=device)

    train_body, eval_body = step_bodies(model)
    graphs = args.variant.endswith("+graphs")
    run_train, run_eval = (
        graph_runners(train_body, eval_body, x, no_target) if graphs else (train_body, eval_body)
    )
    phases = [("model and input", torch.cuda.memory_allocated(device))]
    peaks = []
    for name, mode, run in (("train", model.train, run_train), ("eval", model.eval, run_eval)):
        mode()
        for step in range(3):
            run(x, no_target)
            torch.cuda.synchronize(device)
            phases.append((f"{name} step {step + 1}", torch.cuda.memory_allocated(device)))
        peaks.append((name, torch.cuda.max_memory_allocated(device)))
        torch.cuda.reset_peak_memory_stats(device)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][device.index or 0]
    peak, at, alive = peak_of(trace, base)
    print(f"{args.network} {args.variant} sigma {args.sigma} batch {batch} on {torch.cuda.get_device_name()}")
    if graphs:
        print(f"captured: train {run_train.captured}, eval {run_eval.captured}")
    for name, value in peaks:
        print(f"max_memory_allocated over the {name} steps: {value / MIB:8.1f} MiB")
    print(
        f"peak replayed from the trace: {peak / MIB:.1f} MiB (before the trace: {base / MIB:.1f}), at event {at} of {len(trace)}"
    )
    print("allocated after each phase (MiB): " + ", ".join(f"{n} {v / MIB:.1f}" for n, v in phases))
    groups = grouped(alive)
    by_kind: dict[str, int] = defaultdict(int)
    for size, _, label in groups:
        by_kind[kind(label)] += size
    print("alive at the peak, by kind: " + ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in by_kind.items()))
    print(f"alive at the peak, by origin (top {args.top}):")
    for size, count, label in groups[: args.top]:
        print(f"  {size / MIB:8.1f} MiB  {count:4d}x  {label}")


if __name__ == "__main__":
    main()
