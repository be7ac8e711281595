"""Where does a GPU training step go? SHD network, batch 256, 100 steps, several variants.

    python experiments/gpu_profile.py [--batch 256] [--steps 100]

Times (CUDA events, median of repeats) the training step (forward + backward + both Adam
steps) and the evaluation step of: the fast backend, the dcls reference (cuDNN on), the dcls
reference with cuDNN off (as the published code ran), the network without delays; then prints
the profiler's top CUDA kernels of one fast training step.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from snn_delays.model import DelaySNN
from snn_delays.training import class_scores


def make(backend: str, delays: str = "learned") -> DelaySNN:
    torch.manual_seed(0)
    model = DelaySNN(140, 20, n_hidden=256, n_layers=2, kernel_size=25, tau=1.005, dropout=0.4,
                     delays=delays, delay_backend=backend).cuda()
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(1)
    x = (torch.rand(args.steps, args.batch, 140, device="cuda") < 0.05).float()
    y = torch.randint(20, (args.batch,), device="cuda")
    rows = []
    for name, backend, delays, cudnn in [("fast", "fast", "learned", True), ("dcls", "dcls", "learned", True),
                                         ("dcls, cuDNN off (published)", "dcls", "learned", False),
                                         ("no delays", "fast", "none", True)]:
        torch.backends.cudnn.enabled = cudnn
        torch.cuda.reset_peak_memory_stats()
        train, evaluate = steps(make(backend, delays), x, y)
        rows.append((name, time_ms(train), time_ms(evaluate), torch.cuda.max_memory_allocated() / 2**20))
    torch.backends.cudnn.enabled = True
    ref = rows[1]
    print(f"{'variant':32s} {'train ms':>9s} {'eval ms':>8s} {'peak MiB':>9s} {'train x':>8s} {'eval x':>7s}")
    for name, tr, ev, mem in rows:
        print(f"{name:32s} {tr:9.2f} {ev:8.2f} {mem:9.0f} {ref[1] / tr:8.2f} {ref[2] / ev:7.2f}")
    train, _ = steps(make("fast"), x, y)
    train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        train()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
