"""snn-delays-eval: the checkpoint's own data, only location overrides, one result file per checkpoint."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from hydra import compose, initialize_config_dir
from test_plots import tiny_run

from snn_delays.checkpoints import ForeignCheckpointError, UnreadableCheckpointError
from snn_delays.evaluate import dataset_config, evaluate_checkpoint
from snn_delays.train import CONF_DIR


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory)  # synthetic, n_train=128, n_valid=32, n_test=32


def eval_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def shd_saved(**changes) -> dict:
    """The dataset section a run with ``dataset=shd`` and ``changes`` saves in its checkpoint."""
    saved = yaml.safe_load((Path(CONF_DIR) / "dataset" / "shd.yaml").read_text())
    return {**saved, **changes}


TRAINED = {"dt_ms": 20.0, "pool": 10, "max_duration_s": 1.0, "valid_fraction": 0.2, "seed": 3}


@pytest.mark.parametrize(
    "overrides",
    [["++dataset.root=/data/shd"], ["dataset=shd", "++dataset.root=/data/shd"]],
    ids=["root-only", "readme-command"],
)
def test_eval_data_is_the_checkpoints_with_the_location_overridden(overrides):
    saved = shd_saved(**TRAINED)
    cfg = eval_cfg("checkpoint=x.pt", *overrides)
    merged = dataset_config(saved, cfg.dataset, overrides)
    assert dict(merged) == {**saved, "root": "/data/shd"}  # dt_ms=20, pool=10, split... kept
    allowed = ["++dataset.download=false", "++dataset.cache=false", "++dataset.dt_ms=20"]
    merged = dataset_config(saved, eval_cfg("checkpoint=x.pt", *allowed).dataset, allowed)
    assert merged.download is False and merged.cache is False and merged.dt_ms == 20.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dt_ms", "10"),
        ("pool", "5"),
        ("n_channels", "350"),
        ("max_duration_s", "null"),
        ("start_at_first_spike", "false"),
        ("valid_fraction", "0.1"),
        ("seed", "0"),
    ],
)
def test_eval_refuses_other_preprocessing(key, value):
    saved = shd_saved(**TRAINED)
    overrides = [f"++dataset.{key}={value}"]
    with pytest.raises(ValueError, match=f"dataset.{key}=") as err:
        dataset_config(saved, eval_cfg("checkpoint=x.pt", *overrides).dataset, overrides)
    old = repr(saved[key])
    assert f"checkpoint's dataset.{key}={old}" in str(err.value)


def test_eval_refuses_another_dataset_and_unknown_keys():
    saved = shd_saved(**TRAINED)
    with pytest.raises(ValueError, match="load_shd, not snn_delays.data.spikes.load_ssc"):
        dataset_config(saved, eval_cfg("checkpoint=x.pt", "dataset=ssc").dataset, ["dataset=ssc"])
    overrides = ["++dataset.n_mels=40"]
    with pytest.raises(ValueError, match="dataset.n_mels: the checkpoint's dataset"):
        dataset_config(saved, eval_cfg("checkpoint=x.pt", *overrides).dataset, overrides)


@pytest.mark.parametrize("extra", ["+model.n_hidden=32", "+trainer.device=cpu", "+epochs=3"])
def test_eval_refuses_keys_it_does_not_use(extra, run_dir):
    cfg = eval_cfg(f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", extra)
    key = extra.lstrip("+").partition("=")[0]
    with pytest.raises(ValueError, match=f"{key}: not a setting of snn-delays-eval") as err:
        evaluate_checkpoint(cfg, [extra])
    assert "come from the checkpoint" in str(err.value)


def test_eval_with_the_dataset_group_keeps_the_runs_sizes(run_dir):
    best = run_dir / "checkpoints" / "best.pt"
    own = evaluate_checkpoint(eval_cfg(f"checkpoint={best}"), [])
    grouped = evaluate_checkpoint(eval_cfg(f"checkpoint={best}", "dataset=synthetic"), ["dataset=synthetic"])
    assert grouped == own  # not the group's defaults (n_test=256)


def test_eval_command_writes_one_file_per_checkpoint(run_dir, tmp_path):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    for name in ("best", "last"):
        # dataset.KEY=VALUE without a dataset group: the checkpoint's dataset with that key
        proc = run_cli("evaluate", f"checkpoint={run / 'checkpoints' / f'{name}.pt'}", "dataset.seed=0")
        assert f"eval_{name}.json" in proc.stdout
    best, last = (json.loads((run / "checkpoints" / f"eval_{n}.json").read_text()) for n in ("best", "last"))
    assert best["checkpoint"].endswith("best.pt") and last["checkpoint"].endswith("last.pt")
    metrics = json.loads((run / "metrics.json").read_text())
    assert best["test"]["acc"] == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert not (run / "checkpoints" / "eval.json").exists()
    proc = run_cli(
        "evaluate", f"checkpoint={run / 'checkpoints' / 'best.pt'}", "dataset.n_test=256", check=False
    )
    assert proc.returncode == 2 and "dataset.n_test=256" in proc.stderr and "dataset.n_test=32" in proc.stderr


def test_eval_takes_a_run_folder_and_names_what_is_missing(run_dir, tmp_path):
    """``checkpoint=RUN_DIR`` (as ``snn-delays-plot`` and ``trainer.resume`` take it) was refused as
    "no such file"; without ``checkpoint=`` the command printed omegaconf's traceback."""
    from snn_delays.evaluate import output_path

    best = evaluate_checkpoint(eval_cfg(f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}"), [])
    for folder in (run_dir, run_dir / "checkpoints"):
        cfg = eval_cfg(f"checkpoint={folder}")
        assert evaluate_checkpoint(cfg, []) == best
        assert output_path(cfg) == run_dir / "checkpoints" / "eval_best.json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"checkpoint=.*empty: no checkpoint at .*checkpoints/best.pt"
    ):
        evaluate_checkpoint(eval_cfg(f"checkpoint={tmp_path / 'empty'}"), [])
    proc = run_cli("evaluate", check=False)
    assert proc.returncode == 2 and "no checkpoint given: snn-delays-eval checkpoint=RUN_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_paths_given_with_a_tilde_are_in_the_home_folder(run_dir, tmp_path, monkeypatch):
    """Hydra's grammar needs ``key="~/x"`` quoted, and no shell expands it then: ``checkpoint``,
    ``output`` and ``trainer.resume`` looked for a folder named ``~``."""
    from omegaconf import OmegaConf

    from snn_delays.evaluate import output_path
    from snn_delays.train import resume_path

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(run_dir, tmp_path / "run")
    cfg = eval_cfg('checkpoint="~/run"', 'output="~/out.json"')
    assert evaluate_checkpoint(cfg, [])["test"]["acc"] >= 0
    assert output_path(cfg) == tmp_path / "out.json"
    resume = OmegaConf.create({"trainer": {"resume": "~/run"}})
    assert resume_path(resume, tmp_path / "elsewhere") == tmp_path / "run" / "checkpoints" / "last.pt"


