"""``snn-delays-train``: the Hydra entry point (also ``python -m snn_delays.train``).

This is the one place where configs become objects (``hydra.utils.instantiate``, through
:func:`snn_delays.config.build`, which keeps the errors' messages readable); everything
below receives built objects. Outputs land in the Hydra run directory: ``metrics.json``,
``metrics.csv`` (one row per epoch), ``checkpoints/{best,last}.pt``, the logger's files and
``train.log`` (one line per epoch, and the result).
Under ``torchrun`` every rank trains a shard of each epoch (DistributedDataParallel) and only
rank 0 logs and writes.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import inspect
import json
import logging
import math
import os
import random
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from snn_delays import fast_delays
from snn_delays.checkpoints import UnreadableCheckpointError, find_checkpoint, read_checkpoint
from snn_delays.config import build, check_config, register_configs
from snn_delays.cuda_graphs import set_capturable
from snn_delays.data.base import progress_bars
from snn_delays.model import DelaySNN
from snn_delays.plots import PositionTrace, log_epoch_figures
from snn_delays.training import (
    Distributed,
    FitConfig,
    Optimization,
    StopFlag,
    TrainState,
    copy_checkpoint,
    fit,
    set_random_states,
    summary,
)

log = logging.getLogger("snn_delays")


def _conf_dir() -> str:
    """The configs: ``snn_delays/conf`` in an installed wheel (setup.cfg ships ``conf/`` there),
    else the checkout's ``conf/`` beside the package (an editable install, or a source tree)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if (packaged / "train.yaml").is_file() else here.parent / "conf")


CONF_DIR = _conf_dir()
register_configs()


def pick_device(name: str, key: str = "trainer.device") -> torch.device:
    """The device setting ``key``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or another torch
    device type that this machine has (``mps``, ...); a numbered GPU also becomes the current
    device, which Triton's launches, the CUDA graphs' stream and the memory counters follow."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N ({err})") from None
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type != "cpu" and not getattr(backend, "is_available", lambda: False)():
        raise RuntimeError(
            f"{key}={name} but this machine's torch has no {device.type} device; use {key}=cpu or auto"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(
                f"{key}={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
        torch.cuda.set_device(device)
    return device


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of ``rank`` (at ``epoch``, for a resumed run whose stored state does not fit),
    within 0 .. 2**32 - 1 as numpy requires: ``seed=4294967295`` is valid on every rank."""
    return (seed + rank + 65_537 * epoch) % 2**32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(model_cfg: DictConfig, n_inputs: int, n_classes: int, dt_ms: float) -> DelaySNN:
    return build(model_cfg, n_inputs=n_inputs, n_classes=n_classes, dt_ms=dt_ms)


def build_optimization(cfg: DictConfig, model: DelaySNN, epochs: int) -> Optimization:
    """The paper's two optimizers; weight decay on synaptic weights only."""
    groups = [
        {"params": model.weight_parameters(), "weight_decay": cfg.weight_decay},
        {"params": list(model.other_parameters()), "weight_decay": 0.0},
    ]
    weights = build(cfg.weights)(groups)
    if epochs < 3 and str(cfg.weights_scheduler.get("_target_", "")).endswith("OneCycleLR"):
        log.warning(
            "trainer.epochs=%d: the one-cycle schedule is stepped once per epoch and its last epoch runs "
            "at max_lr / 25e4, so the weights barely train (the only epoch of 1, the second of 2); "
            "a smoke test is fine, a result needs more epochs",
            epochs,
        )
    opt = Optimization(weights, _schedule(build(cfg.weights_scheduler), weights, total_steps=epochs))
    layers = model.delay_layers()
    if model.delay_parameters():
        opt.positions = build(cfg.positions)(model.delay_parameters())
        opt.positions_scheduler = _schedule(build(cfg.positions_scheduler), opt.positions, T_max=epochs)
    if layers:
        opt.sigma_init = layers[0].sigma
        opt.sigma_final = cfg.sigma_final
        opt.sigma_decay_epochs = max(1, int(epochs * cfg.sigma_decay_fraction))
    return opt


