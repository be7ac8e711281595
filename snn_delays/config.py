"""Structured config schemas, registered in Hydra's ConfigStore, and the start-up key check.

The groups that are not instantiated as a whole (``trainer``, ``optim``) get a dataclass
schema, so a mistyped key in a YAML file or on the command line fails when the config is
composed, not hours into a cluster job. A key added with ``+`` passes any schema (Hydra adds
it by force), and the instantiated groups (``dataset``, ``model``, ``logger``, ``augment``)
would refuse an unknown argument only when built, the model after its data were downloaded
and prepared (the loggers not at all: they take ``**kwargs``): :func:`check_config` refuses
them all from the composed config, before anything is read.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig


@dataclass
class TrainerConfig:
    epochs: int = 150
    batch_size: int = 256
    eval_batch_size: int = 512
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    save_checkpoints: bool = True
    resume: Any = False  # false | true (this run's last.pt) | a checkpoint, run folder or checkpoints/ folder
    cuda_graphs: Any = "auto"  # auto (on for one CUDA process) | true | false: CUDA-graph replays


@dataclass
class OptimConfig:
    weights: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    )
    weight_decay: float = 1e-5  # on synaptic weights only
    weights_scheduler: Any = field(
        default_factory=lambda: {
            "_target_": "torch.optim.lr_scheduler.OneCycleLR",
            "_partial_": True,
            "max_lr": 5e-3,
        }
    )
    positions: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1}
    )
    positions_scheduler: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True}
    )
    sigma_final: float = 0.23
    sigma_decay_fraction: float = 0.25  # sigma decays during the first epochs * fraction epochs


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)


# --- the start-up check ---------------------------------------------------------------------
TOP_KEYS = ("dataset", "model", "optim", "trainer", "logger", "augment", "seed")
_META = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
# Arguments the trainer passes itself (snn_delays/train.py), not config keys: what to set instead.
_BY_TRAINER = "set by the trainer, not by the config"
SUPPLIED = {
    "model": dict.fromkeys(("n_inputs", "n_classes", "dt_ms"), _BY_TRAINER + " (from the data)"),
    "augment": {"n_classes": _BY_TRAINER + " (from the data)"},
    "logger": dict.fromkeys(("run_dir", "run_id"), _BY_TRAINER),
    "optim.weights": {
        "params": _BY_TRAINER,
        "weight_decay": "set optim.weight_decay (synaptic weights only)",
    },
    "optim.positions": {"params": _BY_TRAINER},
    "optim.weights_scheduler": {
        "optimizer": _BY_TRAINER,
        "total_steps": "set by the trainer: trainer.epochs",
    },
    "optim.positions_scheduler": {"optimizer": _BY_TRAINER, "T_max": "set by the trainer: trainer.epochs"},
}
LOGGER_KEYS = ("figure_every",)  # read by the trainer, not passed on: loggers take **kwargs for it


def _accepted(target: Any, extra: tuple[str, ...] = ()) -> set[str] | None:
    """The keyword arguments ``target`` takes, plus ``extra`` (None: any, or a target that cannot
    be resolved, left for ``instantiate`` to report)."""
    try:
        params = inspect.signature(get_method(str(target))).parameters.values()
    except Exception:  # noqa: BLE001 - a bad _target_ is instantiate's to name
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params) and not extra:
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} | set(extra)


def _unknown(node: Any, path: str, known: set[str] | None) -> list[str]:
    if known is None or not isinstance(node, DictConfig):
        return []
    supplied = SUPPLIED.get(path, {})
    known = known - set(supplied)
    bad = []
    for key in node:
        if key in supplied:
            bad.append(f"{path}.{key} ({supplied[key]})")
        elif key not in known and key not in _META:
            bad.append(f"{path}.{key} (not one of: {', '.join(sorted(known))})")
    return bad


def check_config(cfg: DictConfig) -> None:
    """Refuse, naming them, the keys of a composed training config that nothing reads or whose
    target would refuse them, and model names (``model.neuron``, ...) that the model refuses.

    ``ValueError`` listing every such key; Hydra's own ``hydra`` node is not looked at.
    """
    bad = [f"{k} (not one of: {', '.join(TOP_KEYS)})" for k in cfg if k not in (*TOP_KEYS, "hydra")]
    for group, schema in (("trainer", TrainerConfig), ("optim", OptimConfig)):
        bad += _unknown(cfg.get(group), group, {f.name for f in dataclasses.fields(schema)})
    optim = cfg.get("optim")
    for name in ("weights", "weights_scheduler", "positions", "positions_scheduler"):
        node = optim.get(name) if isinstance(optim, DictConfig) else None
        if isinstance(node, DictConfig) and "_target_" in node:
            bad += _unknown(node, f"optim.{name}", _accepted(node._target_))
    for group in ("dataset", "model", "augment", "logger"):
        node = cfg.get(group)
        if isinstance(node, DictConfig) and "_target_" in node:
            target = str(node._target_)
            extra = LOGGER_KEYS if target.startswith("snn_delays.loggers.") else ()
            bad += _unknown(node, group, _accepted(target, extra))
    model = cfg.get("model")
    if isinstance(model, DictConfig) and str(model.get("_target_")) == "snn_delays.model.DelaySNN":
        from snn_delays.delays import BACKENDS  # the model's names, checked before any data is read
        from snn_delays.model import DELAY_MODES
        from snn_delays.neurons import NEURONS

        for key, choices in (("delays", DELAY_MODES), ("delay_backend", BACKENDS), ("neuron", NEURONS)):
            if key in model and model[key] not in choices:
                bad.append(f"model.{key}={model[key]!r} (not one of: {', '.join(choices)})")
    if bad:
        raise ValueError(
            "unknown config key(s) or value(s): "
            + "; ".join(bad)
            + ". Correct the spelling or drop the key (`snn-delays-train --cfg job` prints the composed config)"
        )


def build(node: Any, /, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, whose error shows the target's message as written.

    Hydra's :class:`InstantiationException` quotes the target's error by its ``repr``, so the
    loaders' messages of several lines (what is missing, where to get it, which key to set)
    printed on one line with literal ``\\n`` and quotes. The exception keeps its type and
    Hydra's context (the target, ``full_key``); the error's own text replaces its repr."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause, text = e.__cause__, str(e)
        if cause is None or repr(cause) not in text:  # another shape of Hydra's message: as it is
            raise
        raise InstantiationException(
            text.replace(repr(cause), f"{type(cause).__name__}: {cause}", 1)
        ) from cause
