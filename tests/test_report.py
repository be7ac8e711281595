"""snn-delays-report: a real 2-seed multirun through the command line, and grouping on fake runs."""

from __future__ import annotations

import csv
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snn_delays import report as rep


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_report_of_a_real_seed_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    train = _cli(
        "snn_delays.train",
        "-m",
        "seed=0,1",
        "experiment=synthetic",
        "trainer.epochs=1",
        "logger=none",
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(runs) == 2
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]

    out = _cli("snn_delays.report", str(sweep), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| experiment=")]
    assert len(table) == 1 and "| 2 | 0 1 |" in table[0]
    assert "seed" not in table[0] and "logger" not in table[0] and "progress" not in table[0]

    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert len(rows) == 1
    row = rows[0]
    assert row["configuration"] == "experiment=synthetic,trainer.epochs=1" and row["n"] == "2"
    for key in ("test_acc", "best_valid_acc", "train_seconds"):
        values = [m[key] for m in metrics]
        assert float(row[f"{key}_mean"]) == pytest.approx(sum(values) / 2, rel=1e-12, abs=1e-15)
        assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12)
    assert f"{100 * sum(m['test_acc'] for m in metrics) / 2:.2f}" in table[0]
    assert "experiment=synthetic,trainer.epochs=1" in (sweep / "report.md").read_text()


def _fake_run(root: Path, name: str, overrides: list[str], metrics: dict | None, epochs: int = 10) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "trainer": {"epochs": epochs}}))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps({"epochs": epochs, "train_seconds": 5.0, **metrics}))
    return run


def test_grouping_skips_and_statistics(tmp_path: Path) -> None:
    day = tmp_path / "multirun" / "2025-01-01" / "10-00-00"
    _fake_run(
        day,
        "0_a",
        ["seed=0", "model=delays", "trainer.device=cuda", "logger=none"],
        {"test_acc": 0.80, "best_valid_acc": 0.70, "best_test_acc": 0.85},
    )
    _fake_run(
        day,
        "1_b",
        ["seed=1", "model=delays", "trainer.device=cpu", "logger=wandb", "logger.mode=online"],
        {"test_acc": 0.90, "best_valid_acc": 0.75, "best_test_acc": 0.95},
    )
    _fake_run(
        day,
        "2_c",
        ["seed=0", "model=no_delays"],
        {"test_acc": 0.50, "best_valid_acc": 0.40, "best_test_acc": 0.55},
    )
    _fake_run(
        day,
        "10_d",
        ["seed=1", "model=no_delays", "+trainer.resume=true"],
        {"test_acc": 0.60, "best_valid_acc": 0.50, "best_test_acc": 0.65},
    )
    _fake_run(
        day,
        "3_e",
        ["seed=2", "model=no_delays"],
        {"test_acc": None, "best_valid_acc": 0.45, "best_test_acc": None},
    )
    _fake_run(day, "4_crashed", ["seed=3", "model=no_delays"], None)
    _fake_run(
        day, "5_preempted", ["seed=4", "model=no_delays"], {"test_acc": 0.3, "best_valid_acc": 0.3}, epochs=3
    )
    (day / "5_preempted" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"epochs": 150}}))

    groups, warnings = rep.report(tmp_path / "multirun", out=tmp_path / "out")

    assert [g.label for g in groups] == ["model=delays", "model=no_delays"]
    delays, plain = groups
    assert [r.seed for r in delays.runs] == ["0", "1"]
    assert [r.path.name for r in plain.runs] == ["2_c", "3_e", "10_d"]  # job 10 after job 3
    assert rep.stats(delays.values("test_acc")) == pytest.approx((0.85, statistics.stdev([0.8, 0.9])))
    assert plain.values("test_acc") == [0.5, 0.6]  # the null test_acc of 3_e is left out
    assert rep.stats(plain.values("best_valid_acc"))[0] == pytest.approx(0.45)
    assert rep.stats(plain.values("best_test_acc"))[0] == pytest.approx(0.60)
    assert len(warnings) == 3
    assert any("4_crashed" in w and "no metrics.json" in w for w in warnings)
    assert any("5_preempted" in w and "epoch 3 of 150" in w for w in warnings)
    assert any("3_e" in w and "test_acc, best_test_acc null" in w for w in warnings)

    rows = {r["configuration"]: r for r in csv.DictReader(open(tmp_path / "out" / "report.csv"))}
    assert rows["model=no_delays"]["n"] == "3" and rows["model=no_delays"]["test_acc_n"] == "2"
    assert rows["model=no_delays"]["best_test_acc_n"] == "2"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| model=delays | 2 | 0 1 | 85.00 ± 7.07 | 72.50 ± 3.54 | 90.00 ± 7.07 | 5.0 ± 0.0 |" in md
    assert "| model=no_delays | 3 | 0 2 1 | 55.00 ± 7.07 (n=2) | 45.00 ± 5.00 | 60.00 ± 7.07 (n=2) |" in md
    assert "4_crashed" in md


