"""Valid but unusual trainer settings: the run does what the README and the config comments say."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
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
    assert logged == [pytest.approx(e) for e in expected]  # pytest 9.2's approx refuses nested lists


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


def _written_out_loss(u: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC's loss, written out: p[b, c] = sum_t exp(u[t,b,c]) / sum_c' exp(u[t,b,c']), the loss
    -log(exp(p[b, y]) / sum_c exp(p[b, c])) averaged over the batch; (per-sample losses, p)."""
    e = u.double().exp()
    p = (e / e.sum(-1, keepdim=True)).sum(0)
    losses = p.exp().sum(-1).log() - p[torch.arange(len(y)), y]
    return losses, p


def _tiny_net(**kwargs) -> torch.nn.Module:
    from snn_delays.model import DelaySNN

    torch.manual_seed(0)
    return DelaySNN(6, 3, n_hidden=10, n_layers=1, kernel_size=5, dropout=0.0, tau=2.0, **kwargs)


def test_the_loss_is_cross_entropy_of_the_softmax_summed_over_time():
    """SPEC, "The network": cross-entropy on sum_t softmax(u[t]) over classes, the prediction
    its argmax. A mean over time, a softmax over time or the last step alone all train (the
    synthetic runs pass) yet optimise another loss than the published one."""
    from snn_delays.training import class_scores, loss_fn

    torch.manual_seed(0)
    u, y = torch.randn(9, 5, 4) * 3, torch.tensor([0, 3, 1, 1, 2])
    losses, p = _written_out_loss(u, y)
    torch.testing.assert_close(class_scores(u).double(), p, rtol=1e-5, atol=1e-6)
    assert float(loss_fn(u, y)) == pytest.approx(float(losses.mean()), rel=1e-5)


def test_a_training_step_minimises_the_spec_loss_from_fresh_gradients():
    """train_step: the loss it reports is SPEC's on the batch before the step, and the update is
    that of this batch's gradient alone (gradients zeroed first, not added to the last ones),
    for both optimizers."""
    from snn_delays.training import Optimization, train_step

    model = _tiny_net().train()
    x, y = (torch.rand(12, 4, 6) < 0.4).float(), torch.tensor([0, 1, 2, 1])
    twin = copy.deepcopy(model)
    losses, _ = _written_out_loss(twin(x), y)
    losses.mean().backward()  # this batch's gradients, computed here
    want_loss = float(losses.mean().detach())
    expected = {name: p - 0.01 * p.grad for name, p in twin.named_parameters() if p.grad is not None}

    weights = torch.optim.SGD(list(model.weight_parameters()) + list(model.other_parameters()), lr=0.01)
    positions = torch.optim.SGD(model.delay_parameters(), lr=0.01)
    opt = Optimization(weights, torch.optim.lr_scheduler.ConstantLR(weights, 1.0), positions)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e3)  # stale gradients of an earlier step
    loss, scores = train_step(model, opt, x, y)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert len(scores) == 4
    params = dict(model.named_parameters())
    assert any("dcls.P" in name for name in expected)  # positions too
    for name, want in expected.items():
        torch.testing.assert_close(params[name].detach(), want.float(), rtol=1e-4, atol=1e-6, msg=name)


def test_positions_are_clamped_after_every_training_step():
    """SPEC: positions are clamped to [-(K//2), K//2] after every step. A large step on the
    positions pushes them out; the step brings them back (at the bounds)."""
    from snn_delays.training import Optimization, train_step

    model = _tiny_net().train()
    x, y = (torch.rand(12, 4, 6) < 0.4).float(), torch.tensor([0, 1, 2, 1])
    weights = torch.optim.SGD(model.weight_parameters(), lr=0.0)
    positions = torch.optim.SGD(model.delay_parameters(), lr=1e6)
    before = [p.detach().clone() for p in model.delay_parameters()]
    train_step(
        model, Optimization(weights, torch.optim.lr_scheduler.ConstantLR(weights, 1.0), positions), x, y
    )
    lim = model.kernel_size // 2
    for old, p in zip(before, model.delay_parameters(), strict=True):
        assert not torch.equal(old, p), "the positions were stepped"
        assert float(p.detach().min()) >= -lim and float(p.detach().max()) <= lim
        assert bool(((p == lim) | (p == -lim)).any()), "a step of 1e6 reaches a bound"


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_each_epoch_trains_at_its_scheduled_rates_and_sigma_in_training_mode(tmp_path, monkeypatch):
    """SPEC, "Optimisation": one-cycle (weights) and cosine (positions) schedules stepped once per
    epoch, sigma from K//2 multiplied by (0.23 / sigma_0) ** (1 / E) in each of the first
    E = epochs // 4 epochs. What every training step of an epoch ran with (not only what the
    epoch's row says), in training mode (the Gaussian kernel, not the evaluated network)."""
    from snn_delays import training

    seen: list[tuple] = []
    real = training.train_step

    def spy(model, opt, x, target):
        core = getattr(model, "module", model)
        modes = {m.training for m in core.modules()}
        seen.append(
            (opt.weights.param_groups[0]["lr"], opt.positions.param_groups[0]["lr"], core.sigma, modes)
        )
        return real(model, opt, x, target)

    monkeypatch.setattr(training, "train_step", spy)
    epochs, n_train, batch = 8, 96, 32
    _run(
        tmp_path / "run",
        f"trainer.epochs={epochs}",
        f"trainer.batch_size={batch}",
        f"dataset.n_train={n_train}",
        "dataset.n_valid=16",
        "dataset.n_test=16",
        "model.n_hidden=16",
    )
    steps = n_train // batch
    assert len(seen) == epochs * steps
    p = torch.nn.Parameter(torch.zeros(1))
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(torch.optim.Adam([p]), max_lr=5e-3, total_steps=epochs)
    k = 15  # synthetic: max_delay_ms 150 at 10 ms steps
    s0, decay = k // 2, epochs // 4
    rows = _rows(tmp_path / "run")
    for e in range(epochs):
        w_lr = one_cycle.get_last_lr()[0]
        pos_lr = 0.1 * (1 + math.cos(math.pi * e / epochs)) / 2
        sigma = s0 * (0.23 / s0) ** (min(e, decay) / decay)
        for w, pos, s, modes in seen[e * steps : (e + 1) * steps]:
            assert (w, pos, s) == pytest.approx((w_lr, pos_lr, sigma), rel=1e-6), f"epoch {e + 1}"
            assert modes == {True}, f"epoch {e + 1}: trained in eval mode"
        row = rows[e]
        assert float(row["lr/weights"]) == pytest.approx(w_lr, rel=1e-6)
        assert float(row["lr/positions"]) == pytest.approx(pos_lr, rel=1e-6, abs=1e-12)
        assert float(row["sigma"]) == pytest.approx(sigma, rel=1e-6)
        one_cycle.step()


