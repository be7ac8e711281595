"""``snn-delays-eval checkpoint=PATH [dataset.root=DIR]``: re-evaluate a checkpoint.

``PATH`` is a ``.pt`` file, or a run folder (or its ``checkpoints/``): its ``best.pt``.

Rebuilds the model from the configuration saved in the checkpoint, evaluates the integer-delay
network (as during training) on the requested splits, prints the results and writes them as
JSON (``eval_<checkpoint name>.json`` beside the checkpoint, e.g. ``eval_best.json``, unless
``output=`` says otherwise).

The data is prepared as in the run that wrote the checkpoint: its saved ``dataset`` section, with
the command line's ``dataset.*`` keys on top. Only the keys that say where the data lies
(``LOCATION_KEYS``: ``root``, ``download``, ...) may differ from the saved ones; another dataset
or other preprocessing (bin width, pooling, split, ...) is refused, as the model was not trained
on it. The model, its hyperparameters and the training settings all come from the checkpoint, so
any key that ``conf/eval.yaml`` does not define is refused too. A refused key, a missing or
unreadable checkpoint or missing data ends the command with exit status 2 and the reason on stderr.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from snn_delays.checkpoints import find_checkpoint, load_checkpoint
from snn_delays.config import TrainerConfig, build
from snn_delays.data.base import progress_bars
from snn_delays.report import flatten, parse_override
from snn_delays.train import CONF_DIR, pick_device, run_interruptibly
from snn_delays.training import evaluate

# The settings of conf/eval.yaml: any other key on the command line is refused.
EVAL_KEYS = ("checkpoint", "device", "batch_size", "splits", "output", "progress", "dataset")
# Dataset keys that say where the data lies or how it is fetched, not what the model sees.
LOCATION_KEYS = ("root", "download", "cache", "feature_batch_size")
_DATASET_KEY = re.compile(r"^\+{0,2}dataset\.")


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys that the evaluator would silently ignore (``+model.n_hidden=...``)."""
    extra = [key for key in cfg if key not in EVAL_KEYS]
    if not extra:
        return
    container = OmegaConf.to_container(cfg, resolve=False)
    names = [k for key in extra for k in (list(flatten(container[key], str(key))) or [str(key)])]
    hint = " (the evaluation device is device=...)" if "trainer" in extra else ""
    raise ValueError(
        f"{', '.join(names)}: not a setting of snn-delays-eval, which takes only "
        f"{', '.join(EVAL_KEYS)}{hint}; the model, its hyperparameters and the training settings come "
        "from the checkpoint and cannot be changed here"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def dataset_config(
    saved: dict[str, Any], requested: DictConfig | None, overrides: Sequence[str]
) -> DictConfig:
    """The checkpoint's dataset config with the user's ``dataset.*`` overrides applied.

    ``requested`` is the composed ``dataset`` section (a group's defaults and/or the overrides) and
    ``overrides`` the command line's overrides (``dataset=NAME``, ``dataset.KEY=VALUE``): only the keys
    named there are taken from ``requested``. Switching to another dataset, an unknown key, or a
    preprocessing key (anything outside ``LOCATION_KEYS``) that differs from the saved value raises
    a ValueError naming it.
    """
    merged = dict(saved)
    if requested is None:
        return OmegaConf.create(merged)
    requested_dict = OmegaConf.to_container(requested, resolve=True)
    assert isinstance(requested_dict, dict)
    keys = [parse_override(o)[0].lstrip("~") for o in overrides]  # a deletion names its key too
    saved_target = saved.get("_target_")
    if "dataset" in keys or "dataset._target_" in keys:
        target = requested_dict.get("_target_")
        if target != saved_target:
            raise ValueError(
                f"dataset: the checkpoint was trained on {saved_target}, not {target}; a model is "
                "evaluated on the data it was trained on: leave out dataset=... (the checkpoint's "
                "dataset is used) and set only its location, e.g. dataset.root=DIR"
            )
    for key in keys:
        if not key.startswith("dataset.") or key == "dataset._target_":
            continue
        name = key.removeprefix("dataset.")
        if name not in saved:
            raise ValueError(
                f"{key}: the checkpoint's dataset ({saved_target}) has no key {name!r}; its keys: "
                f"{', '.join(k for k in saved if k != '_target_')}"
            )
        if name not in requested_dict:
            raise ValueError(f"{key}: cannot delete a key of the checkpoint's dataset config")
        value, old = requested_dict[name], saved[name]
        if name not in LOCATION_KEYS and not _same(value, old):
            raise ValueError(
                f"{key}={value!r} differs from the checkpoint's {key}={old!r}: the model was trained on data "
                f"prepared with {key}={old!r} and would be evaluated on differently prepared data; only "
                f"the location keys ({', '.join(LOCATION_KEYS)}) may change"
            )
        merged[name] = value
    return OmegaConf.create(merged)


def evaluate_checkpoint(
    cfg: DictConfig, overrides: Sequence[str] | None = None, checkpoint: Path | None = None
) -> dict[str, dict[str, float]]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.splits``.

    ``overrides``: the command line's overrides (Hydra's, when it runs this); without them every key
    of ``cfg.dataset`` counts as requested. ``checkpoint``: :func:`checkpoint_file`'s answer,
    where the caller has it.
    """
    check_keys(cfg)
    if cfg.batch_size is not None and (
        isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1
    ):
        raise ValueError(
            f"batch_size must be a whole number >= 1 (or null: the run's), got {cfg.batch_size!r}"
        )
    path = checkpoint or checkpoint_file(cfg)
    requested = cfg.get("dataset")
    if overrides is None:
        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
        else:
            overrides = ["dataset"] + [f"dataset.{k}" for k in requested or {}]
    device = pick_device(cfg.device, key="device")
    model, config, info = load_checkpoint(path, device=device)
    progress = cfg.get("progress", True)
    with progress_bars(progress):
        data = build(dataset_config(config["dataset"], requested, overrides))
    if (data.n_inputs, data.n_classes) != (info["n_inputs"], info["n_classes"]):
        raise ValueError(
            f"{path} was trained on {info['n_inputs']} inputs / {info['n_classes']} classes, but the dataset "
            f"{data.name} has {data.n_inputs} / {data.n_classes}"
        )
    data = data.to(device)
    batch = run_eval_batch_size(config) if cfg.batch_size is None else cfg.batch_size
    results = {}
    for name in cfg.splits:
        split = getattr(data, name, None)
        if split is None:
            raise ValueError(f"splits: unknown split {name!r}; use train, valid or test")
        results[name] = evaluate(model, split, batch, desc=name if progress else None)
    return results


def run_eval_batch_size(config: dict[str, Any]) -> int:
    """The batch the run evaluated in (``trainer.eval_batch_size``): a batch is padded to its
    longest sample and the scores sum over every step, so the batch can change a prediction."""
    trainer = config.get("trainer") or {}
    return int(trainer.get("eval_batch_size") or TrainerConfig.eval_batch_size)


def checkpoint_file(cfg: DictConfig) -> Path:
    """The file ``checkpoint=`` names: a ``.pt`` file, or a run folder or its ``checkpoints/``
    folder (their ``best.pt``, as ``snn-delays-plot`` reads them)."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ValueError(
            "no checkpoint given: snn-delays-eval checkpoint=RUN_DIR (its checkpoints/best.pt) or "
            "checkpoint=RUN_DIR/checkpoints/last.pt"
        )
    if not Path(cfg.checkpoint).expanduser().exists():  # zsh leaves ~ in key=~/x
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such file or folder")
    try:
        return find_checkpoint(cfg.checkpoint, "best")  # the file, or the folder's best.pt
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: {err}") from None


