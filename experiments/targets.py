"""The fast-delays issue's targets against benchmark results: met or missed, row by row.

    python experiments/bench.py --device cuda --networks shd,ssc --backends dcls,fast+graphs --json gpu.json
    python experiments/targets.py gpu.json [more.json ...]

The targets, each against the reference row (``dcls``, the first of its network and sigma)
measured in the same run, on the same inputs:

- CUDA: SHD (batch 256, 100 steps) training step <= 5 ms and evaluation step <= 2 ms; SSC (batch
  128) training step <= 10 ms; on both, training and evaluation peaks no higher than the
  reference's.
- CPU: SHD training step at least 5x faster than the reference, evaluation at least 10x.

Every fast row is judged, so that a run of variants (``gpu_check.sh`` part 8: evaluation blocks,
float16 operands) shows which of them meet every target. The default is marked: ``fast+graphs``
on CUDA (the trainer replays its steps from CUDA graphs there), ``fast`` on the CPU. A row
benchmarked at another batch or number of steps than the target's is judged but flagged, and a
``+graphs`` row whose capture failed (it ran eagerly) is not the default. Exit status: 1 when the
default misses a target or was not benchmarked where a target applies, no row was judged (no
target applies to the networks benchmarked, e.g. SSC alone on the CPU), or bench.py was stopped
before its last row (``meta.finished`` false), else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple


class Target(NamedTuple):
    network: str
    batch: int
    train_ms: float | None = None  # the step's time at most
    eval_ms: float | None = None
    train_x: float | None = None  # the reference's time over the step's at least
    eval_x: float | None = None
    peaks: bool = False  # training and evaluation peaks at most the reference's


TIME_STEPS = 100
TARGETS = {
    "cuda": (
        Target("shd", 256, train_ms=5, eval_ms=2, peaks=True),
        Target("ssc", 128, train_ms=10, peaks=True),
    ),
    "cpu": (Target("shd", 256, train_x=5, eval_x=10),),
}
DEFAULT = {"cuda": "fast+graphs", "cpu": "fast"}
REFERENCE = "dcls"


def device_kind(meta: dict) -> str:
    """``cuda`` or ``cpu`` (the keys of :data:`TARGETS`), else the device's type."""
    return str(meta.get("device", "cpu")).split(":")[0]


def checks(row: dict, ref: dict, target: Target) -> list[tuple[str, bool]]:
    """(label, met) for each of ``target``'s limits, ``row`` against the reference row."""
    out = []
    for key, limit, name in (("train_s", target.train_ms, "train"), ("eval_s", target.eval_ms, "eval")):
        if limit is not None:
            ms = row[key] * 1e3
            out.append((f"{name} {ms:.1f} ms (<= {limit:g})", ms <= limit))
    for key, limit, name in (("train_s", target.train_x, "train"), ("eval_s", target.eval_x, "eval")):
        if limit is not None:
            ratio = ref[key] / row[key]
            out.append((f"{name} x{ratio:.2f} (>= {limit:g})", ratio >= limit))
    if target.peaks:
        for key, name in (("peak_mib", "train peak"), ("eval_peak_mib", "eval peak")):
            mine, theirs = row.get(key), ref.get(key)
            if mine is None or theirs is None:
                out.append((f"{name} not measured", False))
            else:
                out.append((f"{name} {mine:.0f} MiB (<= {theirs:.0f})", mine <= theirs))
    return out


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _setting(row: dict, target: Target) -> str:
    """What differs from the target's setting (batch, steps), or ``''``."""
    batch, steps = row.get("batch"), row.get("time_steps")
    if batch is None or steps is None:
        return "batch and steps not recorded"
    off = [f"batch {batch}, not {target.batch}"] if batch != target.batch else []
    off += [f"{steps} steps, not {TIME_STEPS}"] if steps != TIME_STEPS else []
    return "; ".join(off)


def judge(data: dict, source: str = "") -> dict:
    """Print the verdicts of one benchmark's results (``bench.py --json``'s contents); return
    ``{"device", "verdicts": [...], "default_met": bool}``, a verdict being ``{"network",
    "sigma", "backend", "default", "met", "checks", "setting"}``."""
    meta, results = data.get("meta", {}), data.get("results", [])
    kind = device_kind(meta)
    targets = {t.network: t for t in TARGETS.get(kind, ())}
    print(f"{kind} ({meta.get('gpu') or meta.get('device', '?')}, torch {meta.get('torch', '?')}){source}")
    stopped = meta.get("finished") is False  # bench.py was stopped part-way (a timeout)
    if stopped:
        print("bench.py stopped before its last row: only the rows below were measured")
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in results:
        groups.setdefault((row["network"], row["sigma"]), []).append(row)
    verdicts, default_met = [], True
    for (net, sigma), rows in groups.items():
        target = targets.get(net)
        if target is None:
            print(f"{net} sigma {sigma:g}: no target on {kind}")
            continue
        ref = rows[0]
        if ref["backend"] != REFERENCE:
            print(
                f"{net} sigma {sigma:g}: the first row is {ref['backend']!r}, not the reference {REFERENCE!r}"
            )
            default_met = False
            continue
        print(
            f"{net} sigma {sigma:g}; reference {REFERENCE}: train {ref['train_s'] * 1e3:.1f} ms, "
            f"eval {ref['eval_s'] * 1e3:.1f} ms, peaks {_mib(ref.get('peak_mib'))} / {_mib(ref.get('eval_peak_mib'))} MiB"
        )
        seen_default = False
        for row in rows[1:]:
            found = checks(row, ref, target)
            met = all(ok for _, ok in found)
            is_default = row["backend"] == DEFAULT.get(kind)
            seen_default |= is_default
            setting = _setting(row, target)
            verdicts.append(
                dict(
                    network=net,
                    sigma=sigma,
                    backend=row["backend"],
                    default=is_default,
                    met=met,
                    checks=found,
                    setting=setting,
                )
            )
            if is_default and not met:
                default_met = False
            marks = " | ".join(f"{label} {'ok' if ok else 'MISSED'}" for label, ok in found)
            print(
                f"  {'*' if is_default else ' '} {row['backend']:38s} {'meets all' if met else 'misses':9s}  "
                f"{marks}{f'  [{setting}]' if setting else ''}"
            )
        if not seen_default and kind in DEFAULT:
            print(f"  the default ({DEFAULT[kind]}) was not benchmarked")
            default_met = False
    if not verdicts:
        have = ", ".join(sorted({net for net, _ in groups})) or "no rows"
        want = ", ".join(sorted(targets)) or "none"
        print(f"no row judged: {have} benchmarked, targets on {kind}: {want} (exit status 1)")
    else:
        print(
            f"default ({DEFAULT.get(kind)}, marked *): {'meets every target' if default_met else 'MISSES a target'}"
        )
        for (net, sigma), _ in groups.items():
            good = [v["backend"] for v in verdicts if (v["network"], v["sigma"]) == (net, sigma) and v["met"]]
            if net in targets:
                print(f"rows meeting every target, {net} sigma {sigma:g}: {', '.join(good) or 'none'}")
    return dict(device=kind, verdicts=verdicts, default_met=default_met and bool(verdicts) and not stopped)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="bench.py --json files")
    args = parser.parse_args(argv)
    reports = []
    for i, name in enumerate(args.results):
        path = Path(name)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"{path}: not a bench.py --json file ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise SystemExit(f"{path}: no 'results' list (write it with bench.py --json)")
        if i:
            print()
        reports.append(judge(data, source=f", {path}"))
    return reports


if __name__ == "__main__":
    sys.exit(0 if all(r["default_met"] for r in main()) else 1)
