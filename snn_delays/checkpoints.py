"""Read what a training run left behind: checkpoints, the per-epoch history, the data.

A checkpoint (``RUN_DIR/checkpoints/{best,last}.pt``, written by :func:`snn_delays.training.fit`)
holds ``model`` (the state dict), ``config`` (the resolved Hydra config), ``data`` (``n_inputs``,
``n_classes``, ``dt_ms``, ``name``), ``state`` (with the ``history``), ``optim`` and the random
states, ``rng`` (rank 0's) and, under DDP, ``rng_ranks`` (every rank's). The model is rebuilt
from the checkpoint's own config, so no config files are needed to load it.
Checkpoints are unpickled in full (``weights_only=False``): load only files you trust.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from snn_delays.model import DelaySNN

CHECKPOINT_NAMES = ("best", "last")


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be loaded (truncated, empty or not a checkpoint);
    ``why``: what went wrong."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(_unreadable(path, why))
        self.why = why


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint file for ``path``: a ``.pt`` file, a run directory or its ``checkpoints/``."""
    if which not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_NAMES}, got {which!r}")
    path = Path(path).expanduser()
    if path.is_file():
        return path
    for candidate in (path / "checkpoints" / f"{which}.pt", path / f"{which}.pt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no checkpoint at {path} (looked for {path}/checkpoints/{which}.pt and {path}/{which}.pt)"
    )


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/x.pt`` -> ``RUN``)."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dictionary, tensors on the CPU.

    Raises :class:`FileNotFoundError` for a missing file and :class:`UnreadableCheckpointError`
    (naming the file and what to do) for one that cannot be loaded.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a directory, not a checkpoint file: pass RUN_DIR/checkpoints/best.pt (or last.pt), "
            "e.g. find_checkpoint(path, 'best')"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, empty, garbage: torch.load raises many kinds
        raise UnreadableCheckpointError(path, f"{type(err).__name__}: {err}") from err
    if not isinstance(payload, dict):
        raise UnreadableCheckpointError(path, f"holds a {type(payload).__name__}, not a dict")
    return payload


def _unreadable(path: Path, why: str) -> str:
    if path.suffix != ".pt":  # metrics.json, config.yaml, a figure: not a damaged checkpoint
        return (
            f"{path} is not a checkpoint ({why}): snn-delays-train writes RUN/checkpoints/best.pt "
            "and last.pt; pass one of them, or the run folder for its best.pt"
        )
    others = [f"{name}.pt" for name in CHECKPOINT_NAMES if name != path.stem]
    return (
        f"{path}: unreadable checkpoint, truncated or corrupt ({why}), e.g. the run was killed while "
        f"writing it; use the run's other checkpoint ({' / '.join(others)} beside it) instead"
    )


class ForeignCheckpointError(ValueError):
    """A file that loads, but from which the network cannot be rebuilt: not written by
    snn-delays-train, or weights that do not fit its config."""


def model_from_checkpoint(
    payload: dict[str, Any], device: str | torch.device = "cpu", path: str | Path | None = None
) -> DelaySNN:
    """Rebuild the network from the checkpoint's config and load its weights (in eval mode).

    :class:`ForeignCheckpointError` (naming ``path`` when given) where that cannot be done."""
    from hydra.errors import InstantiationException

    from snn_delays.train import build_model  # the trainer's builder, imported late (it registers configs)

    try:
        for key in ("model", "config", "data"):
            if key not in payload:
                raise KeyError(f"not a snn-delays training checkpoint: no {key!r} entry")
        data = payload["data"]
        model = build_model(
            OmegaConf.create(payload["config"]["model"]), data["n_inputs"], data["n_classes"], data["dt_ms"]
        )
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, RuntimeError, InstantiationException) as err:
        where = f"{path}: " if path is not None else ""
        raise ForeignCheckpointError(
            f"{where}cannot rebuild the network from this checkpoint ({type(err).__name__}: "
            f"{str(err).strip()[:600]}); use a checkpoint written by snn-delays-train "
            "(RUN_DIR/checkpoints/best.pt or last.pt)"
        ) from err
    return model.to(device).eval()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DelaySNN, dict, dict]:
    """``(model, config, data_info)`` from a checkpoint file; the model is in eval mode.

    Raises :class:`FileNotFoundError`, :class:`UnreadableCheckpointError` or
    :class:`ForeignCheckpointError`, each naming the file."""
    payload = read_checkpoint(path)
    return model_from_checkpoint(payload, device, path), payload["config"], dict(payload["data"])


def read_history(run_dir: str | Path | None, payload: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Per-epoch rows: ``RUN_DIR/metrics.csv`` when it has rows, else the checkpoint's history."""
    csv_path = Path(run_dir) / "metrics.csv" if run_dir is not None else None
    if csv_path is not None and csv_path.is_file():
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                rows = [
                    {k: _to_float(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)
                ]
        except (UnicodeDecodeError, csv.Error, OSError) as err:  # a damaged file: the checkpoint has them too
            warnings.warn(
                f"{csv_path} is unreadable ({err}); the curves come from the checkpoint", stacklevel=2
            )
            rows = []
        if rows:
            return rows
    if payload is not None:
        return list(payload.get("state", {}).get("history", []))
    return []


def _to_float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def build_data(config: dict[str, Any], download: bool = False) -> Any:
    """The run's :class:`~snn_delays.data.base.DataBundle`, from the checkpoint's dataset config.

    ``download=False`` (the default) keeps an analysis tool from starting a multi-GB download:
    the data must already be under the configured ``root`` (relative to the working directory).
    """
    from hydra.utils import instantiate

    dataset_cfg = dict(config["dataset"])
    if "download" in dataset_cfg:
        dataset_cfg["download"] = download
    return instantiate(OmegaConf.create(dataset_cfg))


def sample_input(data: Any, index: int = 0) -> tuple[torch.Tensor, int]:
    """One sample ``(T, C)`` float, trimmed to its length, from the test split (else valid, train)."""
    for split in (data.test, data.valid, data.train):
        if len(split) > 0:
            index = index % len(split)
            x = split.x[index, : int(split.lengths[index])].float().cpu()
            return x, int(split.y[index])
    raise ValueError(f"dataset {data.name!r} has no samples")
