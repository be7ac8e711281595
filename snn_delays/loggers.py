"""Experiment loggers: W&B (offline by default), CSV files, or nothing.

All share one small interface: ``log_config``, ``log_metrics``, ``log_figure``,
``log_histogram``, ``finish``. Keys are namespaced (``train/loss``, ``valid/acc``,
``delay/mean_ms/layer0``). Only rank 0 builds a real logger (see :func:`snn_delays.train.run`).
wandb is imported lazily, so the other loggers never pay for it.
"""

from __future__ import annotations

import csv
import io
import json
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

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        pass

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        pass

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

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        path = self.dir / "figures" / f"{name.replace('/', '_')}_{step:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)


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
        self.run = wandb.init(
            project=project,
            mode=mode,
            entity=entity,
            group=group,
            name=name,
            tags=list(tags or []),
            dir=str(self.run_dir),
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({"epoch": step, **metrics})

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        # wandb.Image(figure) expects a pyplot figure (it looks up matplotlib.pyplot, which our
        # pyplot-free figures never import): hand it the figure rendered as a PNG image instead
        from PIL import Image

        from snn_delays.plots import FIGURE_DPI  # as saved into figures/

        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=FIGURE_DPI)
        buf.seek(0)
        with Image.open(buf) as image:
            self.run.log({"epoch": step, name: self._wandb.Image(image.convert("RGB"))})

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        self.run.log({"epoch": step, name: self._wandb.Histogram(values)})

    def finish(self) -> None:
        self.run.finish()