def output_path(cfg: DictConfig, checkpoint: Path | None = None) -> Path:
    """``output=``, else ``eval_<stem>.json`` beside the checkpoint (best.pt -> eval_best.json);
    ``checkpoint``: :func:`checkpoint_file`'s answer, where the caller has it."""
    if cfg.output:
        return Path(cfg.output).expanduser()
    checkpoint = checkpoint or checkpoint_file(cfg)
    return checkpoint.with_name(f"eval_{checkpoint.stem}.json")


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        checkpoint = checkpoint_file(cfg)
        results = evaluate_checkpoint(cfg, checkpoint=checkpoint)
    except (FileNotFoundError, ValueError) as err:  # Unreadable- and ForeignCheckpointError are ValueErrors
        print(f"snn-delays-eval: {err}", file=sys.stderr)
        sys.exit(2)
    for name, r in results.items():
        print(f"{name}: acc {r['acc']:.4f}  loss {r['loss']:.4f}")
    out = output_path(cfg, checkpoint)
    out.write_text(json.dumps({"checkpoint": str(checkpoint), **results}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    # dataset.KEY=VALUE must work without a dataset group (the checkpoint's dataset is used, and
    # eval.yaml has none): force-add it, so it also sets a key a chosen group already has.
    sys.argv[1:] = [_DATASET_KEY.sub("++dataset.", arg) for arg in sys.argv[1:]]
    run_interruptibly(_hydra_main)


if __name__ == "__main__":
    main()
