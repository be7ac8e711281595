"""Shared helpers: run the console scripts as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Without a GPU, Triton kernels run in its interpreter on CPU tensors in the tests. Triton
# decorates its own library functions when first imported (spikingjelly imports it), so this
# must come first. With a GPU the kernels stay compiled (spikingjelly's CUDA LIF is Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_cli(
    module: str,
    *args: str,
    check: bool = True,
    timeout: int = 600,
    cwd: Path | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """``python -m snn_delays.<module> ARGS`` with quiet progress; returns the finished process."""
    full_env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", f"snn_delays.{module}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def run_at_once(target, *args, n: int = 2, timeout: int = 120) -> list:  # noqa: ANN001
    """``target(*args, start, out)`` in ``n`` spawned processes released together (as torchrun's
    ranks reach a first download or cache build): what each put on ``out``, in arrival order."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def triton_interpreted():  # noqa: ANN201
    """:mod:`snn_delays.triton_delays` in Triton's interpreter (CPU tensors); skip without triton."""
    pytest.importorskip("triton")
    import snn_delays.triton_delays as mod

    if not mod.INTERPRET:
        pytest.skip("Triton compiled, not interpreted (a GPU, or TRITON_INTERPRET=0): CPU tensors cannot run")
    return mod
