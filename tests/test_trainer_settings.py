"""Valid but unusual trainer settings: the run does what the README and the config comments say."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from snn_delays.train import CONF_DIR, run
from snn_delays.training import sigma_at


def _run(run_dir: Path, *overrides: str) -> dict:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=synthetic", "logger=none", "trainer.progress=false", *overrides],
        )
    return run(cfg, run_dir)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_sigma_starting_at_zero_stays_zero(epoch):
    """A sigma of 0 at the start (K = 1, ``model.sigma_init=0``) raised ZeroDivisionError in
    the geometric decay; it stays 0, as in the published code (which decays only a sigma above
    the final one)."""
    assert sigma_at(epoch, 0.0, 0.23, 3) == 0.0
    assert sigma_at(3, 7.0, 0.23, 3) == pytest.approx(0.23)  # the ordinary decay is unchanged


@pytest.mark.parametrize("sigma_init", [0.1, 0.23, -1.0])
@pytest.mark.parametrize("epoch", [0, 1, 3, 5])
def test_sigma_starting_at_or_below_the_final_one_stays(sigma_init, epoch):
    """The published decay multiplies sigma only while it is above 0.23; a ``model.sigma_init``
    of 0.1 was raised to 0.23 over the decay epochs (and a negative one gave a complex sigma)."""
    assert sigma_at(epoch, sigma_init, 0.23, 3) == sigma_init


@pytest.mark.parametrize("override", ["model.max_delay_ms=5", "model.sigma_init=0"])
def test_kernel_of_one_tap_or_zero_sigma_trains(tmp_path, override):
    """``model.max_delay_ms`` below one bin (K = 1: every delay 0) or ``model.sigma_init=0``
    stopped the run at its first epoch with ``ZeroDivisionError: float division by zero``."""
    metrics = _run(tmp_path / "run", override, "trainer.epochs=2")
    assert metrics["epochs"] == 2 and math.isfinite(metrics["test_acc"])
    assert [float(r["sigma"]) for r in _rows(tmp_path / "run")] == [0.0, 0.0]


def test_divergence_advice_names_the_rate_that_is_used(tmp_path):
    """``optim.weights.lr`` is not used (OneCycleLR sets the weights' rate from ``max_lr``), yet
    the divergence error advised lowering it: a researcher doing so met the same error again."""
    with pytest.raises(FloatingPointError, match="training diverged") as err:
        _run(tmp_path / "run", "model=no_delays", "trainer.epochs=2", "optim.weights_scheduler.max_lr=1e24")
    assert "optim.weights_scheduler.max_lr" in str(err.value)
    assert "optim.weights.lr and" not in str(err.value)


def test_one_cycle_sets_the_weights_rate_whatever_optim_weights_lr_says():
    """What ``conf/optim/paper.yaml`` says of ``optim.weights.lr``: the schedule's rates alone."""
    from snn_delays.model import DelaySNN
    from snn_delays.train import build_optimization

    for lr in (1e-3, 0.5):
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=["experiment=synthetic", f"optim.weights.lr={lr}"])
        model = DelaySNN(4, 3, n_hidden=8, n_layers=1, kernel_size=5)
        opt = build_optimization(cfg.optim, model, epochs=4)
        assert opt.weights.param_groups[0]["lr"] == pytest.approx(cfg.optim.weights_scheduler.max_lr / 25)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the replay's
