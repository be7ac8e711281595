"""Resume after a real signal to the same final metrics; data-parallel training with torchrun."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, read_metrics, run_cli
from omegaconf import OmegaConf

from snn_delays.train import distributed, load_for_resume, resume_path

RUN = ["experiment=synthetic", "trainer.epochs=12", "logger=none", "trainer.progress=false", "seed=4"]


def history(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [{k: v for k, v in r.items()} for r in rows]


def wait_for_epoch(path, epoch, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before epoch {epoch}: {proc.communicate()}")
        if path.exists() and torch.load(path, weights_only=False)["state"]["epoch"] >= epoch:
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


def start_training(run_dir: Path, **popen: Any) -> subprocess.Popen:
    """``snn-delays-train RUN`` in ``run_dir``, in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "snn_delays.train", *RUN, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_interrupted_run_resumes_to_the_same_metrics(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli("train", *RUN, f"hydra.run.dir={full}")

    proc = start_training(cut)
    wait_for_epoch(cut / "checkpoints" / "last.pt", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = read_metrics(cut)["epochs"]
    assert 2 <= stopped_at < 12, "the signal should stop training early"
    assert "resume with trainer.resume=true" in out + err

    run_cli("train", *RUN, f"hydra.run.dir={cut}", "trainer.resume=true")
    a, b = read_metrics(full), read_metrics(cut)
    for key in ("test_acc", "best_valid_acc", "best_test_acc", "last_test_acc", "epochs", "best_epoch"):
        assert a[key] == b[key], key
    drop_time = [{k: v for k, v in r.items()} for r in history(full)]
    assert drop_time == history(cut)


def _default_sigint() -> None:  # a child of a background job inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_saves_stops_and_exits_as_interrupted(tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback from wherever the step was, and left no
    metrics.json. A first Ctrl-C now stops as SIGTERM does (the epoch in progress abandoned,
    the outputs written, resumable); then the process ends as killed by SIGINT, so that a shell
    loop over runs, or a Hydra sweep, stops too."""
    cut = tmp_path / "cut"
    proc = start_training(cut, preexec_fn=_default_sigint)
    wait_for_epoch(cut / "checkpoints" / "last.pt", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, out + err
    assert "Traceback" not in err and "stopped by Ctrl-C (SIGINT) after epoch" in out + err
    assert 2 <= read_metrics(cut)["epochs"] < 12
    run_cli("train", *RUN, f"hydra.run.dir={cut}", "trainer.resume=true")
    assert read_metrics(cut)["epochs"] == 12


def test_commands_interrupted_elsewhere_exit_as_interrupted_without_a_traceback():
    """Ctrl-C outside training (preparing data, in snn-delays-eval) ends the command as killed by
    SIGINT, with no traceback: each entry point's Hydra main is made to raise KeyboardInterrupt."""
    for module in ("train", "evaluate"):
        code = (
            f"import sys\nfrom snn_delays import {module} as m\n"
            "def interrupted():\n    raise KeyboardInterrupt\n"
            "m._hydra_main = interrupted\nsys.argv = ['cmd']\nm.main()\nprint('not reached')"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, preexec_fn=_default_sigint
        )
        assert proc.returncode == -signal.SIGINT, (module, proc.stderr)
        assert "Traceback" not in proc.stderr and "not reached" not in proc.stdout


def test_a_second_ctrl_c_quits_at_once_and_an_ignored_one_stays_ignored():
    from snn_delays.training import StopFlag

    def deliver():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # Python runs the handler between bytecodes
            time.sleep(0.001)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopFlag().__enter__()
        deliver()  # the first: a flag, no KeyboardInterrupt
        assert stop() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the second: at once
            deliver()
        with pytest.raises(KeyboardInterrupt):  # on leaving: Python's handler, once saved
            stop.__exit__(None, None, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with StopFlag() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            deliver()
            assert not stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_from_another_model_says_which_keys_differ(tmp_path):
    out = tmp_path / "run"
    run_cli("train", *RUN[:1], "trainer.epochs=1", "logger=none", f"hydra.run.dir={out}")
    proc = run_cli(
        "train",
        *RUN[:1],
        "trainer.epochs=2",
        "logger=none",
        "model.n_hidden=32",
        f"trainer.resume={out / 'checkpoints' / 'last.pt'}",
        f"hydra.run.dir={tmp_path / 'b'}",
        check=False,
    )
    assert proc.returncode != 0
    assert "model.n_hidden: 64 -> 32" in proc.stderr


def test_resume_with_another_dataset_is_refused_before_the_data_is_read(tmp_path):
    """The checkpoint was checked against the config only once the data was ready: resuming with
    another dataset first prepared it (SHD's download, by default) and then refused, and without
    the files it failed on them instead, never naming the key that differs."""
    from test_train_cli import compose_train

    from snn_delays import train

    out, empty = tmp_path / "run", tmp_path / "no_data"
    empty.mkdir()
    quiet = ["trainer.progress=false", "logger=none"]
    train.run(compose_train(*RUN[:1], "trainer.epochs=1", *quiet), out)
    cfg = compose_train(
        *RUN[:1], "trainer.epochs=1", *quiet, "dataset=shd", f"dataset.root={empty}", "dataset.download=false"
    )
    cfg.trainer.resume = True
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: its config differs .*dataset\."):
        train.run(cfg, out)


def test_a_run_resumed_from_another_folder_keeps_its_best_checkpoint(tmp_path, monkeypatch):
    """Resumed from another run's checkpoint, a folder got best.pt only at a later best epoch:
    with the best epoch before the resume, it had none, and snn-delays-eval of the folder (its
    best.pt) failed, though metrics.json reported test_acc at that epoch."""
    from test_train_cli import compose_train

    from snn_delays import train
    from snn_delays.loggers import NullLogger

    def log_metrics(self, metrics, step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # pre-empted after epoch 6, as SLURM would

    monkeypatch.setattr(NullLogger, "log_metrics", log_metrics)
    first, second = tmp_path / "first", tmp_path / "second"
    train.run(compose_train(*RUN), first)
    assert torch.load(first / "checkpoints" / "last.pt", weights_only=False)["state"]["epoch"] == 6
    monkeypatch.undo()
    metrics = train.run(compose_train(*RUN, f"trainer.resume={first}"), second)
    assert metrics["epochs"] == 12 and metrics["best_epoch"] < 6  # no better epoch after the resume
    best = torch.load(second / "checkpoints" / "best.pt", weights_only=False)
    assert best["state"]["epoch"] == metrics["best_epoch"]
    assert (second / "checkpoints" / "best.pt").read_bytes() == (
        first / "checkpoints" / "best.pt"
    ).read_bytes()


def test_a_run_resumed_from_another_folder_can_itself_be_resumed(tmp_path):
    """Resumed from another run's finished checkpoint, a folder got best.pt but no last.pt (no
    epoch was left to write one), so trainer.resume=true there started over from scratch."""
    from test_train_cli import compose_train

    from snn_delays import train

    first, second = tmp_path / "first", tmp_path / "second"
    done = train.run(compose_train(*RUN[:1], "trainer.epochs=3", *RUN[2:]), first)
    again = train.run(
        compose_train(*RUN[:1], "trainer.epochs=3", *RUN[2:], f"trainer.resume={first}"), second
    )
    last = second / "checkpoints" / "last.pt"
    assert last.read_bytes() == (first / "checkpoints" / "last.pt").read_bytes()
    resumed = train.run(compose_train(*RUN[:1], "trainer.epochs=3", *RUN[2:], "trainer.resume=true"), second)
    assert done["test_acc"] == again["test_acc"] == resumed["test_acc"]
    assert (
        resumed["epochs"] == 3 and len(history(second)) == 3
    )  # the epochs of the first run, none trained again


def test_wandb_run_resumes_under_the_same_id(tmp_path):
    out = tmp_path / "run"
    args = [
        *RUN[:1],
        "trainer.epochs=1",
        "logger=wandb",
        "logger.figure_every=0",
        "trainer.progress=false",
        f"hydra.run.dir={out}",
    ]
    run_cli("train", *args)
    run_id = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["logger_run_id"]
    run_cli("train", *args, "trainer.resume=true")
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert run_id and len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def torchrun(*args: str, timeout: float = 300, popen: bool = False):
    """``torchrun --standalone --nproc_per_node=2 -m snn_delays.train ARGS`` on the CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "snn_delays.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    if popen:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


DDP = ["experiment=synthetic", "logger=csv", "trainer.progress=false"]


def test_torchrun_two_ranks_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    # 513 samples: shards of 257 and 256 would give rank 0 a ninth step of 32 that rank 1 never
    # takes, and rank 0 would wait in the gradient all-reduce forever; both take 256.
    text = torchrun(*DDP, "trainer.epochs=2", "dataset.n_train=513", f"hydra.run.dir={out}", timeout=120)
    assert "2 ranks: each trains on 256 of 513 samples" in text
    # rank 0 tells the run; rank 1 only warns (the 2-epoch one-cycle warning), naming its rank
    assert text.count("synthetic on cpu: 513 samples train") == 1 and text.count("epoch 2/2 |") == 1
    assert "[rank 1] WARNING: trainer.epochs=2: the one-cycle schedule" in text
    metrics = read_metrics(out)
    assert metrics["epochs"] == 2
    assert "finished 2/2 epochs" in (out / "train.log").read_text()  # flushed before the exit
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    assert len(rows) == 2  # one logger (rank 0), one row per epoch
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_torchrun_evaluates_a_split_smaller_than_the_ranks(tmp_path):
    """DistributedDataParallel's forward broadcast rank 0's BatchNorm statistics in a rank's first
    evaluation forward: with one validation sample rank 1 had no batch, so rank 0 waited for it in
    that broadcast and rank 1 for rank 0 in the scores' sum, forever. The ranks now share rank 0's
    statistics before evaluating; every sample is scored once (1 valid, 3 test)."""
    out = tmp_path / "ddp"
    args = [*DDP, "trainer.epochs=1", "dataset.n_valid=1", "dataset.n_test=3", f"hydra.run.dir={out}"]
    proc = torchrun(*args, popen=True)
    try:
        text = "".join(proc.communicate(timeout=90))
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise AssertionError("the ranks waited for one another forever") from None
    assert proc.returncode == 0, text
    with open(out / "metrics.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert float(row["valid/acc"]) in (0.0, 1.0) and 3 * float(row["test/acc"]) in (0.0, 1.0, 2.0, 3.0)


def test_ranks_score_the_batches_of_one_process():
    """A batch is padded to its longest sample and the scores count every step. Rank r scored
    samples r, r + N, ...: other batches, other padding, so a network's scores depended on the
    number of ranks and snn-delays-eval did not reproduce a DDP run's. Each rank now scores
    every N-th batch of the one-process batching: the sums are the one-process scores."""
    from snn_delays.data.base import Split
    from snn_delays.model import DelaySNN
    from snn_delays.training import Distributed, evaluate

    torch.manual_seed(0)
    net = DelaySNN(8, 4, n_hidden=16, n_layers=1, max_delay_ms=50.0)
    with torch.no_grad():
        net.blocks[0][1].bias.fill_(1.0)  # spikes in the padding too: padding moves the scores
    n = 37
    lengths = torch.randint(3, 21, (n,))
    x = (torch.rand(n, 20, 8) < 0.3).float() * (torch.arange(20)[None, :, None] < lengths[:, None, None])
    split = Split(x, lengths, torch.randint(4, (n,)))
    sums = []

    class Rank(Distributed):  # records its sums; the all-reduce adds them
        def all_sum(self, t):
            sums.append(t.clone())
            return t

    one = evaluate(net, split, 5)
    for rank in range(3):
        evaluate(net, split, 5, Rank(rank, 3))
    loss, correct, count = sum(sums).tolist()
    assert count == n and correct / n == one["acc"] and loss / n == pytest.approx(one["loss"], rel=1e-12)


def test_a_finished_worker_runs_its_exit_handlers_and_skips_finalization():
    """A torchrun worker's interpreter finalization could abort it (a gloo thread kept alive by
    DistributedDataParallel); the entry point now ends workers after the atexit handlers (the
    log files' flush, W&B's teardown) without it."""
    code = (
        "import atexit\natexit.register(lambda: print('atexit ran', flush=True))\n"
        "class Finalized:\n    def __del__(self):\n        print('finalized', flush=True)\n"
        "keep = Finalized()\nfrom snn_delays.train import exit_without_finalizing\n"
        "exit_without_finalizing(3)\nprint('not reached')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stdout == "atexit ran\n", proc.stdout + proc.stderr


def test_torchrun_run_resumes_to_the_same_metrics(tmp_path):
    """Each rank continues its own random stream (dropout masks differ by rank): the checkpoint
    holds every rank's, and the resumed run's epochs equal the uninterrupted run's. The CSV
    logger's file keeps the epochs before the cut."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run = [*DDP, "trainer.epochs=6", "seed=3"]
    torchrun(*run, f"hydra.run.dir={full}")
    proc = torchrun(*run, f"hydra.run.dir={cut}", popen=True)
    wait_for_epoch(cut / "checkpoints" / "last.pt", 2, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks, which stop together
    proc.communicate(timeout=120)
    ckpt = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)
    assert 2 <= ckpt["state"]["epoch"] < 6, "the signal should stop training early"
    assert len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])
    torchrun(*run, f"hydra.run.dir={cut}", "trainer.resume=true")
    assert history(full) == history(cut)
    logged = [row["step"] for row in csv.DictReader(open(cut / "logs" / "metrics.csv"))]
    assert logged == [str(epoch) for epoch in range(1, 7)]


class _FakeGroup:
    """Stands in for torch.distributed's group calls, recording what the trainer does with them."""

    def __init__(self, initialized: bool = False) -> None:
        self.initialized, self.calls = initialized, []

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(torch.distributed, "init_process_group", self.init)
        monkeypatch.setattr(torch.distributed, "destroy_process_group", self.destroy)
        monkeypatch.setattr(torch.distributed, "barrier", lambda: self.calls.append("barrier"))

    def init(self, backend: str) -> None:
        self.initialized = True
        self.calls.append(f"init {backend}")

    def destroy(self) -> None:
        self.initialized = False
        self.calls.append("destroy")


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_a_rank_waits_for_the_others_and_destroys_its_group_before_it_exits(monkeypatch, fails):
    # A rank that reaches interpreter teardown while gloo's threads still drop a finished
    # collective aborts (SIGABRT) and torchrun fails the job: the ranks meet at a barrier first.
    # After an error there is no barrier (the other ranks may never reach it), only the cleanup.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    group = _FakeGroup()
    group.install(monkeypatch)
    with pytest.raises(RuntimeError, match="in training") if fails else contextlib.nullcontext():
        with distributed("cpu") as (dist, device):
            assert (dist.rank, dist.world_size, device.type) == (1, 2, "cpu")
            assert group.calls == ["init gloo"]
            if fails:
                raise RuntimeError("in training")
    assert group.calls == ["init gloo", "destroy"] if fails else ["init gloo", "barrier", "destroy"]


def test_a_group_made_by_the_caller_is_left_to_the_caller(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    group = _FakeGroup(initialized=True)
    group.install(monkeypatch)
    with distributed("cpu") as (dist, _):
        assert dist.is_main
    assert group.calls == ["barrier"] and group.initialized


def test_best_checkpoint_is_written_before_last(tmp_path, monkeypatch):
    """last.pt is what a resumed run reads: written last, a job killed between the two writes
    never resumes believing best.pt holds an epoch it does not."""
    from test_train_cli import compose_train

    from snn_delays import train, training

    written = []
    real = training.save_checkpoint

    def record(payload, path):
        written.append((path.name, payload["state"]["epoch"]))
        real(payload, path)

    monkeypatch.setattr(training, "save_checkpoint", record)
    train.run(compose_train(*RUN[:1], "trainer.epochs=2", "logger=none", "trainer.progress=false"), tmp_path)
    assert ("best.pt", 1) in written
    for name, epoch in written:
        if name == "best.pt":
            assert written.index(("best.pt", epoch)) < written.index(("last.pt", epoch)), written


def test_resume_from_a_run_folder_or_its_checkpoints_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(b"x")
    for given in (run, run / "checkpoints", last):
        cfg = OmegaConf.create({"trainer": {"resume": str(given)}})
        assert resume_path(cfg, tmp_path / "elsewhere") == last
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder without a checkpoint"):
        resume_path(OmegaConf.create({"trainer": {"resume": str(empty)}}), tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resume_path(OmegaConf.create({"trainer": {"resume": str(tmp_path / "nothing.pt")}}), tmp_path)


def test_resume_true_without_last_pt_warns(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="snn_delays"):
        assert resume_path(OmegaConf.create({"trainer": {"resume": True}}), tmp_path) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "starting from scratch" in caplog.text


def test_an_unreadable_last_pt_says_so_and_what_to_do(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "optim": {}, "state": {}, "rng": {}}, good)
    blob = good.read_bytes()
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "last.pt"
    for content in (b"", b"not a checkpoint at all", blob[: len(blob) // 2], b"\x80\x04K\x01."):
        path.write_bytes(content)
        with pytest.raises(RuntimeError) as err:
            load_for_resume(path, None, None, None)
        message = str(err.value)
        assert str(path) in message and "unreadable (truncated or corrupt" in message
        assert "Delete it" in message and f"trainer.resume={tmp_path / 'checkpoints' / 'best.pt'}" in message


def _run_dir(overrides: list[str]) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)


def test_plain_torchrun_runs_get_their_own_folder_shared_by_their_ranks(monkeypatch):
    """Plain torchrun (no --standalone, no --rdzv-id) sets TORCHELASTIC_RUN_ID=none for every run:
    a second run must not land in the first one's folder, yet all ranks of one run share theirs."""
    from snn_delays import train

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    folders = {}
    for torchrun_pid in (4100, 4200):  # two torchrun invocations, two ranks each
        monkeypatch.setattr(train.os, "getppid", lambda pid=torchrun_pid: pid)
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            folders[torchrun_pid, rank] = _run_dir(train._torchrun_overrides(["experiment=synthetic"]))
    assert folders[4100, "0"] == folders[4100, "1"] and folders[4200, "0"] == folders[4200, "1"]
    assert folders[4100, "0"] != folders[4200, "0"]
    assert all(f.startswith("outputs/torchrun/") for f in folders.values())

    # A rendezvous id (--standalone's random one, or --rdzv-id) names the folder; hydra.run.dir wins.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    assert _run_dir(train._torchrun_overrides([])) == "outputs/torchrun/job42"
    assert _run_dir(train._torchrun_overrides(["hydra.run.dir=out"])) is None


def test_keep_resume_point_leaves_a_runs_own_last_checkpoint(tmp_path):
    """Resumed in its own folder (from last.pt, or from its best.pt), a run keeps its last.pt;
    resumed from elsewhere, the checkpoint it continues from becomes its last.pt."""
    from snn_delays import train

    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"epoch 5")
    (run / "best.pt").write_bytes(b"epoch 3")
    train.keep_resume_point(run / "best.pt", run.parent)
    assert (run / "last.pt").read_bytes() == b"epoch 5"
    other = tmp_path / "other"
    train.keep_resume_point(run / "best.pt", other)
    assert (other / "checkpoints" / "last.pt").read_bytes() == b"epoch 3"
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["last.pt"]


def test_copy_checkpoint_never_leaves_a_half_written_copy(tmp_path, monkeypatch):
    """A job killed while a checkpoint is copied leaves the previous copy whole, as
    save_checkpoint does: the bytes go to a temporary file, renamed over the copy once written."""
    from snn_delays import training

    source = tmp_path / "first" / "last.pt"
    source.parent.mkdir()
    source.write_bytes(b"epoch 2" * 100)
    dest = tmp_path / "second" / "checkpoints" / "last.pt"
    training.copy_checkpoint(source, dest)
    assert dest.read_bytes() == source.read_bytes()
    source.write_bytes(b"epoch 3" * 100)

    def killed(src, dst):  # noqa: ANN001, ANN202
        with open(dst, "wb") as f:
            f.write(b"epo")
        raise KeyboardInterrupt

    monkeypatch.setattr(training.shutil, "copyfile", killed)
    with pytest.raises(KeyboardInterrupt):
        training.copy_checkpoint(source, dest)
    assert dest.read_bytes() == b"epoch 2" * 100
