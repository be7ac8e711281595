"""``snn-delays-report DIR``: mean ± std over seeds of the runs of a Hydra multirun.

A run directory is one that holds ``.hydra/overrides.yaml`` or ``.hydra/config.yaml``; its numbers
come from ``metrics.json``. Runs are grouped by configuration: their command-line overrides (or,
without them, their resolved config) less the seed and the keys that do not change the experiment
(``IGNORED``: device, logger, progress bar, resume, data location, ...). Each configuration gets one
row: the number of runs n and, over them, the mean and the sample standard deviation (n - 1) of
``METRICS``. The table is printed and written to ``report.csv`` (raw values) and ``report.md``.

Runs that cannot count are skipped with a warning: no ``metrics.json`` (crashed, or still
running), an unreadable or malformed ``metrics.json`` or ``.hydra`` file, fewer epochs than
configured (stopped by a signal, e.g. pre-empted; resume it with ``trainer.resume=true``), or a
null metric (left out of that metric's statistics only).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS = ("test_acc", "best_valid_acc", "best_test_acc", "train_seconds")
# Keys (and their sub-keys) that never distinguish two configurations.
IGNORED = (
    "seed",
    "hydra",
    "logger",
    "trainer.device",
    "trainer.progress",
    "trainer.resume",
    "trainer.save_checkpoints",
    "trainer.eval_batch_size",
    "trainer.cuda_graphs",
    "dataset.root",
    "dataset.download",
    "dataset.cache",
    "dataset.feature_batch_size",
)
# Folders inside a sweep that never hold run directories.
PRUNE = {".hydra", ".submitit", "checkpoints", "wandb", "logs"}


@dataclass
class Run:
    path: Path
    identity: tuple[tuple[str, str], ...]  # sorted (key, value) pairs that define the configuration
    from_overrides: bool  # identity is the command-line overrides (else the whole config)
    seed: str
    metrics: dict[str, float]  # the non-null values of METRICS
    keys: frozenset[str] = frozenset()  # every key of its overrides (or config), ignored ones too


@dataclass
class Group:
    identity: tuple[tuple[str, str], ...]
    runs: list[Run] = field(default_factory=list)
    label: str = ""

    def values(self, metric: str) -> list[float]:
        return [run.metrics[metric] for run in self.runs if metric in run.metrics]


def is_ignored(key: str, ignored: tuple[str, ...] = IGNORED) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith((k + ".", k + "/")) for k in ignored)


def parse_override(override: str) -> tuple[str, str]:
    """``+model.x=3`` -> ``("model.x", "3")``; a deletion ``~key`` keeps its ``~``."""
    key, _, value = override.partition("=")
    return key.lstrip("+"), value


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if not isinstance(node, dict):
        return {prefix: json.dumps(node) if not isinstance(node, str) else node}
    out: dict[str, str] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under ``root`` (itself included) that Hydra ran a job in."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in PRUNE)
        hydra_dir = Path(dirpath) / ".hydra"
        if (hydra_dir / "overrides.yaml").is_file() or (hydra_dir / "config.yaml").is_file():
            found.append(Path(dirpath))
    return sorted(found, key=_job_order)


def _job_order(path: Path) -> tuple:
    # Hydra names sweep jobs "<num>_<overrides>": order 2_ before 10_.
    num, _, _ = path.name.partition("_")
    return (str(path.parent), int(num) if num.isdigit() else -1, path.name)


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _malformed(config: Any, overrides: Any) -> str | None:
    """What is wrong with a run's saved config / overrides, or None if they have the expected shape."""
    if not isinstance(config, dict):
        return f".hydra/config.yaml (a {type(config).__name__}, not a mapping)"
    trainer = config.get("trainer")
    if trainer is not None and not isinstance(trainer, dict):
        return f".hydra/config.yaml (trainer is {trainer!r}, not a mapping)"
    if overrides is not None and not (
        isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)
    ):
        return ".hydra/overrides.yaml (not a list of key=value strings)"
    return None


def load_run(path: Path, root: Path, ignored: tuple[str, ...], warn: list[str]) -> Run | None:
    """The run in ``path``, or None (with a line in ``warn``) when it cannot count."""
    name = str(path.relative_to(root)) if path != root else str(path)
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        warn.append(f"skipped {name}: no metrics.json (crashed, or still running)")
        return None
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError) as err:
        warn.append(f"skipped {name}: unreadable metrics.json ({err})")
        return None
    if not isinstance(metrics, dict):
        warn.append(
            f"skipped {name}: malformed metrics.json (a JSON {type(metrics).__name__}, not an object)"
        )
        return None
    saved = {}
    for file in ("config.yaml", "overrides.yaml"):
        try:
            saved[file] = _read_yaml(path / ".hydra" / file)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            why = " ".join(str(err).split())
            warn.append(f"skipped {name}: unreadable .hydra/{file} ({type(err).__name__}: {why})")
            return None
    config = saved["config.yaml"] or {}
    overrides = saved["overrides.yaml"]
    problem = _malformed(config, overrides)
    if problem is not None:
        warn.append(f"skipped {name}: malformed {problem}")
        return None
    planned = (config.get("trainer") or {}).get("epochs")
    done = metrics.get("epochs")
    if isinstance(planned, int) and isinstance(done, int) and done < planned:
        warn.append(
            f"skipped {name}: stopped after epoch {done} of {planned} (resume it with trainer.resume=true)"
        )
        return None
    values = {m: float(metrics[m]) for m in METRICS if isinstance(metrics.get(m), (int, float))}
    if not values:
        warn.append(f"skipped {name}: metrics.json has none of {', '.join(METRICS)}")
        return None
    missing = [m for m in METRICS if m not in values]
    if missing:
        warn.append(f"{name}: {', '.join(missing)} null or missing, left out of those columns")
    pairs = dict(parse_override(o) for o in overrides) if overrides is not None else flatten(config)
    seed = pairs.get("seed", str(config.get("seed", "?")))
    identity = tuple(sorted((k, v) for k, v in pairs.items() if not is_ignored(k, ignored)))
    return Run(path, identity, overrides is not None, seed, values, frozenset(pairs))


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with the same identity, in order of first appearance, each with a readable label."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        groups.setdefault((run.from_overrides, run.identity), Group(run.identity)).runs.append(run)
    # Without overrides the identity is a whole config: show only the keys that tell groups apart.
    by_config = [g for (from_overrides, _), g in groups.items() if not from_overrides]
    varying = {
        k for g in by_config for k, v in g.identity if any(dict(h.identity).get(k) != v for h in by_config)
    }
    for (from_overrides, _), group in groups.items():
        pairs = [(k, v) for k, v in group.identity if from_overrides or k in varying]
        group.label = ",".join(f"{k}={v}" for k, v in pairs) or "(defaults)"
    return list(groups.values())


