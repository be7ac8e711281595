"""``snn-delays-eval checkpoint=PATH [dataset=NAME dataset.root=DIR]``: re-evaluate a checkpoint.

Rebuilds the model from the configuration saved in the checkpoint, evaluates the integer-delay
network (as during training) on the requested splits, prints the results and writes them as
JSON (``eval.json`` beside the checkpoint unless ``output=`` says otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from snn_delays.checkpoints import load_checkpoint
from snn_delays.train import CONF_DIR, pick_device
from snn_delays.training import evaluate


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, dict[str, float]]:
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such file")
    device = pick_device(cfg.device)
    model, config, info = load_checkpoint(path, device=device)
    dataset_cfg = cfg.dataset if cfg.get("dataset") is not None else OmegaConf.create(config["dataset"])
    data = instantiate(dataset_cfg)
    if (data.n_inputs, data.n_classes) != (info["n_inputs"], info["n_classes"]):
        raise ValueError(
            f"{path} was trained on {info['n_inputs']} inputs / {info['n_classes']} classes, but the dataset "
            f"{data.name} has {data.n_inputs} / {data.n_classes}"
        )
    data = data.to(device)
    results = {}
    for name in cfg.splits:
        split = getattr(data, name, None)
        if split is None:
            raise ValueError(f"splits: unknown split {name!r}; use train, valid or test")
        results[name] = evaluate(model, split, cfg.batch_size)
    return results


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    results = evaluate_checkpoint(cfg)
    for name, r in results.items():
        print(f"{name}: acc {r['acc']:.4f}  loss {r['loss']:.4f}")
    out = Path(cfg.output) if cfg.output else Path(cfg.checkpoint).with_name("eval.json")
    out.write_text(json.dumps({"checkpoint": str(cfg.checkpoint), **results}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