def _schedule(make: Any, optimizer: torch.optim.Optimizer, **length: int) -> Any:
    """The scheduler ``make`` (a partial) over ``optimizer``, given the run's length in epochs
    (OneCycleLR's ``total_steps``, CosineAnnealingLR's ``T_max``) where it takes that argument:
    another scheduler (StepLR, ConstantLR, ...) keeps its own settings. Stepped once per epoch."""
    params = inspect.signature(make).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return make(optimizer, **length)
    return make(optimizer, **{k: v for k, v in length.items() if k in params})


@contextlib.contextmanager
def distributed(device_name: str) -> Iterator[tuple[Distributed, torch.device]]:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU).

    On the way out the ranks meet at a barrier, then a group this made is destroyed (error or
    not; a group the caller had made is left to the caller). The barrier is what keeps the job
    alive: gloo's worker threads drop their last reference to a finished collective a moment
    after the caller has seen it finish, and dropping it takes the GIL. A rank that reaches
    interpreter teardown first aborts in that thread (SIGABRT, "terminate called without an
    active exception", about one torchrun test in twenty here), and torchrun fails the whole
    job. Waiting at the barrier releases the GIL until every rank is done, so those threads
    finish their work first. Destroying the group alone would not do: it joins those threads
    only when nothing else holds the group, and DistributedDataParallel's constructor leaves
    references to it behind (torch 2.13). The barrier made the abort rare, not impossible, so
    the command-line entry point also ends a worker without the interpreter's finalization
    (:func:`exit_without_finalizing`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Distributed(), pick_device(device_name)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    made = not torch.distributed.is_initialized()
    if made:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Distributed(rank, world), device
        torch.distributed.barrier()
    finally:
        if made and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def write_outputs(
    run_dir: Path, state: TrainState, n_params: int, selected_on: str = "valid"
) -> dict[str, Any]:
    """metrics.json and metrics.csv; ``selected_on``: the split the best epoch was chosen on."""
    metrics = {**summary(state, n_params), "selected_on": selected_on}
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    (run_dir / "metrics.json").write_text(json.dumps(clean, indent=2) + "\n")
    if state.history:
        keys = list(dict.fromkeys(k for row in state.history for k in row))
        with open(run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(state.history)
    return clean


def result_line(metrics: dict[str, Any], epochs: int, run_dir: Path) -> str:
    """The run's result as one log line, from ``metrics.json``'s numbers."""

    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    done = "finished" if metrics["epochs"] >= epochs else "stopped after"
    others = "" if metrics["selected_on"] == "test" else f"best_valid_acc {acc(metrics['best_valid_acc'])}, "
    return (
        f"{done} {metrics['epochs']}/{epochs} epochs ({metrics['train_seconds']:.1f} s of training): "
        f"test_acc {acc(metrics['test_acc'])} at epoch {metrics['best_epoch']}, chosen on "
        f"{metrics['selected_on']} ({others}best_test_acc {acc(metrics['best_test_acc'])}); "
        f"{run_dir / 'metrics.json'}"
    )


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names: this run's last.pt (true), a file, or a run folder
    or its checkpoints/ folder (their last.pt). None: start from scratch."""
    resume = cfg.trainer.resume
    if not _resume_requested(cfg):
        return None
    if resume in (True, "true"):
        path = run_dir / "checkpoints" / "last.pt"
        if not path.is_file():
            log.warning("trainer.resume=true but %s does not exist yet: starting from scratch", path)
            return None
        return path
    path = Path(str(resume)).expanduser()  # ~ as written in zsh, which leaves it in key=~/x
    try:
        return find_checkpoint(path, "last")
    except FileNotFoundError as err:
        if path.is_dir():
            raise FileNotFoundError(
                f"trainer.resume={resume} is a folder without a checkpoint: neither "
                f"{path / 'checkpoints' / 'last.pt'} nor {path / 'last.pt'} exists; give a run folder, "
                "its checkpoints/ folder or a .pt file"
            ) from err
        raise FileNotFoundError(f"trainer.resume={resume}: no checkpoint at {path}") from err


def _resume_requested(cfg: DictConfig) -> bool:
    return cfg.trainer.resume not in (False, None, "false", "")


def _restart_count() -> int:
    """How many times SLURM (a requeued job, submitit's too) or torchrun restarted this job."""
    counts = (os.environ.get(k, "0") for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))
    return max((int(c) for c in counts if c.strip().isdigit()), default=0)


def refuse_to_overwrite(cfg: DictConfig, run_dir: Path) -> None:
    """A run folder holding a run's checkpoints/last.pt is not started again from scratch unless
    asked for (trainer.resume=true continues it). A requeued SLURM job or a restarted torchrun
    worker reruns its own command in its own folder: without trainer.resume it starts over, with
    a warning, as it always has."""
    last = run_dir / "checkpoints" / "last.pt"
    if _resume_requested(cfg) or not last.is_file():
        return
    restarts = _restart_count()
    if restarts > 0:
        log.warning(
            "restarted job (restart %d) without trainer.resume=true: training again from scratch over %s",
            restarts,
            last,
        )
        return
    raise FileExistsError(
        f"{last} exists: {run_dir} already holds a run. Use trainer.resume=true to continue it, or "
        "another hydra.run.dir (hydra.sweep.dir for a -m sweep), or delete the folder, to start a new run"
    )


def fit_config(cfg: DictConfig) -> FitConfig:
    """The trainer's settings, checked (a bad value fails here, before any data is read)."""
    return FitConfig(
        cfg.trainer.epochs,
        cfg.trainer.batch_size,
        cfg.trainer.eval_batch_size,
        cfg.trainer.progress,
        cfg.trainer.save_checkpoints,
        cfg.seed,
        cfg.trainer.cuda_graphs,
    )


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the metrics of metrics.json."""
    check_config(cfg)  # a key nothing would read, or a bad model name: refused before any data is read
    fit_cfg = fit_config(cfg)
    build(cfg.augment, n_classes=2)  # and a bad augment.* value (built for real once the data says n_classes)
    refuse_to_overwrite(cfg, run_dir)
    with distributed(cfg.trainer.device) as (dist, device):
        return _train(cfg, run_dir, dist, device, fit_cfg)


def _train(
    cfg: DictConfig, run_dir: Path, dist: Distributed, device: torch.device, fit_cfg: FitConfig
) -> dict[str, Any]:
    if device.type == "cpu":
        fast_delays.keep_freed_memory()  # activations reused, not re-faulted every step
    seed_everything(rank_seed(cfg.seed, dist.rank))
    # The checkpoint is read, and checked against the config, before the data: a resume with
    # another dataset or preprocessing is refused at once, naming the key, not after a download.
    ckpt = resume_path(cfg, run_dir)
    saved = read_for_resume(ckpt, cfg) if ckpt is not None else None
    with progress_bars(fit_cfg.progress and dist.is_main):  # downloads, binning, features
        data = build(cfg.dataset)
    model = build_model(cfg.model, data.n_inputs, data.n_classes, data.dt_ms).to(device)
    opt = build_optimization(cfg.optim, model, cfg.trainer.epochs)
    data = data.to(device)
    augment = build(cfg.augment, n_classes=data.n_classes)
    config = OmegaConf.to_container(cfg, resolve=True)
    state, logger_kwargs = TrainState.fresh(cfg.seed), {}
    if ckpt is not None:
        state, logger_kwargs = load_for_resume(ckpt, cfg, model, opt, dist, saved)
        if dist.is_main and fit_cfg.save_checkpoints:
            keep_resume_point(ckpt, run_dir)
            keep_best_checkpoint(ckpt, saved, state, run_dir)
    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    logger = build(cfg.logger, run_dir=run_dir, **logger_kwargs) if dist.is_main else None
    sizes = {"n_inputs": data.n_inputs, "n_classes": data.n_classes, "dt_ms": data.dt_ms}  # from the data
    if logger is not None:  # and what the run derived: the data's sizes, the kernel's taps
        layers = model.delay_layers()
        model_cfg = {
            **config["model"],
            "kernel_size": layers[0].kernel_size if layers else config["model"].get("kernel_size"),
        }
        logger.log_config({**config, "model": model_cfg, "data": sizes})
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist.world_size > 1:
        log.info(
            "%d ranks: each trains on %d of %d samples per epoch",
            dist.world_size,
            len(dist.even_shard(torch.arange(len(data.train)))),  # the same on every rank
            len(data.train),
        )
    log.info(
        "%s on %s: %d samples train / %d valid / %d test, %d parameters, K=%d",
        data.name,
        device,
        len(data.train),
        len(data.valid),
        len(data.test),
        n_params,
        model.kernel_size,
    )
    extra = {
        "config": config,
        "data": {**sizes, "name": data.name},
        "logger_run_id": getattr(logger, "run_id", None),
    }
    selected_on = "valid" if len(data.valid) else "test"
    if selected_on == "test":
        why = next(
            (f"dataset.{k}={cfg.dataset[k]}" for k in ("valid_fraction", "n_valid") if k in cfg.dataset), ""
        )
        log.warning(
            "no validation split%s: the epoch is chosen on the test set, so test_acc equals "
            "best_test_acc (metrics.json: selected_on test)",
            f" ({why})" if why else "",
        )
    on_epoch_end = figure_hook(cfg, run_dir, model, data, logger, state.epoch, resumed=ckpt is not None)
    # Watch for SIGTERM/SIGUSR1/Ctrl-C until the outputs are written: a late signal must not cut
    # them. After a Ctrl-C, leaving the block raises KeyboardInterrupt (main() exits by SIGINT).
    with StopFlag() as stop:
        state = fit(
            net,
            data,
            opt,
            logger,
            fit_cfg,
            run_dir,
            state,
            dist,
            extra,
            on_epoch_end=on_epoch_end if dist.is_main else None,
            augment=augment,
            stop=stop,
        )
        metrics = write_outputs(run_dir, state, n_params, selected_on) if dist.is_main else {}
        if dist.is_main and state.history:
            log.info("%s", result_line(metrics, cfg.trainer.epochs, run_dir))
        if logger is not None:
            # stopped by a signal, to be resumed (a logger of one's own may lack the method)
            if state.stopped_by is not None and hasattr(logger, "preempted"):
                logger.preempted(state.stopped_by)
            logger.finish()
        if state.stopped_by is not None:
            log.warning(
                "stopped by %s after epoch %d: %s",
                signal_name(state.stopped_by),
                state.epoch,
                "resume with trainer.resume=true"
                if cfg.trainer.save_checkpoints
                else "no checkpoint was saved (trainer.save_checkpoints=false), so it cannot be resumed",
            )
    return metrics


def signal_name(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    return f"Ctrl-C ({name})" if signum == signal.SIGINT else name


def figure_hook(
    cfg: DictConfig, run_dir: Path, model: DelaySNN, data: Any, logger: Any, epoch: int, resumed: bool
) -> Callable[[DelaySNN, TrainState], None]:
    """Record the position trace each epoch; every ``logger.figure_every`` epochs, draw the figures."""
    trace_path = run_dir / "positions.npz"
    trace = PositionTrace.load(trace_path) if resumed and trace_path.is_file() else PositionTrace()
    trace.record(model, epoch)  # epoch 0: the initial positions
    split = next((s for s in (data.test, data.valid, data.train) if len(s)), data.train)
    sample_x, sample_y = split.x[0, : int(split.lengths[0])], int(split.y[0])
    every = int(cfg.logger.get("figure_every", 0) or 0)

    def on_epoch_end(core: DelaySNN, st: TrainState) -> None:
        trace.record(core, st.epoch)
        trace.save(trace_path)
        if every and (st.epoch % every == 0 or st.epoch == cfg.trainer.epochs):
            log_epoch_figures(
                logger,
                core,
                st.history,
                st.epoch,
                run_dir,
                trace,
                sample_x=sample_x,
                sample_label=sample_y,
                class_names=data.class_names,
            )

    return on_epoch_end


def read_for_resume(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint a run resumes from, refused (naming the file, or the keys that differ) when
    it is unreadable or its config differs from ``cfg``."""
    try:
        ckpt = read_checkpoint(path)
        if not {"model", "optim", "state", "rng"} <= set(ckpt):
            raise ValueError("not a checkpoint of snn-delays-train")
    except ValueError as e:  # UnreadableCheckpointError too
        why = e.why if isinstance(e, UnreadableCheckpointError) else f"{type(e).__name__}: {e}"
        raise RuntimeError(
            f"cannot resume from {path}: the file is unreadable (truncated or corrupt: {why}). Delete "
            f"it to start this run afresh, or resume from the best epoch with "
            f"trainer.resume={path.parent / 'best.pt'}"
        ) from e
    check_compatible(ckpt.get("config", {}), OmegaConf.to_container(cfg, resolve=True), path)
    return ckpt


def load_for_resume(
    path: Path,
    cfg: DictConfig,
    model: DelaySNN,
    opt: Optimization,
    dist: Distributed | None = None,
    ckpt: dict[str, Any] | None = None,
) -> tuple[TrainState, dict]:
    """Load the checkpoint at ``path`` (``ckpt``: as :func:`read_for_resume` read it) into
    ``model`` and ``opt``; the state to continue from, and the logger's run id."""
    ckpt = ckpt if ckpt is not None else read_for_resume(path, cfg)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    set_capturable(False, opt.weights, opt.positions)  # on again in fit() if graphs are on
    state = TrainState(**ckpt["state"])
    dist = dist or Distributed()
    ranks = ckpt.get("rng_ranks")
    if ranks is not None and len(ranks) == dist.world_size:
        set_random_states(ranks[dist.rank])  # each rank continues its own stream
    elif dist.rank == 0:
        set_random_states(ckpt["rng"])
    else:  # another number of ranks: a stream of its own (not rank 0's: dropout masks would repeat)
        seed_everything(rank_seed(cfg.seed, dist.rank, state.epoch))
    state.stopped_by = None
    log.info("resuming from %s after epoch %d", path, state.epoch)
    run_id = ckpt.get("logger_run_id")
    return state, (
        {"run_id": run_id} if run_id and cfg.logger.get("_target_", "").endswith("WandbLogger") else {}
    )


def keep_resume_point(path: Path, run_dir: Path) -> None:
    """A run resumed from another folder's checkpoint wrote its own last.pt only at the end of its
    first epoch: until then, and for good when no epoch was left, its folder held nothing to
    resume from, and ``trainer.resume=true`` there started over. The checkpoint it continues
    from is copied in as its last.pt (the next epoch's replaces it)."""
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():  # this run's own (resumed in its folder), or one written already
        return
    copy_checkpoint(path, last)
    log.info("%s: the checkpoint this run continues from, copied from %s", last, path)


def keep_best_checkpoint(path: Path, saved: dict[str, Any], state: TrainState, run_dir: Path) -> None:
    """A run resumed from another folder's checkpoint (or whose best.pt is gone) has no best.pt
    of its best epoch so far, and writes one only at a better epoch: its folder would lack the
    checkpoint metrics.json's test_acc was scored on (snn-delays-eval's default). The one beside
    ``path`` (or ``path`` itself) is copied in when it holds that epoch; else a warning."""
    best = run_dir / "checkpoints" / "best.pt"
    if best.is_file() or state.best_epoch < 1:
        return
    beside = path.parent / "best.pt"
    for source in (beside, path):
        try:
            epoch = saved["state"]["epoch"] if source == path else read_checkpoint(source)["state"]["epoch"]
        except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable: the next candidate
            continue
        if epoch == state.best_epoch:
            copy_checkpoint(source, best)
            log.info("%s: the best epoch so far (%d), copied from %s", best, epoch, source)
            return
    log.warning(
        "no checkpoint of the best epoch so far (%d) beside %s: %s will hold a later best epoch only",
        state.best_epoch,
        path,
        best,
    )


# Keys that may change between an interrupted run and its continuation.
# Not trainer.epochs: the one-cycle schedule is built for the planned number of epochs.
RESUMABLE_KEYS = (
    "trainer.resume",
    "trainer.progress",
    "trainer.device",
    "logger",
    "dataset.root",
    "dataset.download",
    "dataset.cache",
    "dataset.feature_batch_size",
    "trainer.eval_batch_size",
    "trainer.cuda_graphs",
)


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume from a checkpoint of another model, dataset or recipe."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    a, b = flat(saved), flat(current)
    differ = sorted(
        k
        for k in set(a) | set(b)
        if a.get(k) != b.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)
    )
    if differ:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:12])
        raise ValueError(f"cannot resume from {path}: its config differs in {len(differ)} key(s): {details}")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = run(cfg, run_dir)
    # What a sweeper optimises: validation accuracy, never the test set.
    return metrics.get("best_valid_acc") if metrics else None