def test_eval_names_an_unreadable_checkpoint(run_dir, tmp_path):
    bad = tmp_path / "checkpoints" / "best.pt"
    bad.parent.mkdir()
    data = (run_dir / "checkpoints" / "best.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(UnreadableCheckpointError, match="truncated or corrupt") as err:
        evaluate_checkpoint(eval_cfg(f"checkpoint={bad}"), [])
    assert str(bad) in str(err.value) and "last.pt" in str(err.value)
    # a run's other file given by mistake is not "truncated or corrupt, the run was killed"
    with pytest.raises(UnreadableCheckpointError, match="is not a checkpoint") as err:
        evaluate_checkpoint(eval_cfg(f"checkpoint={run_dir / 'metrics.json'}"), [])
    assert "killed" not in str(err.value) and "RUN/checkpoints/best.pt" in str(err.value)


def test_eval_scores_in_the_runs_evaluation_batches(run_dir, tmp_path, monkeypatch):
    """A batch is padded to its longest sample and the scores see the padding, so eval takes the
    run's trainer.eval_batch_size (its metrics.json's scores) unless batch_size=N is given."""
    from snn_delays import evaluate as ev

    payload = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    payload["config"]["trainer"]["eval_batch_size"] = 7
    ckpt = tmp_path / "best.pt"
    torch.save(payload, ckpt)
    seen, real = [], ev.evaluate
    monkeypatch.setattr(
        ev,
        "evaluate",
        lambda model, split, batch, **kw: seen.append(batch) or real(model, split, batch, **kw),
    )
    evaluate_checkpoint(eval_cfg(f"checkpoint={ckpt}"), [])
    evaluate_checkpoint(eval_cfg(f"checkpoint={ckpt}", "batch_size=5"), [])
    assert seen == [7, 7, 5, 5]  # valid and test
    for bad in ("0", "-2", "1.5", "true"):
        with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
            evaluate_checkpoint(eval_cfg(f"checkpoint={ckpt}", f"batch_size={bad}"), [])


def test_eval_names_a_file_it_cannot_rebuild_a_network_from(run_dir, tmp_path):
    """A .pt that snn-delays-train did not write, or weights that do not fit the config: a message
    naming the file and exit status 2, as snn-delays-plot, not a KeyError traceback."""
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    proc = run_cli("evaluate", f"checkpoint={foreign}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{foreign}: cannot rebuild the network" in proc.stderr and "no 'model' entry" in proc.stderr
    payload = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    payload["config"]["model"]["n_hidden"] += 1
    resized = tmp_path / "resized.pt"
    torch.save(payload, resized)
    with pytest.raises(ForeignCheckpointError, match="size mismatch") as err:
        evaluate_checkpoint(eval_cfg(f"checkpoint={resized}"), [])
    assert str(resized) in str(err.value)


@pytest.mark.parametrize("progress", ["true", "false"])
def test_eval_draws_a_bar_per_split_unless_told_not_to(run_dir, capsys, progress):
    """Evaluating a large split (SSC's test set on a CPU) showed nothing until it ended."""
    best = run_dir / "checkpoints" / "best.pt"
    evaluate_checkpoint(eval_cfg(f"checkpoint={best}", f"progress={progress}", "batch_size=8"), [])
    err = capsys.readouterr().err
    for split in ("valid", "test"):
        assert (f"{split}:   0%" in err and "0/4" in err) is (progress == "true"), err  # 4 batches
    assert progress == "true" or err == ""


def test_evaluation_scores_are_the_integer_delay_networks_over_every_sample():
    """evaluate(): the mean over samples of SPEC's loss and the share of argmax hits, of the
    evaluated network (eval mode: running BatchNorm statistics, rounded delays), whatever the
    batch size (a last, smaller batch included)."""
    from test_trainer_settings import _tiny_net, _written_out_loss

    from snn_delays.data.base import Split
    from snn_delays.training import evaluate

    model = _tiny_net()
    with torch.no_grad():  # running statistics that differ from a batch's own
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(1)
    n = 11
    x = (torch.rand(n, 15, 6) < 0.3).float()
    split = Split(x, torch.full((n,), 15), torch.randint(3, (n,)))
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        losses, p = _written_out_loss(reference(x.transpose(0, 1)), split.y)
    want_acc = float((p.argmax(-1) == split.y).double().mean())
    model.train()  # evaluate() switches to the evaluated network itself
    for batch in (4, n):
        got = evaluate(model, split, batch)
        assert got["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
        assert got["acc"] == pytest.approx(want_acc)


def test_eval_scores_each_split_as_the_run_did_at_its_best_epoch(run_dir):
    """best.pt evaluated on each split gives the loss and accuracy the run recorded for that
    split at its best epoch (the same integer-delay network, data and batches): the valid
    result is the validation split's, the test result the test split's."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = rows[metrics["best_epoch"] - 1]
    results = evaluate_checkpoint(
        eval_cfg(f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "progress=false"), []
    )
    assert set(results) == {"valid", "test"}
    for split in ("valid", "test"):
        assert results[split]["acc"] == pytest.approx(float(row[f"{split}/acc"]), abs=1e-12), split
        assert results[split]["loss"] == pytest.approx(float(row[f"{split}/loss"]), rel=1e-6), split
    assert results["valid"]["loss"] != results["test"]["loss"]  # two splits, two scores


def test_a_checkpoint_missing_a_tensor_is_refused(run_dir, tmp_path):
    """A checkpoint whose model lacks a tensor (sigma, a BatchNorm statistic) cannot be the
    trained network: loaded anyway, the fresh model's value would stand in for it (a running
    variance of 1, sigma K // 2) and another network than the one trained be evaluated."""
    payload = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    for suffix in ("running_var", "SIG"):
        broken = {**payload, "model": dict(payload["model"])}
        key = next(k for k in broken["model"] if k.endswith(suffix))
        del broken["model"][key]
        path = tmp_path / f"no_{suffix}.pt"
        torch.save(broken, path)
        with pytest.raises(ForeignCheckpointError, match=f"Missing key.*{key}"):
            evaluate_checkpoint(eval_cfg(f"checkpoint={path}"), [])