def test_other_schedulers_keep_their_own_settings(tmp_path):
    """The trainer passed OneCycleLR's ``total_steps`` and CosineAnnealingLR's ``T_max`` to any
    scheduler: ConstantLR or StepLR failed with ``unexpected keyword argument``. They now run,
    stepped once per epoch, with the rates torch's own scheduler gives."""
    import torch

    run = tmp_path / "run"
    _run(
        run,
        "trainer.epochs=3",
        "optim.weights_scheduler._target_=torch.optim.lr_scheduler.ConstantLR",
        "~optim.weights_scheduler.max_lr",  # OneCycleLR's (check_config names it otherwise)
        "+optim.weights_scheduler.factor=0.5",
        "+optim.weights_scheduler.total_iters=2",
        "optim.positions_scheduler._target_=torch.optim.lr_scheduler.StepLR",
        "+optim.positions_scheduler.step_size=1",
    )
    p = torch.nn.Parameter(torch.zeros(1))
    weights, positions = torch.optim.Adam([p], lr=1e-3), torch.optim.Adam([p], lr=0.1)
    constant = torch.optim.lr_scheduler.ConstantLR(weights, factor=0.5, total_iters=2)
    step = torch.optim.lr_scheduler.StepLR(positions, step_size=1)
    expected = []
    for _ in range(3):
        expected.append((weights.param_groups[0]["lr"], positions.param_groups[0]["lr"]))
        constant.step()
        step.step()
    logged = [(float(r["lr/weights"]), float(r["lr/positions"])) for r in _rows(run)]
    assert logged == pytest.approx(expected)


def test_the_largest_seed_is_valid_on_every_rank():
    """``seed=4294967295`` (allowed) failed on torchrun's rank 1: numpy took seed + rank."""
    from snn_delays.train import rank_seed, seed_everything

    assert rank_seed(2**32 - 1, 1) == 0 and rank_seed(5, 2) == 7
    for rank in range(4):
        seed_everything(rank_seed(2**32 - 1, rank))


def test_one_or_two_epochs_of_one_cycle_warn_that_the_weights_barely_train(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="snn_delays"):
        _run(tmp_path / "one", "trainer.epochs=1")
    assert "trainer.epochs=1: the one-cycle schedule" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="snn_delays"):
        _run(tmp_path / "three", "trainer.epochs=3")
    assert "one-cycle" not in caplog.text


def test_the_logged_config_holds_what_the_run_derived(tmp_path):
    """The logged config (W&B's, filtered on in its UI; the csv logger's config.json) had
    ``model.kernel_size: null`` (K is derived from max_delay_ms and dt_ms) and no data sizes.
    The checkpoint's config stays as composed, so resume compares like with like."""
    import json

    import torch

    run = tmp_path / "run"
    _run(run, "trainer.epochs=1", "logger=csv", "model.max_delay_ms=30")
    logged = json.loads((run / "logs" / "config.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert logged["data"] == {k: ckpt["data"][k] for k in ("n_inputs", "n_classes", "dt_ms")}
    from snn_delays.checkpoints import model_from_checkpoint

    assert logged["model"]["kernel_size"] == model_from_checkpoint(ckpt).delay_layers()[0].kernel_size
    assert logged["model"]["kernel_size"] >= 3 and ckpt["config"]["model"]["kernel_size"] is None
    assert "data" not in ckpt["config"]


def test_logger_is_told_of_a_stop_by_signal(tmp_path, monkeypatch):
    """SIGTERM (SLURM pre-emption, ``scancel``) stops training after the epoch in progress; the
    logger hears ``preempted(signum)`` before ``finish`` (W&B then marks the run pre-empted), and
    only then. A run that completes is finished plainly, even when the signal comes after its
    last epoch's training (during that epoch's checkpoint or figures): it was marked pre-empted,
    and told to resume, though nothing was left to train."""
    import os
    import signal

    from snn_delays.loggers import CSVLogger

    calls: list = []

    def log_metrics(self, metrics, step):
        calls.append(("metrics", step))
        if stop_after is not None and step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM would, during the run

    monkeypatch.setattr(CSVLogger, "log_metrics", log_metrics)
    monkeypatch.setattr(CSVLogger, "preempted", lambda self, signum: calls.append(("preempted", signum)))
    monkeypatch.setattr(CSVLogger, "finish", lambda self: calls.append(("finish",)))
    for stop_after, name in ((1, "cut"), (None, "whole"), (3, "signal_after_the_last_epoch")):
        calls.clear()
        metrics = _run(tmp_path / name, "logger=csv", "logger.figure_every=0", "trainer.epochs=3")
        if stop_after == 1:
            assert metrics["epochs"] == 1
            assert calls[-2:] == [("preempted", signal.SIGTERM), ("finish",)]
        else:
            assert metrics["epochs"] == 3
            assert calls[-1] == ("finish",) and not any(c[0] == "preempted" for c in calls)


def test_each_epoch_and_the_result_are_logged(tmp_path, caplog):
    """With ``trainer.progress=false`` (the SLURM script's setting) a job's output and
    ``train.log`` said nothing between the start and the end of training, and nothing of the
    result. Each epoch is now one line, the same numbers as metrics.csv, and the run ends with
    metrics.json's result."""
    import json
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="snn_delays"):
        _run(tmp_path / "run", "trainer.epochs=2")
    lines = [r.getMessage() for r in caplog.records]
    rows = _rows(tmp_path / "run")
    for row in rows:
        line = next(m for m in lines if m.startswith(f"epoch {row['epoch']}/2 |"))
        for split in ("train", "valid", "test"):
            want = f"{split} loss {float(row[f'{split}/loss']):.4f} acc {float(row[f'{split}/acc']):.4f}"
            assert want in line
        assert f"sigma {float(row['sigma']):.3g}" in line
        # the time the other epochs should take, a SLURM job's only estimate (no bars there)
        assert re.search(r"\| about \d+ s left$", line) if row["epoch"] == "1" else "left" not in line
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    result = next(m for m in lines if m.startswith("finished 2/2 epochs"))
    assert f"test_acc {metrics['test_acc']:.4f} at epoch {metrics['best_epoch']}, chosen on valid" in result
    assert f"best_valid_acc {metrics['best_valid_acc']:.4f}" in result

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="snn_delays"):
        _run(tmp_path / "no_valid", "trainer.epochs=1", "dataset.n_valid=0")
    lines = [r.getMessage() for r in caplog.records]
    line = next(m for m in lines if m.startswith("epoch 1/1 |"))
    assert "valid" not in line and "test loss" in line and "(new best)" in line
    result = next(m for m in lines if m.startswith("finished 1/1 epochs"))
    assert "chosen on test" in result and "best_valid_acc" not in result


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "1 s"),
        (42.4, "42 s"),
        (89, "89 s"),
        (90, "2 min"),
        (5339, "89 min"),
        (5400, "1 h 30 min"),
        (11100, "3 h 05 min"),
    ],
)
def test_time_left_reads_as_a_duration(seconds, text):
    from snn_delays.training import _duration

    assert _duration(seconds) == text