def _torchrun_overrides(argv: list[str]) -> list[str]:
    """Under torchrun every rank runs Hydra: give them one run dir, and only rank 0 Hydra's files.

    The run dir is named after torchrun's ``--rdzv-id`` (``--standalone``, and in torch 2.13 a
    plain one-node run, make a random one). Where torchrun leaves it at ``none`` for every run
    (its static rendezvous, e.g. with ``--master-port``), on one node the workers use the
    process id of their torchrun instead (the same for all of them, and across its restarts):
    a second run would otherwise refuse to start, or two at once write into one folder.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id == "none" and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        run_id = f"none-{os.getppid()}"
    extra = []
    if run_id and not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append(f"hydra.run.dir=outputs/torchrun/{run_id}")
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # rank 0 tells the run; the others only warn, each line naming its rank
        extra += [
            "hydra.output_subdir=null",
            "hydra/job_logging=stdout",
            "hydra.job_logging.root.level=WARNING",
            f"hydra.job_logging.formatters.simple.format='[rank {rank}] %(levelname)s: %(message)s'",
        ]
    return extra


def main() -> None:
    if not Path(CONF_DIR).is_dir():
        sys.exit(
            f"snn-delays: config folder {CONF_DIR} not found: reinstall the package (`pip install .`, "
            "or `pip install -e .` from a checkout)"
        )
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun:
        sys.argv += _torchrun_overrides(sys.argv[1:])
    run_interruptibly(_hydra_main)
    if torchrun:
        exit_without_finalizing()


def exit_without_finalizing(code: int = 0) -> None:
    """End a torchrun worker whose work is done: the atexit handlers run (logging's flush, W&B's
    teardown), then the process exits without the interpreter's finalization.

    DistributedDataParallel keeps the gloo process group alive past ``destroy_process_group``
    (its threads are not joined; torch 2.13), and a gloo thread that touches a Python object
    while the interpreter finalizes aborts the process (SIGABRT, "terminate called without an
    active exception"). The barrier in :func:`distributed` made that rare, not impossible (once
    in a CI-sized run of the suite): torchrun then fails the whole job after every output was
    written."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's, run at exit anyway
    if run_exit_handlers is not None:
        run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_interruptibly(command: Callable[[], Any]) -> None:
    """Run a command-line entry point; on Ctrl-C exit as killed by SIGINT, without a traceback, so
    that a shell loop over runs stops too (the trainer has saved what there was to save)."""
    try:
        command()
    except KeyboardInterrupt:
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(128 + signal.SIGINT)  # where the signal does not end the process (Windows)


if __name__ == "__main__":
    main()
