"""Experiment loggers: W&B (offline by default), CSV files, or nothing.

All share one small interface: ``log_config``, ``log_metrics``, ``log_figure``,
``log_histogram``, ``preempted``, ``finish``. Keys are namespaced (``train/loss``, ``valid/acc``,
``delay/mean_ms/layer0``). Only rank 0 builds a real logger (see :func:`snn_delays.train.run`).
wandb is imported lazily, so the other loggers never pay for it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any


class NullLogger:
    """Logs nothing (``logger=none``)."""

    def __init__(self, run_dir: str | Path | None = None, **_: Any) -> None:
        self.run_dir = Path(run_dir) if run_dir else None
        self.run_id: str | None = None

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_figure(self, name: str, figure: Any, step: int, png: bytes | None = None) -> None:
        """``png``: the figure already rendered (:func:`snn_delays.plots.log_figures`), else drawn here."""

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        pass

    def preempted(self, signum: int) -> None:
        """Training was stopped by signal ``signum`` (SLURM pre-emption, ``scancel``) before its
        last epoch, to be resumed: called just before :meth:`finish`."""

    def finish(self) -> None:
        pass


class CSVLogger(NullLogger):
    """Appends every logged metric to ``<run_dir>/logs/metrics.csv`` (``logger=csv``).

    A resumed run keeps the rows its file already holds for earlier steps (a run started over
    in the same folder replaces them from its first step on).
    """

    def __init__(self, run_dir: str | Path, **_: Any) -> None:
        super().__init__(run_dir)
        self.dir = self.run_dir / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, float]] = self._earlier_rows(self.dir / "metrics.csv")

    @staticmethod
    def _earlier_rows(path: Path) -> list[dict[str, float]]:
        if not path.is_file():
            return []
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [
                    {k: float(v) for k, v in row.items() if k is not None and v not in (None, "")}
                    for row in csv.DictReader(f)
                ]
            return [{**row, "step": int(row["step"])} for row in rows if "step" in row]
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:
            warnings.warn(f"{path}: earlier rows unreadable ({err}); the file is rewritten", stacklevel=3)
            return []

    def log_config(self, config: dict[str, Any]) -> None:
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows = [row for row in self.rows if row["step"] < step]  # a step logged again replaces
        self.rows.append({"step": step, **metrics})
        keys = sorted({k for row in self.rows for k in row} - {"step"})
        with open(self.dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *keys])
            writer.writeheader()
            writer.writerows(self.rows)

    def log_figure(self, name: str, figure: Any, step: int, png: bytes | None = None) -> None:
        from snn_delays.plots import png_bytes  # as saved into figures/

        path = self.dir / "figures" / f"{name.replace('/', '_')}_{step:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png if png is not None else png_bytes(figure))


class WandbLogger(NullLogger):
    """Weights & Biases. ``mode=offline`` (default) needs no account; ``online`` streams."""

    def __init__(
        self,
        run_dir: str | Path,
        project: str = "snn-delays",
        mode: str = "offline",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
        **_: Any,
    ) -> None:
        super().__init__(run_dir)
        import wandb  # lazy: importing wandb is slow and only this logger needs it

        self._wandb = wandb
        self._started = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)  # wandb 0.16 logs elsewhere if it is missing
        default_group, default_name = _default_group_and_name()
        try:
            self.run = wandb.init(
                project=project,
                mode=mode,
                entity=entity,
                group=group if group is not None else default_group,
                name=name if name is not None else default_name,
                tags=list(tags or []),
                dir=str(self.run_dir),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as err:  # noqa: BLE001 - say what failed and what to do, at start-up
            raise RuntimeError(
                f"W&B could not start a {mode} run in {self.run_dir / 'wandb'}: {type(err).__name__}: "
                f"{err}. Train with logger.mode=offline (no network needed), logger=csv or logger=none"
            ) from err
        self.run_id = self.run.id
        self._exit_code = 0
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    # W&B's step is the epoch: an epoch's metrics, figures and histograms share one history row,
    # and a resumed run (offline too, whose segments `wandb sync` joins) continues its steps.
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({"epoch": step, **metrics}, step=step)

    def log_figure(self, name: str, figure: Any, step: int, png: bytes | None = None) -> None:
        # wandb.Image(figure) expects a pyplot figure (it looks up matplotlib.pyplot, which our
        # pyplot-free figures never import): hand it the figure rendered as a PNG image instead
        from PIL import Image

        from snn_delays.plots import png_bytes  # as saved into figures/

        with Image.open(io.BytesIO(png if png is not None else png_bytes(figure))) as image:
            self.run.log({"epoch": step, name: self._wandb.Image(image.convert("RGB"))}, step=step)

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        self.run.log({"epoch": step, name: self._wandb.Histogram(values)}, step=step)

    def preempted(self, signum: int) -> None:
        # W&B's pre-emption protocol: marked pre-empting, then finished with a non-zero code
        # (128 + signum, as a shell reports it), the run shows as "preempted", not "finished",
        # until a resumed run finishes it. Not in a W&B sweep: there SIGTERM is the agent's own
        # early stop (hyperband), and the sweep would requeue a pre-empted run it meant to end.
        if os.environ.get("WANDB_SWEEP_ID"):
            return
        self.run.mark_preempting()
        self._exit_code = 128 + int(signum)

    def finish(self) -> None:
        # The run's summary: what runs are compared on (metrics.json, written by the trainer just
        # before), not only each key's last epoch.
        path = self.run_dir / "metrics.json"
        try:
            if path.is_file() and path.stat().st_mtime >= self._started - 1:
                self.run.summary.update(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            warnings.warn(f"{path}: not added to the W&B summary ({err})", stacklevel=2)
        self.run.finish(exit_code=self._exit_code)


def _default_group_and_name() -> tuple[str | None, str | None]:
    """For a Hydra job: its command-line overrides less those that do not change the experiment
    (as ``snn-delays-report`` groups runs), without the seed (the group) and with it (the name).
    None outside Hydra, for a W&B sweep's runs, or without such overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if os.environ.get("WANDB_SWEEP_ID") or not HydraConfig.initialized():
            return None, None
        overrides = sorted(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - the defaults are a convenience
        return None, None
    from snn_delays.report import IGNORED, is_ignored, parse_override

    keep = tuple(k for k in IGNORED if k != "seed")
    named = [o for o in overrides if not is_ignored(parse_override(o)[0], keep)]
    grouped = [o for o in named if not is_ignored(parse_override(o)[0])]
    return _at_most_128(",".join(grouped)), _at_most_128(",".join(named))


def _at_most_128(text: str) -> str | None:
    """W&B refuses a group or name over 128 characters: a long one is cut and told apart by a hash."""
    if len(text) <= 128:
        return text or None
    return f"{text[:119]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"