def stats(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(metric: str, values: list[float], n_runs: int) -> str:
    mean, std = stats(values)
    if mean is None:
        return "–"
    scale, digits = (100.0, 2) if metric.endswith("_acc") else (1.0, 1)
    text = f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std is not None else "")
    return text + (f" (n={len(values)})" if len(values) != n_runs else "")


def markdown_table(groups: list[Group]) -> str:
    heads = ["configuration", "n", "seeds"] + [m + (" (%)" if m.endswith("_acc") else "") for m in METRICS]
    rows = [
        [g.label, str(len(g.runs)), " ".join(r.seed for r in g.runs)]
        + [_fmt(m, g.values(m), len(g.runs)) for m in METRICS]
        for g in groups
    ]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(groups: list[Group], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["configuration", "n", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n")]
        )
        for g in groups:
            row: list[Any] = [g.label, len(g.runs), " ".join(r.seed for r in g.runs)]
            for m in METRICS:
                mean, std = stats(g.values(m))
                row += [
                    "" if mean is None else repr(mean),
                    "" if std is None else repr(std),
                    len(g.values(m)),
                ]
            writer.writerow(row)


def write_markdown(groups: list[Group], warnings: list[str], root: Path, path: Path) -> None:
    text = [
        f"# Runs under `{root}`",
        "",
        "Mean ± sample standard deviation over the runs (seeds) of each configuration; accuracies in %.",
        "",
        markdown_table(groups),
        "",
    ]
    if warnings:
        text += ["Skipped or incomplete:", ""] + [f"- {w}" for w in warnings] + [""]
    path.write_text("\n".join(text))


def report(
    root: Path, out: Path | None = None, ignored: tuple[str, ...] = IGNORED
) -> tuple[list[Group], list[str]]:
    """Group the runs under ``root``, write report.csv and report.md into ``out`` (default: root)."""
    if not root.is_dir():
        raise SystemExit(f"snn-delays-report: {root} is not a directory")
    run_dirs = find_run_dirs(root)
    if not run_dirs:
        raise SystemExit(
            f"snn-delays-report: no runs under {root} (no folder with .hydra/overrides.yaml "
            "or .hydra/config.yaml); point it at a multirun folder, e.g. multirun/<date>/<time>"
        )
    warnings: list[str] = []
    runs = [run for d in run_dirs if (run := load_run(d, root, ignored, warnings)) is not None]
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if not runs:
        raise SystemExit(
            f"snn-delays-report: none of the {len(run_dirs)} runs under {root} has usable metrics"
        )
    printed = len(warnings)
    for key in ignored:
        if key not in IGNORED and not any(is_ignored(k, (key,)) for run in runs for k in run.keys):
            warnings.append(f"--ignore {key}: no run has that key, so it ignored nothing (a typo?)")
    groups = group_runs(runs)
    for g in groups:
        seeds = [r.seed for r in g.runs]
        if len(set(seeds)) < len(seeds):
            warnings.append(
                f"{g.label}: the same seed more than once ({' '.join(seeds)}): those runs are not independent"
            )
    for line in warnings[printed:]:
        print(f"warning: {line}", file=sys.stderr)
    out = out or root
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(groups, out / "report.csv")
        write_markdown(groups, warnings, root, out / "report.md")
    except OSError as err:
        raise SystemExit(
            f"snn-delays-report: cannot write report.csv and report.md into {out} "
            f"({type(err).__name__}: {err.strerror or err}); pass --out with a folder you can write to"
        ) from err
    return groups, warnings


def _path(text: str) -> Path:
    return Path(text).expanduser()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="snn-delays-report",
        description="Mean ± std over seeds of the runs of a Hydra multirun, one row per configuration.",
    )
    parser.add_argument(
        "dir", type=_path, help="a multirun folder (searched recursively), e.g. multirun/<date>/<time>"
    )
    parser.add_argument(
        "--out", type=_path, default=None, help="where to write report.csv and report.md (default: DIR)"
    )
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="another override key that does not tell configurations apart (repeatable); "
        f"always ignored: {', '.join(IGNORED)}",
    )
    args = parser.parse_args(argv)
    groups, _ = report(args.dir, args.out, IGNORED + tuple(args.ignore))
    print(markdown_table(groups))
    out = args.out or args.dir
    n_runs = sum(len(g.runs) for g in groups)
    print(
        f"\nruns: {n_runs}, configurations: {len(groups)}; wrote {out / 'report.csv'} and {out / 'report.md'}"
    )


if __name__ == "__main__":
    main()