def test_runs_without_overrides_are_told_apart_by_their_config(tmp_path: Path) -> None:
    for i, dropout in enumerate([0.1, 0.1, 0.4]):
        run = tmp_path / f"run{i}"
        (run / ".hydra").mkdir(parents=True)
        config = {
            "seed": i,
            "model": {"dropout": dropout, "n_hidden": 64},
            "trainer": {"epochs": 2, "device": f"cuda:{i}"},
        }
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "metrics.json").write_text(json.dumps({"test_acc": 0.5 + i / 10, "epochs": 2}))
    groups, warnings = rep.report(tmp_path)
    assert [(g.label, len(g.runs)) for g in groups] == [("model.dropout=0.1", 2), ("model.dropout=0.4", 1)]
    assert not any("same seed" in w for w in warnings)
    _fake_run(tmp_path / "again", "0_a", ["seed=0", "model.dropout=0.1"], {"test_acc": 0.5})
    _fake_run(tmp_path / "again", "1_a", ["seed=0", "model.dropout=0.1"], {"test_acc": 0.5})
    _, warnings = rep.report(tmp_path / "again")
    assert (
        warnings[-1]
        == "model.dropout=0.1: the same seed more than once (0 0): those runs are not independent"
    )


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit, match="no runs under"):
        rep.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="not a directory"):
        rep.main([str(tmp_path / "missing")])
    _fake_run(tmp_path, "0_x", ["seed=0"], None)
    with pytest.raises(SystemExit, match="none of the 1 runs"):
        rep.main([str(tmp_path)])
    assert "warning: skipped 0_x: no metrics.json" in capsys.readouterr().err


