"""Benchmark the delay backends on the published networks: the same inputs through both.

    python experiments/bench.py                          # CPU, SHD, sigma 0.23 and K//2
    python experiments/bench.py --device cuda --json out.json --networks shd,ssc
    python experiments/bench.py --device cuda --backends dcls,fast+graphs,fast+graphs+sj-lif,fast:triton+graphs
    python experiments/targets.py out.json      # each row against the issue's targets, met or missed

A backend is ``dcls`` or ``fast``, the latter optionally with a delay path (``fast:IMPL``, as
``SNN_DELAYS_CONV_IMPL``: gemm, triton, fft, dense, c), ``+graphs`` (CUDA: both steps
replayed from CUDA graphs, as ``trainer.cuda_graphs=true`` runs them), ``+triton-lif``
(CUDA: the LIF of ``SNN_DELAYS_NEURON_IMPL=triton``, what ``auto`` runs there) and ``+sj-lif``
(spikingjelly's LIF, ``SNN_DELAYS_NEURON_IMPL=spikingjelly``: CUDA's default before the Triton LIF),
``+torch-fft`` (the spectral path off the C kernels transforms x and dL/dy with
``torch.fft.rfft``, ``SNN_DELAYS_DFT=fft``, instead of its DFT products), ``+eval-block-MIB``
(the GEMM evaluation, CUDA's, unfolds at most MIB MiB at a time: ``SNN_DELAYS_EVAL_CHUNK``;
64 by default; as many elements, half the bytes, with ``+eval-fp16``), ``+eval-fp16`` (the
GEMM evaluation multiplies the layers fed by spikes as float16 operands into float32:
``SNN_DELAYS_EVAL_FP16=1``; on the CPU, off the C kernels, a float32 stand-in). A training step is
forward + backward of the whole network (no optimizer); an evaluation step
is ``model.eval()`` under ``no_grad`` (integer delays). Inputs are seeded random spike counts.
The ``dcls`` reference runs spikingjelly's neurons (the published code path; ``--ref-neurons
auto`` gives it the fused CPU LIF too), the ``fast`` backend those of ``--neurons`` (default
``auto``).

Memory: ``peak`` is the training step's, ``eval peak`` the evaluation step's; on CUDA
``max_memory_allocated`` (everything allocated: the shared input too, which ``+graphs`` rows
read in place, as the trainer's graphs read the batch it gathers into them), on the CPU the process's
resident high-water mark. Every row starts from a collected heap: the first model run in a
process leaves a reference cycle (the frames of a lazy import inside it: ~210 MiB of the
reference's last activations at SHD batch 256, beyond the shared input), and uncollected it was
counted in every later row's peak. On CUDA a row also starts without cuBLAS workspaces (32 MiB
per stream on Hopper, kept for the process's life): each row counts those it makes, as a
process running that backend alone would (``+graphs`` rows run every eager step on the
graphs' stream, so they make one, as the others do). ``--tensor-memory`` adds, on any device, the peak of the live tensors of one eager
step (:class:`snn_delays.memtrack.TensorMemory`, plus the input and parameters): with
``SNN_DELAYS_NO_C=fast_delays`` the CPU runs CUDA's delay operators (DFT products, batched
matmuls, torch.fft's inverse) beside the fused C LIF, which keeps the tensors that ``auto``'s Triton LIF keeps on
CUDA (``+sj-lif`` rows: spikingjelly's), so its columns estimate CUDA's peaks without
workspaces (cuDNN, cuBLAS, cuFFT) or CUDA graphs.

A row whose variant fails (an error in its kernels, say) is reported on stderr and left out;
the others are timed (the first, the reference, stops the run). ``--json`` is rewritten after
every network and sigma, ``meta.finished`` false until the last: a run stopped part-way keeps
the rows it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import re
import sys
import time

import torch

from snn_delays.cuda_graphs import Body as GraphBody
from snn_delays.cuda_graphs import Capture, GraphedSteps, StaticInputs, cuda_capture
from snn_delays.fast_delays import IMPLS, keep_freed_memory
from snn_delays.memtrack import TensorMemory, peak_mib, reset_peak_memory
from snn_delays.model import DelaySNN

NETWORKS = {  # n_inputs, n_classes, n_hidden, n_layers, K, tau, dropout, batch
    "shd": (140, 20, 256, 2, 25, 1.005, 0.4, 256),
    "ssc": (140, 35, 512, 3, 31, 1.5, 0.25, 128),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, steps: int, repeats: int) -> float:  # noqa: ANN001
    """Best of ``repeats`` means over ``steps`` calls, after one warm-up call (seconds)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def collect(device: torch.device) -> float | None:
    """Free what earlier rows left (reference cycles included, and on CUDA the cuBLAS
    workspaces PyTorch keeps per stream that ran a product, so that each row counts the
    workspaces it makes itself); CUDA: MiB still allocated."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # no graph of a row is alive here
    if clear is not None:
        clear()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 2**20


def _reset_peak(device: torch.device) -> None:
    if device.type != "cuda":
        try:  # glibc: hand the free heap back first (keep_freed_memory holds on to it) ...
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
    reset_peak_memory(device)  # ... then the peak starts from what is live now


def build_network(net: str, backend: str, delays: str = "learned") -> DelaySNN:
    """The published ``net`` network, seeded: the same weights for every backend."""
    n_in, n_cls, hidden, layers, k, tau, drop, _ = NETWORKS[net]
    torch.manual_seed(0)
    return DelaySNN(
        n_in,
        n_cls,
        n_hidden=hidden,
        n_layers=layers,
        kernel_size=k,
        tau=tau,
        dropout=drop,
        delays=delays,
        delay_backend=backend,
    )


MODIFIERS = ("graphs", "triton-lif", "sj-lif", "torch-fft", "eval-fp16")  # and +eval-block-MIB
EVAL_BLOCK = re.compile(r"eval-block-([1-9][0-9]*)")  # MiB of evaluation's unfolded block


def parse_backend(spec: str, device: str) -> tuple[str, str | None, set[str]]:
    """``dcls`` | ``fast[:IMPL][+graphs][+triton-lif|+sj-lif][+torch-fft][+eval-block-MIB][+eval-fp16]``
    -> (backend, conv impl or None, modifiers)."""
    name, *mods = spec.split("+")
    backend, _, impl = name.partition(":")
    bad_impl = impl and (backend == "dcls" or impl not in IMPLS)
    if (
        backend not in ("dcls", "fast")
        or bad_impl
        or not all(m in MODIFIERS or EVAL_BLOCK.fullmatch(m) for m in mods)
        or (mods and backend != "fast")
    ):
        raise SystemExit(
            f"--backends: unknown entry {spec!r} (dcls, or fast[:IMPL] with any of +{', +'.join(MODIFIERS)}, +eval-block-MIB; "
            f"IMPL in {IMPLS})"
        )
    if {"graphs", "triton-lif"} & set(mods) and not device.startswith("cuda"):
        raise SystemExit(f"--backends {spec}: CUDA graphs and the Triton LIF need --device cuda")
    return backend, impl or None, set(mods)


@contextlib.contextmanager
def _env(name: str, value: str | None):  # noqa: ANN202
    """``os.environ[name] = value`` inside the block (``None``: left as it is)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def step_bodies(model: DelaySNN) -> tuple[GraphBody, GraphBody]:
    """The benchmark's training step (forward, a loss of the output, backward; no optimizer)
    and evaluation step, as bodies that :class:`GraphedSteps` can capture."""

    def train_body(inputs: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model(inputs).float().square().mean()
        loss.backward()
        return (loss.detach(),)

    @torch.no_grad()
    def eval_body(inputs: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor]:
        return (model(inputs),)

    return train_body, eval_body


def graph_runners(
    train_body: GraphBody,
    eval_body: GraphBody,
    x: torch.Tensor,
    target: torch.Tensor,
    capture: Capture = cuda_capture,
) -> tuple[GraphedSteps, GraphedSteps]:
    """Graphed steps that read ``x`` and ``target`` in place, as the trainer's graphs read the
    batch it gathers straight into their input buffer: a ``+graphs`` row holds one copy of the
    input, as every other row does."""
    inputs = StaticInputs()
    inputs.adopt(x)
    inputs.adopt(target)
    return GraphedSteps(train_body, capture, inputs=inputs), GraphedSteps(eval_body, capture, inputs=inputs)


def bench_one(net: str, spec: str, sigma: float, args: argparse.Namespace, x: torch.Tensor) -> dict:
    backend, conv_impl, mods = parse_backend(spec, args.device)
    graphs = "graphs" in mods
    impl = args.ref_neurons if backend == "dcls" else args.neurons
    impl = "triton" if "triton-lif" in mods else "spikingjelly" if "sj-lif" in mods else impl
    with _env("SNN_DELAYS_NEURON_IMPL", impl):  # read when the neurons are built
        model = build_network(net, backend)
    model.set_sigma(sigma)
    model.to(args.device)
    device = torch.device(args.device)

    train_body, eval_body = step_bodies(model)
    no_target = torch.zeros(1, device=device)
    run_train, run_eval = (
        graph_runners(train_body, eval_body, x, no_target) if graphs else (train_body, eval_body)
    )

    def train_step() -> None:
        model.train()
        run_train(x, no_target)

    def eval_step() -> None:
        model.eval()
        run_eval(x, no_target)

    tensors = {}
    eval_block = next((int(m.group(1)) for m in map(EVAL_BLOCK.fullmatch, mods) if m), None)
    with (
        _env("SNN_DELAYS_CONV_IMPL", conv_impl),
        _env("SNN_DELAYS_DFT", "fft" if "torch-fft" in mods else None),
        _env("SNN_DELAYS_EVAL_CHUNK", str(eval_block * 2**18) if eval_block else None),  # MiB of float32
        _env("SNN_DELAYS_EVAL_FP16", "1" if "eval-fp16" in mods else None),
    ):
        _reset_peak(device)
        train = _time(train_step, device, args.steps, args.repeats)
        peak = peak_mib(device)
        _reset_peak(device)
        evaluation = _time(eval_step, device, args.steps, args.repeats)
        eval_peak = peak_mib(device)
        if args.tensor_memory:  # one more eager step of each, its tensors counted
            held = x.nbytes + sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))
            for name, mode, body in (("train", model.train, train_body), ("eval", model.eval, eval_body)):
                mode()
                try:
                    with TensorMemory() as mem:
                        body(x, no_target)
                    tensors[f"tensor_{name}_mib"] = (held + mem.peak_bytes) / 2**20
                except Exception as err:  # noqa: BLE001 - an estimate: the row's timings stand
                    print(f"--tensor-memory: {spec} {name} step not counted: {err!r}", file=sys.stderr)
                    tensors[f"tensor_{name}_mib"] = None
    if graphs and not (run_train.captured and run_eval.captured):
        spec += " (capture FAILED: eager)"
    with torch.no_grad():
        model.eval()
        _, spikes = model(x, return_spikes=True)
    rates = [round(float((s > 0).float().mean()), 4) for s in spikes]
    return dict(
        network=net,
        backend=spec,
        neurons=impl,
        sigma=sigma,
        batch=x.shape[1],
        time_steps=x.shape[0],
        train_s=train,
        eval_s=evaluation,
        peak_mib=peak,
        eval_peak_mib=eval_peak,
        **tensors,
        spike_density=rates,
    )


