"""What an offline W&B run holds (read back from its ``.wandb`` file), and the logger configs."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from snn_delays.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("wandb")
register_configs()


def wandb_records(run_dir: Path, timeout: float = 20.0) -> list:
    """Every record of the one offline run under ``run_dir/wandb``, once W&B's service has
    written them all (it may still be writing when ``finish`` returns): up to its exit record
    (or its footer: wandb 0.16 writes the summary and a footer after the exit record)."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while not (records := read_records(path)) or records[-1].WhichOneof("record_type") not in (
        "exit",
        "footer",
    ):
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.1)
    return records


def read_records(path: Path) -> list:
    """W&B's LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks (crc32,
    length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, off, buf, out = path.read_bytes(), 7, b"", []
    while off + 7 <= len(data):
        left = 32768 - off % 32768
        _, length, kind = struct.unpack("<IHB", data[off : off + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            off += left
            continue
        if off + 7 + length > len(data):  # still being written
            break
        buf = (b"" if kind in (1, 2) else buf) + data[off + 7 : off + 7 + length]
        off += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def items(update) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}


class Figure:
    """The one method the logger calls on a figure."""

    def savefig(self, buf, format="png", dpi=100):  # noqa: A002 - matplotlib's name
        from PIL import Image

        Image.new("RGB", (8, 8)).save(buf, format="png")


METRICS = {"best_valid_acc": 0.9, "test_acc": 0.8, "best_test_acc": 0.8, "n_params": 42}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> list:
    """The records of an offline run of 3 epochs, figures at epochs 2 and 3, as the trainer logs."""
    import numpy as np

    from snn_delays.loggers import WandbLogger

    run_dir = tmp_path_factory.mktemp("wandb_run")
    logger = WandbLogger(run_dir, mode="offline")
    for epoch, acc in ((1, 0.5), (2, 0.9), (3, 0.7)):
        logger.log_metrics({"valid/acc": acc, "test/acc": acc - 0.1}, step=epoch)
        if epoch >= 2:
            logger.log_figure("delays/histogram", Figure(), step=epoch)
            logger.log_histogram("delay/hist_ms/layer0", np.arange(5.0), step=epoch)
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))  # as the trainer, before finish
    logger.finish()
    return wandb_records(run_dir)


def test_wandb_step_is_the_epoch(offline_run):
    """An epoch's metrics, figures and histograms share one history row whose step is the epoch
    (W&B's media slider and histograms follow the step; a resumed offline run continues it)."""
    rows = [items(r.history.item) for r in offline_run if r.WhichOneof("record_type") == "history"]
    assert [(row["_step"], row["epoch"]) for row in rows] == [(1, 1), (2, 2), (3, 3)]
    # newer wandb (0.31) flattens a media value into "<key>/_type", ...; 0.16 keeps "<key>"
    media = {"delays/histogram", "delay/hist_ms/layer0"}
    assert all(media <= {k.split("/_type")[0] for k in row} for row in rows[1:])


def test_wandb_summary_holds_the_runs_metrics(offline_run):
    """The summary holds metrics.json (what runs are compared on: test_acc at the epoch chosen on
    validation, best_test_acc, n_params...), not only each key's last epoch."""
    summary: dict = {}
    for r in offline_run:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    assert {k: summary.get(k) for k in METRICS} == METRICS
    assert summary["valid/acc"] == 0.7  # the last epoch's, beside the best


def test_wandb_start_up_failure_names_the_folder_and_the_way_out(tmp_path):
    from snn_delays.loggers import WandbLogger

    (tmp_path / "wandb").write_text("a file where W&B wants its folder")
    with pytest.raises(RuntimeError, match="logger=csv") as err:
        WandbLogger(tmp_path, mode="offline")
    assert str(tmp_path / "wandb") in str(err.value)


def _compose(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_wandb_mode_follows_wandb_mode_env(monkeypatch):
    """WANDB_MODE (W&B's own switch) is honoured; without it the run is offline."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert _compose([]).logger.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _compose([]).logger.mode == "disabled"
    assert _compose(["logger.mode=online"]).logger.mode == "online"


def test_wandb_group_is_the_configuration_without_the_seed(monkeypatch):
    """A seed sweep's runs share a group (the overrides less seed, device, logger, resume, ...)
    and are named apart by their seed; explicit logger.group / logger.name win."""
    from snn_delays import loggers

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    seen = []

    class FakeWandb:
        id = "fake"

        @staticmethod
        def init(**kwargs):
            seen.append(kwargs)
            return FakeWandb

        @staticmethod
        def define_metric(*args, **kwargs):
            pass

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    common = ["model=no_delays", "trainer.device=cpu", "trainer.resume=true", "logger.figure_every=0"]
    hydra_config = HydraConfig.instance().cfg
    try:
        for seed in (0, 1):
            cfg = _compose([f"seed={seed}", *common])
            HydraConfig.instance().set_config(cfg)
            loggers.WandbLogger("unused", mode="offline")
        loggers.WandbLogger("unused", mode="offline", group="mine", name="run")
    finally:
        HydraConfig.instance().cfg = hydra_config
    a, b = "x=1," * 40 + "y=1", "x=1," * 40 + "y=2"  # alike in their first 128 characters
    assert len(loggers._at_most_128(a)) == 128 and loggers._at_most_128(a) != loggers._at_most_128(b)
    assert [(s["group"], s["name"]) for s in seen] == [
        ("model=no_delays", "model=no_delays,seed=0"),
        ("model=no_delays", "model=no_delays,seed=1"),
        ("mine", "run"),
    ]


def test_wandb_run_stopped_by_a_signal_is_marked_preempted(tmp_path, monkeypatch):
    """A run stopped by SIGTERM / SIGUSR1 before its last epoch showed as "finished" (exit code
    0). W&B's pre-emption protocol: a pre-empting record, then a non-zero exit code (128 +
    signum). Not in a W&B sweep, whose agent stops trailing runs (hyperband) with SIGTERM: a
    pre-empted run would be requeued there."""
    import signal

    from snn_delays.loggers import WandbLogger

    kinds = {}
    for name, stop, sweep in (
        ("done", None, None),
        ("stopped", signal.SIGTERM, None),
        ("stopped_in_sweep", signal.SIGTERM, "abc123"),
    ):
        if sweep:
            monkeypatch.setenv("WANDB_SWEEP_ID", sweep)
        else:
            monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
        logger = WandbLogger(tmp_path / name, mode="offline")
        logger.log_metrics({"valid/acc": 0.5}, step=1)
        if stop is not None:
            logger.preempted(stop)
        logger.finish()
        records = wandb_records(tmp_path / name)
        kinds[name] = (
            any(r.WhichOneof("record_type") == "preempting" for r in records),
            next(r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"),
        )
    assert kinds == {
        "done": (False, 0),
        "stopped": (True, 128 + signal.SIGTERM),
        "stopped_in_sweep": (False, 0),
    }


def test_csv_logger_writes_every_step_with_the_keys_it_logged(tmp_path):
    """Every logged step is a row of logs/metrics.csv, its own values under the union of the keys
    logged so far: a step that logs fewer keys than an earlier one (a metric of some epochs only)
    leaves those empty, and the earlier rows keep theirs."""
    import csv

    from snn_delays.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    logged = {
        1: {"train/loss": 1.5, "memory/peak_mib": 300.0},
        2: {"train/loss": 1.25},
        3: {"train/loss": 1.0, "valid/acc": 0.5},
        4: {"valid/acc": 0.75},
    }
    for step, metrics in logged.items():
        logger.log_metrics(metrics, step=step)
    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [{k: v for k, v in row.items() if v != ""} for row in rows] == [
        {"step": str(step), **{k: str(v) for k, v in metrics.items()}} for step, metrics in logged.items()
    ]
