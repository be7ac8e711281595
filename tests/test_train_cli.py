"""End-to-end runs of the command line: the contract other checks call, outputs, bad input."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from spike_files import make_shd_root

QUIET = ["trainer.progress=false"]
CONF = Path(__file__).resolve().parent.parent / "conf"
METRIC_KEYS = {
    "best_valid_acc",
    "test_acc",
    "best_test_acc",
    "last_test_acc",
    "epochs",
    "train_seconds",
    "n_params",
}


def test_synthetic_run_writes_every_output_and_eval_reproduces_it(tmp_path):
    out = tmp_path / "run"
    run_cli("train", "experiment=synthetic", "trainer.epochs=3", "logger=csv", f"hydra.run.dir={out}", *QUIET)
    metrics = read_metrics(out)
    assert METRIC_KEYS <= set(metrics) and metrics["epochs"] == 3
    assert metrics["selected_on"] == "valid"
    assert len(metrics["epoch_train_seconds"]) == 3
    assert sum(metrics["epoch_train_seconds"]) == pytest.approx(metrics["train_seconds"])
    assert metrics["peak_memory_mib"] > 0  # CPU: the process's resident high-water mark
    logged = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    assert float(logged[-1]["memory/peak_mib"]) == pytest.approx(metrics["peak_memory_mib"])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 3
    for key in (
        "train/loss",
        "train/acc",
        "valid/loss",
        "valid/acc",
        "test/acc",
        "lr/weights",
        "lr/positions",
        "sigma",
        "delay/mean_ms/layer0",
    ):
        assert key in rows[0], key
    assert float(rows[-1]["sigma"]) < float(rows[0]["sigma"])  # sigma decays
    assert max(float(r["test/acc"]) for r in rows) == metrics["best_test_acc"]
    assert (out / "logs" / "metrics.csv").is_file()  # the CSV logger's own file
    # figures drawn at the last epoch (logger.figure_every), positions traced every epoch
    pngs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"delays_histogram.png", "training_curves.png", "spikes_raster.png"} <= pngs
    assert (out / "positions.npz").is_file()
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=False)
    assert best["config"]["model"]["delays"] == "learned" and (out / "checkpoints" / "last.pt").is_file()

    proc = run_cli("evaluate", f"checkpoint={out / 'checkpoints' / 'best.pt'}")
    result = json.loads((out / "checkpoints" / "eval_best.json").read_text())  # eval_<checkpoint>.json
    assert "test: acc" in proc.stdout
    assert abs(result["test"]["acc"] - metrics["test_acc"]) < 1e-9


def _train_synthetic(out: Path, *overrides: str) -> dict:
    """``snn-delays-train experiment=synthetic`` without a logger into ``out``: its metrics."""
    run_cli("train", "experiment=synthetic", "logger=none", *overrides, f"hydra.run.dir={out}", *QUIET)
    return read_metrics(out)


def test_delays_beat_no_delays_on_synthetic(tmp_path):
    """The synthetic classes differ only in spike timing: delays are needed to solve them."""
    acc = {
        m: _train_synthetic(tmp_path / m, f"model={m}", "seed=0")["test_acc"] for m in ("delays", "no_delays")
    }
    assert acc["delays"] >= acc["no_delays"] + 0.30, acc


def test_contract_on_shd_layout_files(tmp_path):
    root = tmp_path / "shd"
    make_shd_root(root, n_train=40, n_test=20)
    for model in ("delays", "fixed_delays", "no_delays"):
        out = tmp_path / f"out_{model}"
        run_cli(
            "train",
            "dataset=shd",
            f"dataset.root={root}",
            "trainer.epochs=1",
            "trainer.batch_size=16",
            f"model={model}",
            "logger=none",
            "seed=3",
            f"hydra.run.dir={out}",
            *QUIET,
        )
        metrics = read_metrics(out)
        assert metrics["epochs"] == 1 and 0.0 <= metrics["test_acc"] <= 1.0
        assert metrics["n_params"] > 0
    assert list((root / "cache").iterdir()), "binned data should be cached"


def test_wandb_offline_logger(tmp_path):
    """The default logger: an offline W&B run holding every figure the trainer drew (the
    pyplot-free figures reach wandb as images), each also saved into figures/."""
    out = tmp_path / "run"
    run_cli("train", "experiment=synthetic", "trainer.epochs=1", f"hydra.run.dir={out}", *QUIET)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    saved = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert {"delays_histogram", "delays_positions", "spikes_raster", "training_curves"} <= set(saved)
    media = runs[0] / "files" / "media" / "images"  # <group>/<name>_<n>_<hash>.png per logged figure
    logged = sorted(f"{p.parent.name}_{p.stem.rsplit('_', 2)[0]}" for p in media.rglob("*.png"))
    assert logged == saved
    assert "failed" not in (out / "train.log").read_text()


def test_unknown_config_key_fails_at_start_up(tmp_path):
    proc = run_cli(
        "train", "experiment=synthetic", "trainer.epocs=2", f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode != 0 and "epocs" in proc.stderr
    proc = run_cli(
        "train", "experiment=synthetic", "model.n_hiden=3", f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode != 0 and "n_hiden" in proc.stderr


def test_missing_dataset_offline_names_file_url_and_folder(tmp_path):
    root = tmp_path / "nothing_here"
    proc = run_cli(
        "train",
        "dataset=shd",
        f"dataset.root={root}",
        "dataset.download=false",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'out'}",
        check=False,
    )
    assert proc.returncode != 0
    assert "shd_train.h5" in proc.stderr and "https://" in proc.stderr and str(root) in proc.stderr
    # the message as written, one line each, not Hydra's repr of it (literal \n, quotes)
    assert "MissingDataError: dataset file shd_train.h5 not found in" in proc.stderr
    assert "or allow the download with dataset.download=true." in proc.stderr.splitlines()
    assert "\\n" not in proc.stderr and "full_key: dataset" in proc.stderr


def test_help_says_what_the_command_does_and_lists_the_groups():
    """``--help`` began "train is powered by Hydra." and said nothing of the command."""
    out = run_cli("train", "--help").stdout
    assert out.startswith("snn-delays-train [KEY=VALUE ...]: train a feedforward LIF network")
    assert "snn-delays-train experiment=synthetic logger=none" in out
    assert "experiment: gsc_paper, shd_paper, ssc_paper, synthetic" in out and "--hydra-help" in out
    assert "is powered by Hydra" not in out


def test_built_objects_errors_keep_their_lines_and_hydras_context():
    from hydra.errors import InstantiationException

    from snn_delays.config import build

    node = {"_target_": "snn_delays.model.DelaySNN", "n_inputs": 4, "n_classes": 2, "n_hidden": 0}
    with pytest.raises(InstantiationException) as info:
        build(node)
    text = str(info.value)
    assert text.startswith("Error in call to target 'snn_delays.model.DelaySNN':\nValueError: model.n_hidden")
    assert isinstance(info.value.__cause__, ValueError) and repr(info.value.__cause__) not in text
    with pytest.raises(InstantiationException, match="Error locating target"):  # other messages as they are
        build({"_target_": "snn_delays.no_such_thing"})
    assert isinstance(build(node | {"n_hidden": 3}), torch.nn.Module)


def test_fast_and_dcls_backends_train_to_the_same_accuracy(tmp_path):
    """Same data, same seed: the fast path computes the reference's function, so training agrees."""
    metrics = {
        b: _train_synthetic(tmp_path / b, f"model.delay_backend={b}", "seed=1") for b in ("fast", "dcls")
    }
    assert metrics["fast"]["test_acc"] >= 0.9 and metrics["dcls"]["test_acc"] >= 0.9, metrics
    assert abs(metrics["fast"]["test_acc"] - metrics["dcls"]["test_acc"]) <= 0.05, metrics