def test_the_epoch_is_chosen_on_validation_and_best_pt_holds_it(tmp_path, monkeypatch):
    """best.pt and metrics.json's test_acc are those of the first epoch with the highest
    validation accuracy (a tie is no new best), whatever the test accuracy does; best_test_acc
    is the highest test accuracy over epochs, last_test_acc the last epoch's."""
    from snn_delays import training

    valid = iter([0.5, 0.75, 0.75, 0.625])
    test = iter([0.9, 0.375, 0.8, 0.95])

    def scripted(model, split, *args, **kwargs):  # 16 valid, 24 test samples
        return {"loss": 1.0, "acc": next(valid if len(split) == 16 else test)}

    monkeypatch.setattr(training, "evaluate", scripted)
    run_dir = tmp_path / "run"
    metrics = _run(
        run_dir,
        "trainer.epochs=4",
        "dataset.n_train=32",
        "dataset.n_valid=16",
        "dataset.n_test=24",
        "model.n_hidden=8",
    )
    assert [float(r["valid/acc"]) for r in _rows(run_dir)] == [0.5, 0.75, 0.75, 0.625]
    assert [float(r["test/acc"]) for r in _rows(run_dir)] == [0.9, 0.375, 0.8, 0.95]
    assert metrics["best_epoch"] == 2 and metrics["selected_on"] == "valid"
    assert metrics["best_valid_acc"] == 0.75 and metrics["test_acc"] == 0.375
    assert metrics["best_test_acc"] == 0.95 and metrics["last_test_acc"] == 0.95
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert best["state"]["epoch"] == 2 and last["state"]["epoch"] == 4


def test_the_reported_training_loss_and_accuracy_are_means_over_samples(tmp_path, monkeypatch):
    """train/loss is the mean of SPEC's loss over the epoch's samples (each batch's loss weighted
    by its size: 40 samples in batches of 16, 16 and 8), train/acc the share of argmax hits; each
    batch scored by the network that it then trains (no dropout: the same forward again here)."""
    from snn_delays import training
    from snn_delays.data.synthetic import make_synthetic
    from snn_delays.model import DelaySNN

    seen: list[tuple[float, float, int]] = []
    real = training.train_step

    def spy(model, opt, x, target):
        with torch.no_grad():
            losses, p = _written_out_loss(copy.deepcopy(model)(x), target)
        seen.append((float(losses.sum()), float((p.argmax(-1) == target).sum()), len(target)))
        return real(model, opt, x, target)

    monkeypatch.setattr(training, "train_step", spy)
    data = make_synthetic(n_train=40, n_valid=8, n_test=8, seed=2)
    torch.manual_seed(0)
    model = DelaySNN(8, 4, n_hidden=12, n_layers=1, kernel_size=5, dropout=0.0, tau=2.0)
    weights = torch.optim.Adam(model.weight_parameters(), lr=1e-2)
    opt = training.Optimization(weights, torch.optim.lr_scheduler.ConstantLR(weights, 1.0))
    cfg = training.FitConfig(1, 16, 64, progress=False, save_checkpoints=False)
    state = training.fit(model, data, opt, _NoLogger(), cfg, tmp_path)
    assert [n for _, _, n in seen] == [16, 16, 8]
    row = state.history[0]
    assert row["train/loss"] == pytest.approx(sum(s for s, _, _ in seen) / 40, rel=1e-5)
    assert row["train/acc"] == pytest.approx(sum(c for _, c, _ in seen) / 40)


class _NoLogger:
    def log_metrics(self, metrics, step):
        pass
