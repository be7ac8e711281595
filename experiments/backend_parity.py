"""Train the SHD recipe with both delay backends on the same SHD-layout files; compare.

    python experiments/backend_parity.py --root /tmp/parity --epochs 6
    python experiments/backend_parity.py --root /tmp/parity_hard --jitter-ms 12 --noise 400 --n-train 2048

Writes ``shd_train.h5`` / ``shd_test.h5`` in the exact SHD HDF5 layout (700 channels, times in
seconds) holding a timing task: each class is a fixed pattern of one spike per channel group
at class-specific times, shifted and jittered per sample, plus background spikes. Unless
``--root`` already holds SHD files (then they are used as they are: point it at real data).
Then runs ``snn-delays-train dataset=shd`` once per backend with the same seed and prints test
accuracy, training time and peak memory (``peak_memory_mib`` of ``metrics.json``: each backend
trains in its own process, so on CUDA it is that whole run's allocator peak, evaluation
included) side by side. A backend named ``fast+graphs`` is the fast backend
with ``trainer.cuda_graphs=true`` (on a GPU: ``--backends fast,fast+graphs,dcls``). As in
``bench.py`` on CUDA, ``dcls`` runs spikingjelly's LIF there (the published code path, and
CUDA's default before the Triton LIF); elsewhere each backend runs the default neurons
(``SNN_DELAYS_NEURON_IMPL``, else ``auto``: the fused C LIF on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch


def write_shd_file(
    path: Path,
    n: int,
    n_classes: int,
    rng: np.random.Generator,
    patterns: np.ndarray,
    jitter_s: float = 0.002,
    n_noise: int = 60,
) -> None:
    times, units, labels = [], [], []
    for _ in range(n):
        c = int(rng.integers(n_classes))
        start = rng.uniform(0.0, 0.2)
        t = np.clip(start + patterns[c] + rng.normal(0, jitter_s, patterns.shape[1]), 0.0, None)
        u = np.arange(patterns.shape[1]) * 5 + rng.integers(0, 5, patterns.shape[1])
        noise = rng.uniform(0, 0.6, n_noise)
        t, u = np.concatenate([t, noise]), np.concatenate([u, rng.integers(0, 700, n_noise)])
        order = np.argsort(t)
        times.append(t[order].astype(np.float32))
        units.append(u[order].astype(np.uint16))
        labels.append(c)
    with h5py.File(path, "w") as f:
        t_set = f.create_dataset("spikes/times", (n,), dtype=h5py.vlen_dtype(np.float32))
        u_set = f.create_dataset("spikes/units", (n,), dtype=h5py.vlen_dtype(np.uint16))
        for i in range(n):
            t_set[i], u_set[i] = times[i], units[i]
        f.create_dataset("labels", data=np.array(labels, dtype=np.uint16))
        f.create_dataset("extra/keys", data=np.array([f"class{c}".encode() for c in range(n_classes)]))
        f.create_dataset("extra/speaker", data=np.zeros(n, dtype=np.uint16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/snn_delays_parity"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jitter-ms", type=float, default=2.0, help="timing jitter of each pattern spike")
    parser.add_argument("--noise", type=int, default=60, help="background spikes per sample")
    parser.add_argument("--backends", default="fast,dcls", help="comma-separated: fast, dcls, fast+graphs")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    if not (args.root / "shd_train.h5").exists():
        rng = np.random.default_rng(0)
        patterns = np.stack([rng.permutation(140)[:140] * 0.0015 for _ in range(10)])  # 10 classes, 0-210 ms
        hard = dict(jitter_s=args.jitter_ms / 1000, n_noise=args.noise)
        write_shd_file(args.root / "shd_train.h5", args.n_train, 10, rng, patterns, **hard)
        write_shd_file(args.root / "shd_test.h5", args.n_train // 4, 10, rng, patterns, **hard)
    results = {}
    for backend in args.backends.split(","):
        name, _, extra = backend.partition("+")
        if name not in ("fast", "dcls") or extra not in ("", "graphs"):
            parser.error(f"--backends: unknown entry {backend!r} (fast, dcls, each optionally +graphs)")
        out = args.root / f"run_{backend.replace('+', '_')}"
        shutil.rmtree(out, ignore_errors=True)  # this script's own run folder: each call trains afresh
        cmd = [
            sys.executable,
            "-m",
            "snn_delays.train",
            "dataset=shd",
            f"dataset.root={args.root}",
            "dataset.n_classes=10",
            f"trainer.epochs={args.epochs}",
            f"trainer.batch_size={args.batch}",
            f"model.delay_backend={name}",
            f"trainer.cuda_graphs={str(extra == 'graphs').lower()}",
            "logger=none",
            f"seed={args.seed}",
            "trainer.progress=false",
            f"hydra.run.dir={out}",
        ]
        env = dict(os.environ)
        if name == "dcls" and torch.cuda.is_available():
            env["SNN_DELAYS_NEURON_IMPL"] = "spikingjelly"  # the reference: the published code path
        subprocess.run(cmd, check=True, env=env)
        results[backend] = json.loads((out / "metrics.json").read_text())
    # the first epoch holds the one-time work (JIT compiles, cuFFT plans, autotuning)
    print(
        f"{'backend':12s} {'test_acc':>9s} {'best_test':>9s} {'train s':>8s} {'epoch 1 s':>9s} {'later s':>8s}"
        f" {'peak MiB':>9s}"
    )
    for backend, m in results.items():
        first, *later = m["epoch_train_seconds"]
        print(
            f"{backend:12s} {m['test_acc']:9.4f} {m['best_test_acc']:9.4f} {m['train_seconds']:8.1f} "
            f"{first:9.2f} {statistics.median(later) if later else float('nan'):8.2f} "
            f"{m.get('peak_memory_mib') or float('nan'):9.0f}"
        )
    if {"dcls", "fast"} <= results.keys():
        ratio = results["dcls"]["train_seconds"] / results["fast"]["train_seconds"]
        print(f"training time ratio dcls/fast: {ratio:.2f}")


if __name__ == "__main__":
    main()