def test_numbered_gpu_becomes_the_current_device(monkeypatch):
    """``trainer.device=cuda:1``: Triton launches on the current device (and the CUDA graphs'
    stream and memory counters read it), so the trainer makes that GPU current; an index the
    machine lacks is refused naming the key. (No GPU here: CUDA's answers are stood in.)"""
    from snn_delays import train

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert train.pick_device("cuda:1") == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)]
    assert train.pick_device("cuda") == torch.device("cuda") and len(made_current) == 1
    with pytest.raises(ValueError, match=r"trainer.device=cuda:2: this machine has 2 CUDA device\(s\)"):
        train.pick_device("cuda:2")


def test_a_device_the_machine_lacks_or_a_wrong_name_is_refused_naming_the_key(tmp_path, monkeypatch):
    """trainer.device=gpu gave torch's list of twenty device types, and =mps a bare
    'not linked with support' from deep in the model's .to(); both now name the key, before any
    data is read (the eval command's key is device)."""
    from snn_delays import train

    with pytest.raises(ValueError, match=r"trainer.device='gpu' is not a device: use auto, cpu, cuda"):
        train.pick_device("gpu")
    with pytest.raises(RuntimeError, match="device=mps but this machine's torch has no mps device"):
        train.pick_device("mps", key="device")
    monkeypatch.setattr(torch.mps, "is_available", lambda: True)  # a Mac's answer, stood in
    assert train.pick_device("mps") == torch.device("mps")
    proc = run_cli(
        "train", "experiment=synthetic", "trainer.device=mps", f"hydra.run.dir={tmp_path}", check=False
    )
    assert (
        proc.returncode != 0
        and "trainer.device=mps but this machine's torch has no mps device" in proc.stderr
    )
    assert not (tmp_path / "checkpoints").exists()