def test_epoch_lines_print_above_the_progress_bars(tmp_path, monkeypatch):
    """With the bars on, a log line written to the terminal went onto the end of a bar's line;
    each epoch line now starts a line of its own."""
    import io
    import logging
    import re
    import sys

    term = io.StringIO()  # a terminal: Hydra's console handler writes to stdout, the bars to stderr
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        _run(tmp_path / "run", "trainer.epochs=3", "trainer.progress=true")
        assert handler in root.handlers  # the terminal's handler is back after training
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = term.getvalue()
    assert "epochs:" in text  # the bars were drawn to the same stream
    assert "valid:" in text and "test:" in text  # and those of each epoch's evaluation
    segments = re.split(r"[\r\n]", text)
    for k in (1, 2, 3):
        starts = [s for s in segments if f"epoch {k}/3 |" in s]
        assert len(starts) == 1 and starts[0].startswith(f"epoch {k}/3 |"), starts


def test_a_bad_augment_value_is_refused_before_the_data_is_read(tmp_path):
    """``augment.cutmix_prob=2`` was refused only once the dataset was loaded (a download, or
    binning SSC, spent for nothing)."""
    from hydra.errors import InstantiationException

    overrides = ["dataset=shd", f"dataset.root={tmp_path / 'nothing'}", "dataset.download=false"]
    with pytest.raises(InstantiationException, match="shd_train.h5 not found"):  # no data indeed
        _run(tmp_path / "a", *overrides)
    with pytest.raises(InstantiationException, match=r"augment.cutmix_prob must be in \[0, 1\], got 2"):
        _run(tmp_path / "b", *overrides, "augment=default", "augment.cutmix_prob=2")
