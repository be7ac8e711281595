"""What is alive at the peak of one eager SHD training (``--eval``: evaluation) step (batch 256, 100 steps), counted.

    SNN_DELAYS_NO_C=fast_delays python experiments/cpu_results/2026-11-28-tensor-model/peak_breakdown.py
    SNN_DELAYS_NO_C=1 SNN_DELAYS_NEURON_IMPL=spikingjelly python .../peak_breakdown.py [--backend dcls]

With ``SNN_DELAYS_NO_C=fast_delays`` the delay layer runs CUDA's operators and the LIF the
fused C kernel, which keeps what CUDA's Triton LIF keeps (see bench.py's docstring); the fast
backend runs the path ``--impl`` (default ``fft``, CUDA's default; ``SNN_DELAYS_CONV_IMPL``). Prints the
peak (new tensors only: the input and parameters are not in it) with the operator at which it
was reached, then every tensor of at least 1 MiB alive there: its size, the index of the
operator that made it, the operator, the shape and dtype it was made with (a view of it may be
what is seen). ``--timeline MIB`` also lists the other local maxima above MIB, ``--ops A:B``
every operator from #A to #B with the live MiB after it. ~20 s on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # experiments/
import bench  # noqa: E402

from snn_delays.memtrack import TensorMemory  # noqa: E402


class PeakSnapshot(TensorMemory):
    """TensorMemory that also records, at each new peak, which of its tensors are alive."""

    def __init__(self, show_at: int | None = None) -> None:
        super().__init__()
        self.show_at, self.at_op = show_at, {}
        self.op_index, self.op = 0, ""
        self.made: dict[int, tuple[int, str, tuple[int, ...], torch.dtype]] = {}
        self.at_peak: dict[int, tuple[int, tuple]] = {}
        self.peak_op = (0, "")
        self.timeline: list[tuple[int, str, float, tuple]] = []  # (op, name, live MiB, out shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.op_index, self.op = self.op_index + 1, str(func)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        self.timeline.append((self.op_index, self.op, self.live_bytes / 2**20, shape))
        if self.op_index == self.show_at:
            self.at_op = {k: (size, self.made[k]) for k, size in self._mine.items()}
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = self._storage(t)
        before = self.peak_bytes
        new = storage is not None and storage._cdata not in self._mine and storage._cdata not in self._foreign
        if new:  # a key of a freed storage can come back for a new one
            self.made[storage._cdata] = (self.op_index, self.op, tuple(t.shape), t.dtype)
        super()._track(t)
        if self.peak_bytes > before:
            self.at_peak = {k: (size, self.made[k]) for k, size in self._mine.items()}
            self.peak_op = (self.op_index, self.op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="fast", choices=("fast", "dcls"))
    parser.add_argument("--network", default="shd", choices=tuple(bench.NETWORKS))
    parser.add_argument("--sigma", type=float, default=0.23)
    parser.add_argument("--impl", default="fft", help="the fast backend's delay path")
    parser.add_argument("--at", type=int, metavar="OP", help="list what is alive after operator #OP instead")
    parser.add_argument(
        "--timeline",
        type=float,
        metavar="MIB",
        help="also list every local maximum of the live tensors above MIB (where else a peak is near)",
    )
    parser.add_argument("--eval", action="store_true", help="an evaluation step (no gradients) instead")
    parser.add_argument(
        "--ops", metavar="A:B", help="also list operators #A to #B with the live MiB after each"
    )
    args = parser.parse_args()
    os.environ["SNN_DELAYS_CONV_IMPL"] = args.impl
    n_in, *_, batch = bench.NETWORKS[args.network]
    model = bench.build_network(args.network, args.backend)
    model.set_sigma(args.sigma)
    model.train(not args.eval)
    gen = torch.Generator().manual_seed(0)
    spikes = torch.rand(100, batch, n_in, generator=gen) < 0.05
    x = spikes.float() * torch.randint(1, 3, spikes.shape, generator=gen)
    with PeakSnapshot(args.at) as mem:
        if args.eval:
            with torch.no_grad():
                model(x)
        else:
            model(x).float().square().mean().backward()
    index, op = mem.peak_op
    print(f"peak {mem.peak_bytes / 2**20:.1f} MiB of new tensors, reached at operator #{index} {op}")
    alive = mem.at_peak
    if args.at is not None:
        print(f"alive after operator #{args.at} {mem.timeline[args.at - 1][1]}:")
        alive = mem.at_op
    for size, (i, made_by, shape, dtype) in sorted(alive.values(), key=lambda v: v[1][0]):
        if size >= 2**20:
            print(f"  {size / 2**20:6.1f} MiB  #{i:<5d} {made_by:42s} {shape} {dtype}")
    if args.timeline is not None:
        line = mem.timeline
        print(
            f"local maxima above {args.timeline:.0f} MiB (operator, live MiB after it, its output's shape):"
        )
        for k, (i, op, live, shape) in enumerate(line):
            before = line[k - 1][2] if k else 0.0
            after = line[k + 1][2] if k + 1 < len(line) else 0.0
            if live >= args.timeline and live >= before and live > after:
                print(f"  #{i:<5d} {op:42s} {live:7.1f}  {shape}")
    if args.ops:
        first, last = (int(v) for v in args.ops.split(":"))
        for i, op, live, shape in mem.timeline[max(first, 1) - 1 : last]:
            print(f"  #{i:<5d} {op:42s} {live:7.1f}  {shape}")


if __name__ == "__main__":
    main()