def test_diverging_training_stops_with_an_error_and_saves_nothing_of_it(tmp_path):
    """A learning rate far too high: the loss becomes NaN in the first epoch. The trainer stops
    there with an error instead of training on and saving a NaN model as best.pt."""
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "experiment=synthetic",
        "model=no_delays",
        "trainer.epochs=2",
        "optim.weights.lr=1e24",
        "optim.weights_scheduler.max_lr=1e24",
        "logger=none",
        f"hydra.run.dir={out}",
        *QUIET,
        check=False,
    )
    assert proc.returncode != 0
    assert "training diverged: train loss is nan at epoch 1 (lower the learning rate" in proc.stderr
    assert not (out / "checkpoints" / "best.pt").exists() and not (out / "checkpoints" / "last.pt").exists()
    assert not (out / "metrics.json").exists()


def test_divergence_keeps_the_last_good_checkpoints(tmp_path, monkeypatch):
    """NaN in epoch 2: checkpoints/{best,last}.pt stay those of epoch 1."""
    from snn_delays import train, training

    real = training.train_epoch
    calls = []

    def nan_in_epoch_2(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        return {**result, "loss": float("nan")} if len(calls) == 2 else result

    monkeypatch.setattr(training, "train_epoch", nan_in_epoch_2)
    cfg = compose_train("experiment=synthetic", "trainer.epochs=3", "logger=none", *QUIET)
    with pytest.raises(FloatingPointError, match="train loss is nan at epoch 2.*last.pt holds epoch 1"):
        train.run(cfg, tmp_path)
    for name in ("best.pt", "last.pt"):
        assert torch.load(tmp_path / "checkpoints" / name, weights_only=False)["state"]["epoch"] == 1


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path):
    out = tmp_path / "run"
    args = ["experiment=synthetic", "trainer.epochs=1", "logger=none", f"hydra.run.dir={out}", *QUIET]
    run_cli("train", *args)
    before = (out / "metrics.json").read_text(), (out / "checkpoints" / "last.pt").read_bytes()
    proc = run_cli("train", *args, check=False)
    assert proc.returncode != 0
    last = out / "checkpoints" / "last.pt"
    assert f"{last} exists" in proc.stderr and "trainer.resume=true" in proc.stderr
    assert "hydra.run.dir" in proc.stderr
    assert ((out / "metrics.json").read_text(), last.read_bytes()) == before


def test_a_restarted_job_without_resume_starts_over_and_resume_continues(tmp_path, monkeypatch, caplog):
    """A requeued SLURM job (submitit's too) or a restarted torchrun worker reruns its command in
    its own folder: without trainer.resume it starts over as before (with a warning)."""
    from snn_delays import train

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    fresh = compose_train("experiment=synthetic")
    with pytest.raises(FileExistsError, match="trainer.resume=true to continue it"):
        train.refuse_to_overwrite(fresh, tmp_path)
    train.refuse_to_overwrite(compose_train("experiment=synthetic", "trainer.resume=true"), tmp_path)
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.setenv(var, "1")
        with caplog.at_level(logging.WARNING, logger="snn_delays"):
            train.refuse_to_overwrite(fresh, tmp_path)
        assert "training again from scratch" in caplog.text
        monkeypatch.setenv(var, "0")
        with pytest.raises(FileExistsError):
            train.refuse_to_overwrite(fresh, tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.batch_size=0", "trainer.batch_size must be a whole number >= 1, got 0"),
        ("trainer.batch_size=-4", "trainer.batch_size must be a whole number >= 1, got -4"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size must be a whole number >= 1, got 0"),
        ("trainer.epochs=0", "trainer.epochs must be a whole number >= 1, got 0"),
        ("seed=abc", "seed must be a whole number from 0 to 4294967295"),
        ("seed=-1", "seed must be a whole number from 0 to 4294967295"),
        ("seed=4294967296", "seed must be a whole number from 0 to 4294967295"),
        ("seed=1.5", "seed must be a whole number"),
    ],
)
def test_bad_trainer_settings_fail_at_start_up_naming_the_key(override, message, tmp_path):
    from snn_delays import train

    cfg = compose_train("experiment=synthetic", "logger=none", override)
    with pytest.raises(ValueError, match=re.escape(message)):
        train.run(cfg, tmp_path)
    assert not any(tmp_path.iterdir()), "nothing trained or written"


