"""Structured config schemas, registered in Hydra's ConfigStore.

The groups that are not instantiated as a whole (``trainer``, ``optim``) get a dataclass
schema, so a mistyped key in a YAML file or on the command line fails when the config is
composed, not hours into a cluster job. Instantiated groups (``dataset``, ``model``,
``logger``) fail at start-up on an unknown argument of their ``_target_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


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
