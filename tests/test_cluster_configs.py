"""The sweep and cluster configs: SLURM launcher, Optuna sweeper, W&B sweep file.

The Hydra plugins are optional (the `cluster` extra); their tests are skipped when they are
missing. Nothing here submits a job or talks to the network.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from snn_delays.train import CONF_DIR

ROOT = Path(CONF_DIR).parent


def _hydra_cfg(*overrides: str) -> dict:
    """``snn-delays-train <overrides> --cfg hydra``, parsed."""
    out = subprocess.run(
        [sys.executable, "-m", "snn_delays.train", *overrides, "--cfg", "hydra"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return yaml.safe_load(out.stdout)["hydra"]


def test_slurm_launcher_composes_with_overridable_gpu_defaults() -> None:
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher (cluster extra)"
    )
    launcher = _hydra_cfg(
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu-a100", "hydra.launcher.timeout_min=60"
    )["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu-a100" and launcher["timeout_min"] == 60
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 1, 1)
    assert launcher["cpus_per_task"] > 0 and launcher["mem_gb"] > 0
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] > 0
    assert launcher["additional_parameters"] == {"requeue": True}


def test_slurm_launcher_writes_a_requeueable_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the launcher up to the submission; check the sbatch script and the requeue payload."""
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher (cluster extra)"
    )
    import submitit
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    fake_bin = tmp_path / "bin"  # submitit refuses to build a SLURM executor without srun on PATH
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    submitted = {}
    monkeypatch.setattr(
        submitit.AutoExecutor,
        "map_array",
        lambda self, fn, *args: submitted.update(executor=self, fn=fn, args=args) or [],
    )
    sweep_dir = tmp_path / "sweep" / "${now:%H-%M-%S-%f}"  # microseconds: any re-resolution would differ
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}"],
            return_hydra_config=True,
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    # the class as Hydra's plugin discovery (re)imported it, as in a real sweep
    launcher = get_class(params.pop("_target_"))(**params)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["seed=0", "trainer.resume=true"], ["seed=1", "trainer.resume=true"]], initial_job_idx=0)

    slurm = submitted["executor"]._executor
    assert slurm.max_num_timeout == params["max_num_timeout"]
    script = slurm._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for flag in (
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--mem=32GB",
        "--time=240",
        "--signal=USR2@120",
        "--requeue",
    ):
        assert f"#SBATCH {flag}\n" in script
    assert submitted["args"][0] == (["seed=0", "trainer.resume=true"], ["seed=1", "trainer.resume=true"])

    # A requeued job unpickles the launcher: its sweep folder must be the one already created.
    (created,) = (tmp_path / "sweep").iterdir()
    restored = pickle.loads(pickle.dumps(submitted["fn"]))
    assert str(restored.config.hydra.sweep.dir) == str(created)
    assert hasattr(restored, "checkpoint")  # what submitit calls to requeue


def test_optuna_sweeper_composes() -> None:
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="needs hydra-optuna-sweeper (cluster extra)"
    )
    sweeper = _hydra_cfg("hydra/sweeper=optuna_delays", "hydra.sweeper.n_trials=7")["sweeper"]
    assert sweeper["_target_"].endswith("optuna_sweeper.OptunaSweeper")
    assert sweeper["direction"] == "maximize" and sweeper["n_trials"] == 7
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler"
    assert set(sweeper["params"]) == {
        "model.max_delay_ms",
        "optim.positions.lr",
        "optim.sigma_decay_fraction",
        "model.dropout",
        "optim.weights_scheduler.max_lr",
    }


def test_optuna_sweep_runs_two_trials(tmp_path: Path) -> None:
    """Every search-space key exists in the trainer config and the objective is a number."""
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="needs hydra-optuna-sweeper (cluster extra)"
    )
    sweep = tmp_path / "optuna"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "snn_delays.train",
            "-m",
            "hydra/sweeper=optuna_delays",
            "hydra.sweeper.n_trials=2",
            "experiment=synthetic",
            "trainer.epochs=1",
            "logger=none",
            "trainer.progress=false",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra.job.num}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {
        "model.max_delay_ms",
        "optim.positions.lr",
        "optim.sigma_decay_fraction",
        "model.dropout",
        "optim.weights_scheduler.max_lr",
    }
    assert 0.0 <= result["best_value"] <= 1.0
    assert len(list(sweep.glob("*/metrics.json"))) == 2


def test_wandb_sweep_file_matches_the_trainer_config() -> None:
    sweep = yaml.safe_load((ROOT / "experiments" / "wandb_sweep.yaml").read_text())
    assert sweep["program"] == "snn-delays-train"
    assert sweep["metric"] == {"name": "valid/acc", "goal": "maximize"}
    command = sweep["command"]
    assert command[:2] == ["${env}", "${program}"] and command[-1] == "${args_no_hyphens}"
    # The fixed arguments and one value of every parameter must compose (no typo in a key).
    fixed = [arg for arg in command if not arg.startswith("${")]
    sampled = []
    for key, spec in sweep["parameters"].items():
        sampled.append(f"{key}={spec['values'][0] if 'values' in spec else spec['min']}")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=fixed + sampled, return_hydra_config=True)
    assert cfg.logger.mode == "online"
    assert cfg.model.dropout == sweep["parameters"]["model.dropout"]["min"]
    assert cfg.optim.weights_scheduler.max_lr == sweep["parameters"]["optim.weights_scheduler.max_lr"]["min"]