def test_bad_epochs_on_the_command_line_fail_before_training(tmp_path):
    proc = run_cli(
        "train",
        "experiment=synthetic",
        "trainer.epochs=0",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert proc.returncode != 0 and "trainer.epochs must be a whole number >= 1, got 0" in proc.stderr
    assert "OneCycleLR" not in proc.stderr


def test_without_a_validation_split_the_epoch_is_chosen_on_test_and_said_so(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "experiment=synthetic",
        "dataset.n_valid=0",
        "trainer.epochs=2",
        "logger=none",
        f"hydra.run.dir={out}",
        *QUIET,
    )
    assert "WARNING" in proc.stderr + proc.stdout
    assert "the epoch is chosen on the test set" in proc.stderr + proc.stdout
    metrics = read_metrics(out)
    assert metrics["selected_on"] == "test" and metrics["test_acc"] == metrics["best_test_acc"]


def test_a_sweep_rerun_with_resume_finds_its_job_folders(tmp_path):
    """trainer.resume (and the other keys a continuation may change) stay out of the job folder
    names, so a sweep rerun with trainer.resume=true continues in the same folders."""
    from snn_delays.evaluate import LOCATION_KEYS
    from snn_delays.train import RESUMABLE_KEYS

    cfg = compose_train("experiment=synthetic", return_hydra_config=True)
    assert set(cfg.hydra.job.config.override_dirname.exclude_keys) == set(RESUMABLE_KEYS)
    # what the evaluator lets change (where the data lies, not what the model sees) may change on resume
    assert {f"dataset.{k}" for k in LOCATION_KEYS} <= set(RESUMABLE_KEYS)
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "experiment=synthetic",
        "trainer.epochs=1",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        *QUIET,
    ]
    run_cli("train", *args)
    first = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    proc = run_cli("train", *args, "trainer.resume=true", "trainer.eval_batch_size=7")
    assert (
        sorted(p.name for p in sweep.iterdir() if p.is_dir())
        == first
        == ["0_experiment=synthetic,trainer.epochs=1"]
    )
    assert "resuming from" in proc.stderr + proc.stdout


def compose_train(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    from snn_delays.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def test_the_data_order_follows_the_seed(tmp_path):
    """A seed sweep varies the order the training samples come in, not only the initial weights
    (every run's shuffle generator started from torch's fixed default seed): after one epoch the
    trainer's generator has drawn one permutation from ``seed``."""

    def shuffle_state_after_one_epoch(seed: int) -> torch.Tensor:
        out = tmp_path / f"seed{seed}"
        run = ["experiment=synthetic", "trainer.epochs=1", "dataset.n_train=64", "logger=none"]
        run_cli("train", *run, f"seed={seed}", f"hydra.run.dir={out}", *QUIET)
        return torch.load(out / "checkpoints" / "last.pt", weights_only=False)["state"]["shuffle_rng"]

    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        torch.randperm(64, generator=gen)
        assert torch.equal(shuffle_state_after_one_epoch(seed), gen.get_state()), seed


def test_csv_logger_keeps_earlier_steps_and_replaces_steps_logged_again(tmp_path):
    from snn_delays.loggers import CSVLogger

    first = CSVLogger(tmp_path)
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    resumed = CSVLogger(tmp_path)  # a resumed run continues after step 2 (its last.pt)
    resumed.log_metrics({"train/loss": 30.0, "test/acc": 0.5}, step=3)
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    assert [(r["step"], r["train/loss"], r["test/acc"]) for r in rows] == [
        ("1", "1.0", ""),
        ("2", "2.0", ""),
        ("3", "30.0", "0.5"),
    ]
    CSVLogger(tmp_path).log_metrics({"train/loss": 7.0}, step=1)  # started over: from step 1 on
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv"))] == ["1"]


# Windows has no ``resource`` module, no ``os.getuid`` and no /proc: what the CPU path read there.
_WITHOUT_POSIX = """
import builtins, os, sys
sys.modules["resource"] = None  # import resource -> ImportError
del os.getuid
_open = builtins.open
def _no_proc(file, *args, **kwargs):
    if str(file).startswith("/proc/"):
        raise FileNotFoundError(file)
    return _open(file, *args, **kwargs)
builtins.open = _no_proc
from snn_delays import fast_delays, train
assert fast_delays.c_kernels_available()  # the cache folder is named without a uid
sys.argv = ["snn-delays-train", *sys.argv[1:]]
train.main()
"""


def test_a_platform_without_resource_getuid_or_proc_trains_and_reports_no_peak(tmp_path):
    """As on Windows: the run trains; its peak memory is unknown (null), not a crash."""
    out = tmp_path / "run"
    args = ["experiment=synthetic", "trainer.epochs=1", "logger=csv", f"hydra.run.dir={out}", *QUIET]
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_POSIX, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "USERNAME": "researcher", "USER": "researcher"},  # getpass reads these first
    )
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(out)
    assert metrics["peak_memory_mib"] is None and metrics["epochs"] == 1
    logged = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    assert len(logged) == 1 and "memory/peak_mib" not in logged[0]


