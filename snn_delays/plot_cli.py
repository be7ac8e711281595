"""``snn-delays-plot RUN_DIR_OR_CHECKPOINT``: every figure of a trained run as PNG files.

Reads the checkpoint (``--checkpoint best|last`` of a run directory, or a ``.pt`` file), the
per-epoch history (``metrics.csv``, else the checkpoint's), the position trace
(``positions.npz``) when the run recorded one, and, for the spike raster only, one test sample
of the run's dataset (which must already be on disk; ``--no-data`` skips it). Also
``python -m snn_delays.plot_cli``.

Exit status: 0 when every figure was written; 1 when some could not be (the others are);
2 when none is drawn: no checkpoint, an unreadable one or one that snn-delays-train did not
write, or an output folder that cannot be written to.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from snn_delays.checkpoints import (
    build_data,
    find_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    read_history,
    run_dir_of,
    sample_input,
)
from snn_delays.plots import PositionTrace, figures_for_run, log_figures

TRACE_FILE = "positions.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="snn-delays-plot", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("path", type=_path, help="a run directory (with checkpoints/) or a checkpoint file")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which checkpoint of a run directory (default: best)",
    )
    parser.add_argument("--out", type=_path, default=None, help="output folder (default: RUN_DIR/figures)")
    parser.add_argument("--no-data", action="store_true", help="skip the spike raster (it needs the dataset)")
    parser.add_argument(
        "--download",
        action="store_true",
        help="let the dataset loader download missing files for the raster (may be GBs)",
    )
    parser.add_argument("--sample", type=int, default=0, help="test-set sample of the raster (default: 0)")
    parser.add_argument(
        "--device", type=_device, default="cpu", help="device for the raster's forward pass (default: cpu)"
    )
    parser.add_argument(
        "--dpi", type=_positive_int, default=120, help="resolution of the PNG files (default: 120)"
    )
    return parser.parse_args(argv)


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of dots per inch")
    return value


def _device(text: str) -> str:
    """``text`` if torch can allocate on it here, else an argparse error saying why."""
    try:
        torch.empty(0, device=text)
    except (RuntimeError, AssertionError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot be used on this machine ({why}); pass --device cpu (the default)"
        ) from err
    return text


def raster_sample(config: dict, index: int, download: bool = False) -> tuple | None:
    """``(x, label, class_names)`` of one sample, or ``None`` (with a message) if the data is missing."""
    try:
        data = build_data(config, download=download)
        splits = (("test", data.test), ("valid", data.valid), ("train", data.train))  # sample_input's order
        split, n = next(((name, len(s)) for name, s in splits if len(s) > 0), ("test", 0))
        if n and not -n <= index < n:  # sample_input would wrap it round to another sample
            print(
                f"snn-delays-plot: skipping the spike raster: --sample {index} is out of range: the run's "
                f"{split} split has {n} samples (0 to {n - 1})",
                file=sys.stderr,
            )
            return None
        x, label = sample_input(data, index)
        return x, label, data.class_names
    except Exception as err:  # noqa: BLE001 - any failure to load data only costs the raster
        name = config.get("dataset", {}).get("_target_", "?")
        print(
            f"snn-delays-plot: skipping the spike raster: could not load the dataset ({name}): "
            f"{type(err).__name__}: {err}\n  (the data must be under the run's dataset.root, relative to the "
            "current directory; pass --no-data to skip this step, --download to fetch it)",
            file=sys.stderr,
        )
        return None


def load_trace(path: Path) -> PositionTrace | None:
    """The run's position trace, or ``None`` (with a warning if the file is there but unreadable)."""
    if not path.is_file():
        return None
    try:
        return PositionTrace.load(path)
    except Exception as err:  # noqa: BLE001 - a damaged trace only costs the figures drawn from it
        print(
            f"snn-delays-plot: warning: skipping the position-trace figures: {path} is unreadable "
            f"(truncated or corrupt: {type(err).__name__}: {err}); the other figures are still drawn",
            file=sys.stderr,
        )
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ckpt = find_checkpoint(args.path, args.checkpoint)
        payload = read_checkpoint(ckpt)
        model = model_from_checkpoint(payload, args.device, ckpt)
    except (FileNotFoundError, ValueError) as err:  # Unreadable- and ForeignCheckpointError are ValueErrors
        print(f"snn-delays-plot: {err}", file=sys.stderr)
        return 2
    run_dir = run_dir_of(ckpt)
    out = args.out if args.out is not None else run_dir / "figures"
    problem = unwritable(out)
    if problem:
        print(
            f"snn-delays-plot: cannot write the figures into {out} ({problem}); "
            "pass --out with a folder you can write to",
            file=sys.stderr,
        )
        return 2
    history = read_history(run_dir, payload)
    trace = load_trace(run_dir / TRACE_FILE)
    sample = None if args.no_data else raster_sample(payload["config"], args.sample, args.download)
    x, label, names = sample if sample is not None else (None, None, None)
    figures = figures_for_run(model, history, trace, x, label, names)
    n_figures = len(figures)  # log_figures closes them
    paths = log_figures(None, figures, int(payload.get("state", {}).get("epoch", 0)), out, dpi=args.dpi)
    print(f"{ckpt}: {len(paths)} figures")
    for path in paths:
        print(path)
    if len(paths) < n_figures:
        print(
            f"snn-delays-plot: {n_figures - len(paths)} of {n_figures} figures could not be written into "
            f"{out} (see the warnings above)",
            file=sys.stderr,
        )
        return 1
    return 0


def unwritable(folder: Path) -> str | None:
    """Why figures cannot be written into ``folder`` (created if missing), or ``None`` if they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


if __name__ == "__main__":
    sys.exit(main())
