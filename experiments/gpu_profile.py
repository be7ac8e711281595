"""Where does a GPU training step go? SHD (or SSC) network, 100 steps, several variants.

    python experiments/gpu_profile.py [--network shd|ssc] [--batch 256] [--steps 100] [--profile]

Times (CUDA events, median of repeats) the training step (forward + backward + one Adam step)
and the evaluation step of: the fast backend (GEMM path on CUDA), the dcls reference (cuDNN
on), the fast backend on the Triton implicit GEMMs (``SNN_DELAYS_CONV_IMPL=triton``: no unfold
copy), the GEMM and Triton paths with each step captured once as a CUDA graph and replayed
(the step is host-bound: this is what removes the launch overhead), the fast backend on the
spectral path (``SNN_DELAYS_CONV_IMPL=fft``: cuFFT and complex
products), the fast backend forced onto conv1d (``SNN_DELAYS_CONV_IMPL=dense``, the previous
CUDA path), the dcls reference with cuDNN off (as the published code ran), the network without
delays; peak memory of each; with ``--profile`` the profiler's top CUDA kernels of one fast
step.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from bench import NETWORKS, build_network  # one table of the published networks (run from experiments/)

from snn_delays.model import DelaySNN
from snn_delays.training import class_scores


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


def steps(model: DelaySNN, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train() -> None:
        model.train()
        loss = F.cross_entropy(class_scores(model(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_positions()

    @torch.no_grad()
    def evaluate() -> None:
        model.eval()
        class_scores(model(x)).argmax(-1)

    return train, evaluate


def graphed_steps(model: DelaySNN, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    """The same two steps, each captured once as a CUDA graph (static x, y, sigma) and replayed."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)

    def train_body() -> None:
        model.train()
        F.cross_entropy(class_scores(model(x)), y).backward()
        opt.step()
        model.clamp_positions()

    def eval_body() -> None:
        model.eval()
        with torch.no_grad():
            class_scores(model(x)).argmax(-1)

    graphs = []
    for body in (train_body, eval_body):
        side = torch.cuda.Stream()  # warm-up (and Triton autotuning) off the capturing stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                body()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)  # backward in the capture allocates .grad from its pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        graphs.append(graph)
    return graphs[0].replay, graphs[1].replay


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
        ("fast (GEMM)", "fast", "learned", True, "auto"),
        ("dcls", "dcls", "learned", True, "auto"),
        ("fast, triton", "fast", "learned", True, "triton"),
        ("fast (GEMM), CUDA graph", "fast", "learned", True, "auto+graph"),
        ("fast, triton, CUDA graph", "fast", "learned", True, "triton+graph"),
        ("fast, spectral (cuFFT)", "fast", "learned", True, "fft"),
        ("fast, conv1d path (previous)", "fast", "learned", True, "dense"),
        ("dcls, cuDNN off (published)", "dcls", "learned", False, "auto"),
        ("no delays", "fast", "none", True, "auto"),
    ]
    for name, backend, delays, cudnn, conv in variants:
        torch.backends.cudnn.enabled = cudnn
        conv, graph = conv.split("+")[0], conv.endswith("+graph")
        os.environ["SNN_DELAYS_CONV_IMPL"] = conv
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model = make(args.network, backend, delays)
            train, evaluate = (graphed_steps if graph else steps)(model, x, y)
            rows.append((name, time_ms(train), time_ms(evaluate), torch.cuda.max_memory_allocated() / 2**20))
        except Exception as err:  # noqa: BLE001 - report the variant that failed, time the rest
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
            torch.cuda.synchronize()
            continue
        print(name, rows[-1][1:], flush=True)
    torch.backends.cudnn.enabled = True
    os.environ["SNN_DELAYS_CONV_IMPL"] = "auto"
    ref = next(row for row in rows if row[0] == "dcls")
    print(f"{args.network} batch {batch} on {torch.cuda.get_device_name()}, ratios vs dcls (cuDNN on)")
    print(f"{'variant':32s} {'train ms':>9s} {'eval ms':>8s} {'peak MiB':>9s} {'train x':>8s} {'eval x':>7s}")
    for name, tr, ev, mem in rows:
        print(f"{name:32s} {tr:9.2f} {ev:8.2f} {mem:9.0f} {ref[1] / tr:8.2f} {ref[2] / ev:7.2f}")
    if not args.profile:
        return
    for conv in ("auto", "triton"):
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