def test_ignored_keys_are_keys_of_the_training_config() -> None:
    """Every ignored key names a key of the composed training config, with one dataset or
    another (a stale name would ignore nothing), and every key the trainer lets a resumed run
    change is ignored: such a key does not change the experiment."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from snn_delays.config import register_configs
    from snn_delays.train import RESUMABLE_KEYS

    register_configs()
    conf = Path(__file__).resolve().parent.parent / "conf"
    datasets = sorted(p.stem for p in (conf / "dataset").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfgs = [compose("train", [f"dataset={d}"], return_hydra_config=True) for d in datasets]
    for key in rep.IGNORED:
        assert any(OmegaConf.select(cfg, key, default="<missing>") != "<missing>" for cfg in cfgs), key
    assert [key for key in RESUMABLE_KEYS if not rep.is_ignored(key)] == []


def test_override_keys() -> None:
    assert rep.parse_override("+model.x=3") == ("model.x", "3")
    assert rep.parse_override("~model.x") == ("~model.x", "")
    assert rep.parse_override("a=b=c") == ("a", "b=c")
    for key in ("seed", "logger", "logger.mode", "hydra/launcher", "trainer.device", "~trainer.resume"):
        assert rep.is_ignored(key)
    for key in ("model", "trainer.epochs", "loggers", "dataset.pool"):
        assert not rep.is_ignored(key)


def test_malformed_runs_are_skipped_with_a_warning_naming_the_file(tmp_path: Path) -> None:
    day = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_run(day, f"{seed}_ok", [f"seed={seed}"], {"test_acc": 0.5 + seed / 10, "epochs": 10})
    _fake_run(day, "2_list", ["seed=2"], {"test_acc": 0.9, "epochs": 10})
    (day / "2_list" / "metrics.json").write_text(json.dumps([0.9, 10]))
    _fake_run(day, "3_scalar_trainer", ["seed=3"], {"test_acc": 0.9, "epochs": 10})
    (day / "3_scalar_trainer" / ".hydra" / "config.yaml").write_text("seed: 3\ntrainer: 5\n")
    _fake_run(day, "4_bad_overrides", ["seed=4"], {"test_acc": 0.9, "epochs": 10})
    (day / "4_bad_overrides" / ".hydra" / "overrides.yaml").write_text("- seed=4\n- [unclosed\n")
    _fake_run(day, "5_bad_config", ["seed=5"], {"test_acc": 0.9, "epochs": 10})
    (day / "5_bad_config" / ".hydra" / "config.yaml").write_text("trainer: {epochs: [\n")
    _fake_run(day, "6_overrides_mapping", ["seed=6"], {"test_acc": 0.9, "epochs": 10})
    (day / "6_overrides_mapping" / ".hydra" / "overrides.yaml").write_text("seed: 6\n")
    groups, warnings = rep.report(day)
    assert [len(g.runs) for g in groups] == [2]  # only the two good runs count
    text = "\n".join(warnings)
    assert "skipped 2_list: malformed metrics.json" in text
    assert "skipped 3_scalar_trainer: malformed .hydra/config.yaml" in text
    assert "skipped 4_bad_overrides: unreadable .hydra/overrides.yaml" in text
    assert "skipped 5_bad_config: unreadable .hydra/config.yaml" in text
    assert "skipped 6_overrides_mapping: malformed .hydra/overrides.yaml" in text


def test_an_output_folder_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    _fake_run(tmp_path / "sweep", "0_a", ["seed=0"], {"test_acc": 0.5})
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(
            SystemExit, match=f"cannot write report.csv and report.md into {re.escape(str(out))} .*--out"
        ):
            rep.main([str(tmp_path / "sweep"), "--out", str(out)])


def test_a_tilde_in_the_folders_is_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_run(tmp_path / "sweep", "0_a", ["seed=0"], {"test_acc": 0.5})
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    rep.main(["~/sweep", "--out", "~/out"])  # as from a quoted path or --out=~/out
    assert (tmp_path / "out" / "report.csv").is_file() and not (tmp_path / "~").exists()


def test_an_ignore_key_no_run_has_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--ignore optim.lr`` for ``optim.weights.lr`` silently ignored nothing: the runs stayed
    apart and the report looked as if the key made a difference."""
    for seed, lr in ((0, "0.1"), (1, "0.2")):
        _fake_run(
            tmp_path / "sweep", f"{seed}", [f"seed={seed}", f"optim.weights.lr={lr}"], {"test_acc": 0.5}
        )
    rep.main([str(tmp_path / "sweep"), "--ignore", "optim.lr"])
    assert "--ignore optim.lr: no run has that key" in capsys.readouterr().err
    rep.main([str(tmp_path / "sweep"), "--ignore", "optim.weights"])  # a prefix of a key does count
    out = capsys.readouterr()
    assert "no run has that key" not in out.err and "configurations: 1" in out.out


def test_a_run_stopped_in_its_last_epoch_is_skipped(tmp_path: Path) -> None:
    """Only a run that finished every configured epoch counts: one stopped one epoch short (in its
    last epoch) is skipped, as one stopped early is."""
    sweep = tmp_path / "sweep"
    accs = {"test_acc": 0.5, "best_valid_acc": 0.6, "best_test_acc": 0.7}
    _fake_run(sweep, "0_done", ["seed=0"], accs, epochs=10)
    _fake_run(sweep, "1_short", ["seed=1"], accs, epochs=10)
    (sweep / "1_short" / "metrics.json").write_text(json.dumps({**accs, "train_seconds": 5.0, "epochs": 9}))
    groups, warnings = rep.report(sweep)
    assert [[r.path.name for r in g.runs] for g in groups] == [["0_done"]]
    assert warnings == ["skipped 1_short: stopped after epoch 9 of 10 (resume it with trainer.resume=true)"]
