"""Where does a GPU training step go? SHD (or SSC) network, 100 steps, several variants.

    python experiments/gpu_profile.py [--network shd|ssc] [--batch 256] [--steps 100] [--profile]

Times (CUDA events, median of repeats) the trainer's training step
(``snn_delays.training.train_step``: forward, backward, one Adam step, clamping) and its
evaluation step of these variants:

- the default: the fast backend on the spectral path (cuFFT and complex products) and the
  Triton LIF, with each step replayed from a CUDA graph, as ``trainer.cuda_graphs=auto`` runs
  it on one GPU (a variant whose capture failed is marked, its time is then the eager one);
  the same eagerly; the same with spikingjelly's LIF (``SNN_DELAYS_NEURON_IMPL=spikingjelly``);
- the dcls reference (cuDNN on; spikingjelly's LIF in every dcls row, the published code);
- the GEMM path (``SNN_DELAYS_CONV_IMPL=gemm``: unfolded GEMMs), eagerly and graphed;
- the Triton implicit GEMMs (``SNN_DELAYS_CONV_IMPL=triton``: no unfold copy), eagerly and
  graphed;
- the conv1d path (``SNN_DELAYS_CONV_IMPL=dense``, the first CUDA path), the dcls reference
  with cuDNN off (as the published code ran), and the network without delays.

It prints the peak memory of each (from a collected heap: nothing of the variants before)
and, with ``--profile``, the profiler's top CUDA kernels of one fast step.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from bench import NETWORKS, build_network, collect  # the published networks (run from experiments/)

from snn_delays.cuda_graphs import GraphedSteps, set_capturable
from snn_delays.model import DelaySNN
from snn_delays.training import Optimization, eval_step, train_step


def make(net: str, backend: str, delays: str = "learned") -> DelaySNN:
    model = build_network(net, backend, delays).cuda()
    model.set_sigma(0.23)
    return model


def time_ms(fn, repeats: int = 20) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def steps(model: DelaySNN, x: torch.Tensor, y: torch.Tensor, graphs: bool = False):  # noqa: ANN201
    """The trainer's training and evaluation steps; ``graphs``: replayed from CUDA graphs as
    ``trainer.cuda_graphs=true`` runs them (the first call eager, the second captures)."""
    opt = Optimization(torch.optim.Adam(model.parameters(), lr=1e-3), None)
    run_train = lambda a, b: train_step(model, opt, a, b)  # noqa: E731
    run_eval = lambda a, b: eval_step(model, a, b)  # noqa: E731
    if graphs:
        set_capturable(True, opt.weights)
        run_train, run_eval = GraphedSteps(run_train), GraphedSteps(run_eval)

    def train() -> None:
        model.train()
        run_train(x, y)

    def evaluate() -> None:
        model.eval()
        run_eval(x, y)

    train.graphs = (run_train, run_eval) if graphs else ()  # for the failed-capture check
    return train, evaluate


def time_variant(net: str, backend: str, delays: str, graphs: bool, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    """(train ms, eval ms, peak MiB, captured) of one variant. Its model and graphs are this
    call's locals: freed on return, before the next variant's peak is reset."""
    train, evaluate = steps(make(net, backend, delays), x, y, graphs=graphs)
    times = time_ms(train), time_ms(evaluate)
    captured = all(runner.captured for runner in train.graphs)
    return (*times, torch.cuda.max_memory_allocated() / 2**20, captured)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--network", default="shd", choices=sorted(NETWORKS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    n_cls, batch = NETWORKS[args.network][1], args.batch or NETWORKS[args.network][-1]
    torch.manual_seed(1)
    x = (torch.rand(args.steps, batch, 140, device="cuda") < 0.05).float()
    y = torch.randint(n_cls, (batch,), device="cuda")
    rows = []
    variants = [
        ("fast, cuFFT, CUDA graph (default)", "fast", "learned", True, "fft+graph"),
        ("fast, cuFFT, eager", "fast", "learned", True, "fft"),
        ("fast, cuFFT, CUDA graph, spikingjelly LIF", "fast", "learned", True, "fft+graph+sjlif"),
        ("dcls", "dcls", "learned", True, "auto"),
        ("fast, GEMM", "fast", "learned", True, "gemm"),
        ("fast, GEMM, CUDA graph", "fast", "learned", True, "gemm+graph"),
        ("fast, triton", "fast", "learned", True, "triton"),
        ("fast, triton, CUDA graph", "fast", "learned", True, "triton+graph"),
        ("fast, conv1d path (first)", "fast", "learned", True, "dense"),
        ("dcls, cuDNN off (published)", "dcls", "learned", False, "auto"),
        ("no delays", "fast", "none", True, "auto"),
    ]
    for name, backend, delays, cudnn, conv in variants:
        torch.backends.cudnn.enabled = cudnn
        conv, *flags = conv.split("+")
        graph = "graph" in flags
        os.environ["SNN_DELAYS_CONV_IMPL"] = conv
        published = backend == "dcls" or "sjlif" in flags  # spikingjelly's LIF, else auto's (Triton)
        os.environ["SNN_DELAYS_NEURON_IMPL"] = "spikingjelly" if published else "auto"  # read at build
        collect(torch.device("cuda"))  # the previous variant's garbage (a first model's cycle)
        torch.cuda.reset_peak_memory_stats()
        try:
            *measured, captured = time_variant(args.network, backend, delays, graph, x, y)
            if not captured:
                name += " (capture FAILED: eager)"
            rows.append((name, *measured))
        except Exception as err:  # noqa: BLE001 - report the variant that failed, time the rest
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
            torch.cuda.synchronize()
            continue
        print(name, rows[-1][1:], flush=True)
    torch.backends.cudnn.enabled = True
    os.environ["SNN_DELAYS_CONV_IMPL"] = os.environ["SNN_DELAYS_NEURON_IMPL"] = "auto"
    ref = next(row for row in rows if row[0] == "dcls")
    print(f"{args.network} batch {batch} on {torch.cuda.get_device_name()}, ratios vs dcls (cuDNN on)")
    print(f"{'variant':40s} {'train ms':>9s} {'eval ms':>8s} {'peak MiB':>9s} {'train x':>8s} {'eval x':>7s}")
    for name, tr, ev, mem in rows:
        print(f"{name:40s} {tr:9.2f} {ev:8.2f} {mem:9.0f} {ref[1] / tr:8.2f} {ref[2] / ev:7.2f}")
    if not args.profile:
        return
    for conv in ("fft", "gemm"):
        os.environ["SNN_DELAYS_CONV_IMPL"] = conv
        train, _ = steps(make(args.network, "fast"), x, y)
        train()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            train()
            torch.cuda.synchronize()
        print(f"one fast training step, SNN_DELAYS_CONV_IMPL={conv}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    os.environ["SNN_DELAYS_CONV_IMPL"] = "auto"


if __name__ == "__main__":
    main()