def _networks(text: str) -> str:
    unknown = [n for n in text.split(",") if n not in NETWORKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}: use {', '.join(NETWORKS)}")
    return text


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present"
    )
    parser.add_argument("--batch", type=int, default=None, help="default: the published batch")
    parser.add_argument("--time-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="calls per timing (CPU 1, GPU 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timings, best kept")
    parser.add_argument(
        "--networks",
        type=_networks,
        default="shd",
        help="comma list of shd, ssc (default: shd; the reference is slow on SSC on a CPU)",
    )
    parser.add_argument("--sigma", default="0.23,K//2", help="comma list; K//2 = the initial sigma")
    parser.add_argument("--density", type=float, default=0.05, help="input spike density")
    parser.add_argument(
        "--backends",
        default="dcls,fast",
        help="comma list of dcls, fast[:IMPL][+graphs][+triton-lif|+sj-lif][+torch-fft][+eval-block-MIB]"
        "[+eval-fp16] (explained in bench.py's docstring); the first is the reference",
    )
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--ref-neurons", default="spikingjelly", help="neuron impl of the dcls rows")
    parser.add_argument(
        "--neurons",
        default="auto",
        help="neuron impl of the fast rows (auto: the fused C LIF on the CPU, the Triton LIF on CUDA)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--tensor-memory",
        action="store_true",
        help="also count the live tensors of one eager train and eval step (any device)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_kept = keep_freed_memory()  # as the trainer does on CPU; the same for both backends
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (20 if gpu else 1)
    device = torch.device(args.device)
    if gpu and device.index is not None:  # cuda:N: the graphs' stream and Triton follow the current device
        torch.cuda.set_device(device)
    results = []

    def save(finished: bool) -> None:
        """The rows so far to ``--json``, rewritten after every network and sigma: a run stopped
        part-way (``gpu_check.sh``'s timeouts) keeps its measured rows, ``finished`` false."""
        if not args.json:
            return
        meta = dict(
            device=str(args.device),
            torch=torch.__version__,
            argv=sys.argv[1:],
            threads=torch.get_num_threads(),
            keep_freed_memory=malloc_kept,
            finished=finished,
        )
        if hasattr(os, "getloadavg"):
            meta["loadavg_after"] = os.getloadavg()  # other processes on the CPUs skew CPU timings
        if gpu:
            meta["gpu"] = torch.cuda.get_device_name()
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)

    for net in args.networks.split(","):
        n_in, *_, k, _, _, batch = NETWORKS[net]
        batch = args.batch or batch
        gen = torch.Generator().manual_seed(0)
        spikes = torch.rand(args.time_steps, batch, n_in, generator=gen) < args.density
        counts = spikes.float() * torch.randint(1, 3, spikes.shape, generator=gen)
        x = counts.to(args.device)
        for sig in args.sigma.split(","):
            sigma = float(k // 2) if sig == "K//2" else float(sig)
            rows = []
            for b in args.backends.split(","):
                base = collect(device)
                try:
                    rows.append(bench_one(net, b, sigma, args, x))
                except Exception as err:  # noqa: BLE001 - one variant failed: time the others
                    if not rows:
                        raise  # the reference: no row can be compared without it
                    print(f"{net} {b} sigma={sigma:g}: FAILED {type(err).__name__}: {err}", file=sys.stderr)
                    continue
                rows[-1]["base_mib"] = base  # CUDA: allocated at the row's start (the input)
            collect(device)
            for row in rows:
                row["train_speedup"] = rows[0]["train_s"] / row["train_s"]
                row["eval_speedup"] = rows[0]["eval_s"] / row["eval_s"]
                results.append(row)
                counted = [row.get(f"tensor_{n}_mib") for n in ("train", "eval")]
                counted = ["     -" if c is None else f"{c:6.0f}" for c in counted]
                tensor_cols = f"tensors {counted[0]} / {counted[1]} MiB  " if args.tensor_memory else ""
                print(
                    f"{net:4s} {row['backend']:5s} sigma={sigma:6.2f} train {row['train_s'] * 1e3:9.1f} ms "
                    f"(x{row['train_speedup']:5.2f})  eval {row['eval_s'] * 1e3:8.1f} ms "
                    f"(x{row['eval_speedup']:5.2f})  peak {row['peak_mib'] or 0:6.0f} / "
                    f"{row['eval_peak_mib'] or 0:6.0f} MiB  {tensor_cols}spikes {row['spike_density']}",
                    flush=True,
                )
            save(finished=False)
    save(finished=True)
    return results


if __name__ == "__main__":
    main()