def test_a_plain_install_without_the_checkout_trains(tmp_path):
    """``pip install .`` / ``pip install git+URL`` (not editable) left the configs behind:
    ``config folder .../site-packages/conf not found``. The wheel ships ``conf/`` inside the
    package, with every module and config of the checkout, and trains from anywhere."""
    import importlib.util
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: building in the checkout would write its build/ folder
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("snn_delays", "conf"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)]
    if importlib.util.find_spec("setuptools") and importlib.util.find_spec("wheel"):
        build.append("--no-build-isolation")  # offline and quick; else pip fetches them from PyPI
    proc = subprocess.run(build, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("snn_delays-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = set(z.namelist())
        z.extractall(tmp_path / "site")
    sources = {
        f"snn_delays/{p.relative_to(ROOT / 'snn_delays')}" for p in (ROOT / "snn_delays").rglob("*.py")
    }
    configs = {f"snn_delays/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assert sources - shipped == set() and configs - shipped == set()

    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor its conf/ in sight
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(tmp_path / "site")}
    where = run_cli("train", "--cfg", "job", "experiment=synthetic", cwd=elsewhere, env=env)
    assert "make_synthetic" in where.stdout
    found = subprocess.run(
        [sys.executable, "-c", "import snn_delays.train as t; print(t.CONF_DIR)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env={**os.environ, **env},
    )
    assert Path(found.stdout.strip()) == tmp_path / "site" / "snn_delays" / "conf"
    run_cli(
        "train",
        "experiment=synthetic",
        "trainer.epochs=1",
        "logger=none",
        *QUIET,
        "hydra.run.dir=run",
        cwd=elsewhere,
        env=env,
    )
    assert read_metrics(elsewhere / "run")["epochs"] == 1


def test_setup_cfg_floors_are_ones_spikingjelly_installs_with():
    """``setup.cfg`` said Python >= 3.10 and torch >= 2.1, but spikingjelly 2.0 (a hard
    dependency) needs Python >= 3.11 and torch >= 2.6: on the floors promised, pip could only fail,
    on spikingjelly. Each floor of ours must satisfy what spikingjelly asks of the same package."""
    import configparser
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    ours = [Requirement(line) for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    floors = {
        r.name.lower(): Version(s.version) for r in ours for s in r.specifier if s.operator in (">=", "==")
    }
    floors["python"] = Version(cfg["options"]["python_requires"].strip().lstrip(">="))
    theirs = md.metadata("spikingjelly")
    asked = {"python": theirs["Requires-Python"]} | {
        r.name.lower(): str(r.specifier)
        for r in map(Requirement, md.requires("spikingjelly") or [])
        if r.marker is None  # not an extra's
    }
    short = {
        n: (str(floors[n]), asked[n])
        for n in floors.keys() & asked.keys()
        if floors[n] not in SpecifierSet(asked[n])
    }
    assert {"python", "torch"} <= floors.keys() & asked.keys()
    assert not short, f"floors below spikingjelly's (ours, theirs): {short}"
