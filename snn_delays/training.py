"""The training loop: one readable :func:`fit` over model, data, optimizers and a logger.

Loss and prediction follow the published code: ``p = sum_t softmax(u[t])`` over classes,
``loss = cross_entropy(p, y)`` and the prediction is ``argmax p``. Positions are clamped to
their range after every step; sigma follows :func:`sigma_at`; the network evaluated on
validation and test data is the rounded integer-delay one (``model.eval()``).

Per-batch work never synchronises with the host: losses and counts are summed on the device
and read once per epoch. The model and data arrive on their device; the loop does not move
them. Checkpoints (``last.pt`` every epoch, ``best.pt`` on a new best validation accuracy, or
test accuracy where there is no validation split) hold everything needed to resume exactly:
model, optimizers, schedulers, epoch, history, the data order's generator and random states
(every rank's under DDP).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from snn_delays.cuda_graphs import GraphedSteps, StaticInputs, capture_refusal, set_capturable
from snn_delays.data.base import DataBundle, Split, batches
from snn_delays.memtrack import peak_mib, reset_peak_memory

log = logging.getLogger(__name__)
Augmenter = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x, y) -> (x, target)


# --- losses and metrics ---------------------------------------------------------------
def class_scores(u: Tensor) -> Tensor:
    """``sum_t softmax(u[t])``: (T, B, C) membrane -> (B, C) scores."""
    return F.softmax(u, dim=-1).sum(0)


def loss_fn(u: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(class_scores(u), y)


def sigma_at(epoch: int, sigma_init: float, sigma_final: float, decay_epochs: int) -> float:
    """Sigma during ``epoch`` (0-based): geometric decay over ``decay_epochs``, then constant.

    A sigma starting at or below the final one (0 for K = 1, or ``model.sigma_init`` <= 0.23)
    stays where it starts, as in the published code (which decays only a sigma above the final
    one); it was raised to the final one, or, from 0, divided by zero.
    """
    if decay_epochs <= 0 or sigma_init <= sigma_final:
        return sigma_init
    factor = (sigma_final / sigma_init) ** (1.0 / decay_epochs)
    return sigma_init * factor ** min(epoch, decay_epochs)


# --- the objects fit() receives --------------------------------------------------------
@dataclass
class Optimization:
    """The two optimizers of the paper and their per-epoch schedulers."""

    weights: torch.optim.Optimizer
    weights_scheduler: Any
    positions: torch.optim.Optimizer | None = None
    positions_scheduler: Any = None
    sigma_init: float | None = None
    sigma_final: float = 0.23
    sigma_decay_epochs: int = 0

    def zero_grad(self) -> None:
        self.weights.zero_grad(set_to_none=True)
        if self.positions is not None:
            self.positions.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.weights.step()
        if self.positions is not None:
            self.positions.step()

    def end_epoch(self) -> None:
        self.weights_scheduler.step()
        if self.positions_scheduler is not None:
            self.positions_scheduler.step()

    def lrs(self) -> dict[str, float]:
        out = {"lr/weights": self.weights.param_groups[0]["lr"]}
        if self.positions is not None:
            out["lr/positions"] = self.positions.param_groups[0]["lr"]
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {
            "weights": self.weights.state_dict(),
            "weights_scheduler": self.weights_scheduler.state_dict(),
        }
        if self.positions is not None:
            state["positions"] = self.positions.state_dict()
            state["positions_scheduler"] = self.positions_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.load_state_dict(state["weights"])
        self.weights_scheduler.load_state_dict(state["weights_scheduler"])
        if self.positions is not None:
            self.positions.load_state_dict(state["positions"])
            self.positions_scheduler.load_state_dict(state["positions_scheduler"])


@dataclass
class Distributed:
    """Rank, world size and a sum-reduction; the single-process default does nothing."""

    rank: int = 0
    world_size: int = 1

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (e.g. a signal reached one rank)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        return bool(self.all_sum(t).item() > 0)

    def shard(self, indices: Tensor) -> Tensor:
        return indices[self.rank :: self.world_size]

    def even_shard(self, indices: Tensor) -> Tensor:
        """This rank's share of ``indices`` cut to an equal length on every rank (the last
        ``len % world_size`` dropped): a training rank with one more step than the others would
        wait for them forever in DistributedDataParallel's gradient all-reduce."""
        return self.shard(indices[: len(indices) - len(indices) % self.world_size])

    def batch_shard(self, n: int, batch_size: int) -> Tensor:
        """This rank's samples of ``0..n-1`` in whole batches: every ``world_size``-th batch of
        the one-process batching, in order, so the ranks' batches (and their padding) are one
        process's."""
        index = torch.arange(n)
        return index[index // batch_size % self.world_size == self.rank]

    def share_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics, which each rank updates with its own
        batches) on every rank: all evaluate the network rank 0 saves. Said here rather than
        left to DistributedDataParallel's forward, which broadcasts them in a rank's first
        evaluation forward only: a rank with no batch of a split (fewer samples than ranks)
        skipped that broadcast, and the others waited for it forever."""
        if self.world_size > 1:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (every rank must call it)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    eval_batch_size: int
    progress: bool = True
    save_checkpoints: bool = True
    seed: int = 0
    cuda_graphs: bool | str = False  # true | "auto" | false: CUDA-graph replays (snn_delays.cuda_graphs)

    def __post_init__(self) -> None:
        if self.cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"trainer.cuda_graphs must be auto, true or false, got {self.cuda_graphs!r}")
        for key, value in (
            ("trainer.epochs", self.epochs),
            ("trainer.batch_size", self.batch_size),
            ("trainer.eval_batch_size", self.eval_batch_size),
        ):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{key} must be a whole number >= 1, got {value!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(
                f"seed must be a whole number from 0 to {MAX_SEED} (2**32 - 1), got {self.seed!r}"
            )


MAX_SEED = 2**32 - 1  # numpy's limit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainState:
    """What changes during training and is saved in checkpoints."""

    epoch: int = 0  # epochs completed
    best_valid_acc: float = -1.0
    best_epoch: int = -1
    test_acc_at_best: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)  # training time of each epoch
    peak_memory_mib: float | None = None  # most memory held so far (memtrack.peak_mib), all sessions
    shuffle_rng: Tensor = field(default_factory=lambda: torch.Generator().get_state())  # see fresh()
    stopped_by: int | None = None  # the signal that interrupted training, if any

    @classmethod
    def fresh(cls, seed: int) -> TrainState:
        """A run's start: the data order follows ``seed`` (the same on every rank)."""
        return cls(shuffle_rng=torch.Generator().manual_seed(seed).get_state())


def _accumulate(sums: Tensor, loss_sum: Tensor, scores: Tensor, y: Tensor) -> None:
    """Add (loss * n, correct, n) into ``sums`` on the device: no host synchronisation."""
    sums[0] += loss_sum.double()
    sums[1] += (scores.argmax(-1) == y).sum()
    sums[2] += len(y)


# --- evaluation -------------------------------------------------------------------------
@torch.no_grad()
def eval_step(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Summed loss and class scores of the evaluated network on one batch."""
    scores = class_scores(model(x))
    return F.cross_entropy(scores, y, reduction="sum"), scores


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    batch_size: int,
    dist: Distributed | None = None,
    graphs: GraphedSteps | None = None,
    desc: str | None = None,
) -> dict[str, float]:
    """Loss and accuracy of the evaluated (integer-delay) network on one split; ``desc``: a
    progress bar so named (none when ``None``).

    Under DDP each rank scores every ``world_size``-th batch of the one-process batching, so the
    scores are those of one process (and ``snn-delays-eval``). A batch is padded to its longest
    sample and the scores count every step: a rank that scored every ``world_size``-th sample
    made other batches, and the scores changed with the number of ranks."""
    dist = dist or Distributed()
    if len(split) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    model.eval()
    sums = torch.zeros(3, device=split.x.device, dtype=torch.float64)  # loss*n, correct, n
    into = graphs.buffer if graphs is not None else None  # batches written where the graph reads them
    shard = dist.batch_shard(len(split), batch_size)
    bar = tqdm(
        batches(split, batch_size, indices=shard, into=into),
        total=math.ceil(len(shard) / batch_size),
        desc=desc,
        leave=False,
        disable=desc is None,
    )
    for x, y, _ in bar:
        loss_sum, scores = graphs(x, y) if graphs is not None else eval_step(model, x, y)
        _accumulate(sums, loss_sum, scores, y)
    loss, correct, n = dist.all_sum(sums).tolist()
    return {"loss": loss / n, "acc": correct / n}


# --- training ------------------------------------------------------------------------------
def train_step(model: nn.Module, opt: Optimization, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """One step: forward, backward, both optimizers, position clamping; (loss, scores) detached.

    Free of host synchronisation, so a CUDA graph can record it (:mod:`snn_delays.cuda_graphs`).
    """
    opt.zero_grad()
    scores = class_scores(model(x))
    loss = F.cross_entropy(scores, target)  # integer labels, or CutMix label mixtures
    loss.backward()
    opt.step()
    getattr(model, "module", model).clamp_positions()  # the bare model under DDP
    return loss.detach(), scores.detach()


def graphed_steps(
    model: nn.Module, opt: Optimization, dist: Distributed, required: bool = True
) -> tuple[GraphedSteps | None, GraphedSteps | None]:
    """Graph runners (train, evaluation) of ``trainer.cuda_graphs``; Nones where they cannot run
    (with a warning if ``required``: ``true`` rather than ``auto``)."""
    device = next(model.parameters()).device
    reason = capture_refusal(opt.weights, opt.positions)
    if reason is None and (device.type != "cuda" or dist.world_size > 1):
        processes = "1 process" if dist.world_size == 1 else f"{dist.world_size} processes"
        reason = f"needs one process on a CUDA device (got {device}, {processes})"
    if reason is not None:
        if required:
            log.warning("trainer.cuda_graphs=true %s: training without graphs", reason)
        else:  # said where graphs were to be expected; on the CPU, only when asked (debug)
            level = logging.INFO if device.type == "cuda" else logging.DEBUG
            log.log(level, "trainer.cuda_graphs=auto: %s; training without graphs", reason)
        return None, None
    set_capturable(True, opt.weights, opt.positions)
    inputs = StaticInputs()  # a batch layout both steps run shares one buffer
    return (
        GraphedSteps(lambda x, target: train_step(model, opt, x, target), inputs=inputs),
        GraphedSteps(lambda x, y: eval_step(model, x, y), inputs=inputs),
    )


def _evaluation_reads_sigma(model: nn.Module) -> bool:
    """The evaluated network depends on sigma (a delay layer with ``round_eval=False`` runs the
    Gaussian kernel, whose width a CUDA graph bakes in as a number), so the evaluation graph,
    otherwise captured once for the run, must be captured again when sigma changes."""
    return any(not layer.round_eval for layer in model.delay_layers())


def train_epoch(
    model: nn.Module,
    split: Split,
    opt: Optimization,
    cfg: FitConfig,
    gen: torch.Generator,
    dist: Distributed,
    stop: Callable[[], bool],
    desc: str,
    augment: Augmenter | None = None,
    graphs: GraphedSteps | None = None,
) -> dict[str, float]:
    model.train()
    order = torch.randperm(len(split), generator=gen)
    per_rank = max(cfg.batch_size // dist.world_size, 1)
    sums = torch.zeros(3, device=split.x.device, dtype=torch.float64)
    shard = dist.even_shard(order)
    n_batches = math.ceil(len(shard) / per_rank)
    bar = tqdm(
        batches(split, per_rank, indices=shard, into=graphs.buffer if graphs is not None else None),
        total=n_batches,
        desc=desc,
        leave=False,
        disable=not (cfg.progress and dist.is_main),
    )
    for x, y, _ in bar:
        x, target = augment(x, y) if augment is not None else (x, y)
        loss, scores = graphs(x, target) if graphs is not None else train_step(model, opt, x, target)
        _accumulate(sums, loss * len(y), scores, y)
        if stop() and dist.world_size == 1:  # ranks stop together, at the epoch's end
            break
    loss, correct, n = dist.all_sum(sums).tolist()  # waits for the last replay
    if graphs is not None:
        # The graph baked in this epoch's sigma, learning rates and betas: the next epoch
        # captures anew. Dropped now, its memory pool and input buffer are free for evaluation.
        graphs.new_epoch()
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1)}


def delay_stats(model: nn.Module, dt_ms: float) -> dict[str, float]:
    """Mean and spread of the integer delays per layer, in ms."""
    core = getattr(model, "module", model)
    stats = {}
    for i, layer in enumerate(core.delay_layers()):
        d = layer.delays().float() * dt_ms
        stats[f"delay/mean_ms/layer{i}"] = float(d.mean())
        stats[f"delay/std_ms/layer{i}"] = float(d.std()) if d.numel() > 1 else 0.0
    return stats


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM pre-emption) or a first Ctrl-C (SIGINT): the loop saves
    and returns early. A second Ctrl-C raises ``KeyboardInterrupt`` at once.

    On leaving, the signal goes on to the handler that was there before (submitit's requeue
    handler; for Ctrl-C Python's, which raises ``KeyboardInterrupt`` once the state is saved, so
    that a sweep or a shell loop stops too). SIGINT is left alone where it is ignored (a
    background job) or handled by someone else."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning(
                "Ctrl-C: stopping (the epoch in progress is dropped, the last finished one kept); "
                "press it again to quit at once"
            )
        self.signum = signum

    def __enter__(self) -> StopFlag:
        signals = [signal.SIGTERM, getattr(signal, "SIGUSR1", None)]
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signals.append(signal.SIGINT)
        for s in signals:
            if s is not None:
                try:
                    self._previous[s] = signal.signal(s, self._handle)
                except ValueError:  # not the main thread (e.g. inside a notebook executor)
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        # Hand the signal on (e.g. to submitit's requeue handler) once our state is saved.
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous):
            previous(self.signum, None)


def random_states() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving process saw: restore those this machine has (a run
        # resumed with fewer GPUs, or none, than it was saved with; indexing past them failed)
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])


def fit(
    model: nn.Module,
    data: DataBundle,
    opt: Optimization,
    logger: Any,
    cfg: FitConfig,
    run_dir: Path,
    state: TrainState | None = None,
    dist: Distributed | None = None,
    extra_checkpoint: dict[str, Any] | None = None,
    on_epoch_end: Callable[[nn.Module, TrainState], None] | None = None,
    augment: Augmenter | None = None,
    stop: StopFlag | None = None,
) -> TrainState:
    """Train for ``cfg.epochs`` epochs (continuing from ``state``); returns the final state.

    If a stop signal arrives, the epoch in progress is abandoned and the function returns with
    ``state.epoch`` < ``cfg.epochs``: ``last.pt`` already holds the last completed epoch.
    ``stop`` lets the caller watch for signals over more than training (writing outputs, say);
    by default fit watches while it runs.
    """
    dist = dist or Distributed()
    state = state or TrainState.fresh(cfg.seed)
    core = getattr(model, "module", model)
    gen = torch.Generator()
    gen.set_state(state.shuffle_rng)
    ckpt_dir = run_dir / "checkpoints"
    device = next(core.parameters()).device
    graphs, eval_graphs = (
        graphed_steps(model, opt, dist, required=cfg.cuda_graphs is True) if cfg.cuda_graphs else (None, None)
    )
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(StopFlag())
        if cfg.progress and dist.is_main and _console_logging():
            stack.enter_context(logging_redirect_tqdm())  # the epoch lines print above the bars
        epochs = tqdm(
            range(state.epoch, cfg.epochs),
            desc="epochs",
            disable=not (cfg.progress and dist.is_main),
            initial=state.epoch,
            total=cfg.epochs,
        )
        started, first = time.perf_counter(), state.epoch  # for the time left
        reset_peak_memory(device)  # this run's peak, not that of a sweep's earlier jobs
        for epoch in epochs:
            if opt.sigma_init is not None:
                before = core.sigma
                core.set_sigma(sigma_at(epoch, opt.sigma_init, opt.sigma_final, opt.sigma_decay_epochs))
                if eval_graphs is not None and core.sigma != before and _evaluation_reads_sigma(core):
                    eval_graphs.new_epoch()  # its graph baked in the old sigma: captured anew
            lrs = opt.lrs()
            t0 = time.perf_counter()
            train = train_epoch(
                model, data.train, opt, cfg, gen, dist, stop, f"epoch {epoch + 1}", augment, graphs
            )
            if dist.any(stop()):
                break
            if not math.isfinite(train["loss"]):  # the same sum on every rank: all stop together
                kept = (
                    f"; checkpoints/last.pt holds epoch {state.epoch}"
                    if state.epoch and cfg.save_checkpoints
                    else ""
                )
                raise FloatingPointError(
                    f"training diverged: train loss is {train['loss']} at epoch {epoch + 1} (lower the "
                    "learning rate: optim.weights_scheduler.max_lr, which sets the weights' rate over "
                    "optim.weights.lr, or optim.positions.lr). Nothing was saved from this "
                    f"epoch{kept}"
                )
            opt.end_epoch()
            seconds = time.perf_counter() - t0
            state.train_seconds += seconds
            bars = cfg.progress and dist.is_main
            dist.share_buffers(core)  # and the bare model evaluates: no collective hidden in a forward
            valid = evaluate(
                core, data.valid, cfg.eval_batch_size, dist, eval_graphs, "valid" if bars else None
            )
            test = evaluate(core, data.test, cfg.eval_batch_size, dist, eval_graphs, "test" if bars else None)
            row = {
                "epoch": epoch + 1,
                "train/loss": train["loss"],
                "train/acc": train["acc"],
                "valid/loss": valid["loss"],
                "valid/acc": valid["acc"],
                "test/loss": test["loss"],
                "test/acc": test["acc"],
                **lrs,
            }
            if core.sigma is not None:
                row["sigma"] = core.sigma
            row.update(delay_stats(model, data.dt_ms))
            improved = _update_best(state, row, has_valid=len(data.valid) > 0)
            state.epoch, state.shuffle_rng = epoch + 1, gen.get_state()
            state.history.append(row)
            state.epoch_seconds.append(seconds)
            if (peak := peak_mib(device)) is not None:  # None: the platform cannot say (Windows' CPU)
                state.peak_memory_mib = max(state.peak_memory_mib or 0.0, peak)
            # every rank's random state (dropout masks differ by rank), so that a resumed run
            # continues each rank's stream: a collective, hence before the main rank's block
            rng_ranks = dist.gather(random_states()) if cfg.save_checkpoints and dist.world_size > 1 else None
            if dist.is_main:
                metrics = {k: v for k, v in row.items() if k != "epoch"} | {"time/epoch_train_s": seconds}
                if state.peak_memory_mib is not None:
                    metrics["memory/peak_mib"] = state.peak_memory_mib
                logger.log_metrics(metrics, step=epoch + 1)
                per_epoch = (time.perf_counter() - started) / (epoch + 1 - first)
                left = per_epoch * (cfg.epochs - epoch - 1)
                log.info("%s", epoch_line(row, cfg.epochs, seconds, improved, left))
                epochs.set_postfix(
                    loss=f"{train['loss']:.3f}", valid=f"{valid['acc']:.3f}", test=f"{test['acc']:.3f}"
                )
                if cfg.save_checkpoints:
                    # best.pt first: last.pt (what a resumed run reads) then never names a best
                    # epoch that best.pt does not hold, whenever the job dies.
                    payload = checkpoint_payload(core, opt, state, extra_checkpoint, rng_ranks)
                    if improved:
                        save_checkpoint(payload, ckpt_dir / "best.pt")
                    save_checkpoint(payload, ckpt_dir / "last.pt")
                if on_epoch_end is not None:
                    on_epoch_end(core, state)
        # A signal after the last epoch's training (its checkpoint, its figures) stopped nothing:
        # the run is finished, not pre-empted (W&B's state, the "resume" advice).
        state.stopped_by = stop.signum if state.epoch < cfg.epochs else None
    return state


def epoch_line(
    row: dict[str, float], epochs: int, seconds: float, improved: bool = False, left_s: float | None = None
) -> str:
    """One epoch as a log line (``train.log``, a SLURM job's output): loss and accuracy of each
    split that has data, sigma, the epoch's training time, and (``left_s``, before the last
    epoch) the time the remaining epochs should take at this run's pace so far (evaluation and
    checkpoints included)."""
    parts = [f"epoch {int(row['epoch'])}/{epochs}"]
    for split in ("train", "valid", "test"):
        if not math.isnan(row[f"{split}/acc"]):  # nan: the split is empty
            parts.append(f"{split} loss {row[f'{split}/loss']:.4f} acc {row[f'{split}/acc']:.4f}")
    if "sigma" in row:
        parts.append(f"sigma {row['sigma']:.3g}")
    parts.append(f"{seconds:.2f} s training" + (" (new best)" if improved else ""))
    if left_s is not None and int(row["epoch"]) < epochs:
        parts.append(f"about {_duration(left_s)} left")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def _console_logging() -> bool:
    """Whether the root logger writes to the terminal (Hydra's console handler does)."""
    return any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
        for h in logging.getLogger().handlers
    )


def _update_best(state: TrainState, row: dict[str, float], has_valid: bool) -> bool:
    # Without a validation split the epoch is chosen on the test set, as the published SHD figure was.
    key = "valid/acc" if has_valid else "test/acc"
    if row[key] > state.best_valid_acc:
        state.best_valid_acc, state.best_epoch, state.test_acc_at_best = (
            row[key],
            int(row["epoch"]),
            row["test/acc"],
        )
        return True
    return False


def checkpoint_payload(
    model: nn.Module,
    opt: Optimization,
    state: TrainState,
    extra: dict[str, Any] | None,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> dict:
    """``rng``: this process's random state; ``rng_ranks``: every rank's, under DDP."""
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "state": {k: v for k, v in vars(state).items()},
        "rng": random_states(),
        **({"rng_ranks": rng_ranks} if rng_ranks else {}),
        **(extra or {}),
    }


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write through a temporary file, so a killed job never leaves a half-written checkpoint."""
    _write_through_tmp(path, lambda tmp: torch.save(payload, tmp))


def copy_checkpoint(source: Path, path: Path) -> None:
    """``source``'s bytes to ``path``, through a temporary file as :func:`save_checkpoint`."""
    _write_through_tmp(path, lambda tmp: shutil.copyfile(source, tmp))


def _write_through_tmp(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write(tmp)
    tmp.replace(path)


def summary(state: TrainState, n_params: int) -> dict[str, float]:
    """The numbers of ``metrics.json``; ``test_acc`` is at the epoch chosen on validation."""
    tests = [row["test/acc"] for row in state.history]
    valids = [row["valid/acc"] for row in state.history]
    finite_valid = [v for v in valids if not math.isnan(v)]
    return {
        "best_valid_acc": max(finite_valid) if finite_valid else float("nan"),
        "test_acc": state.test_acc_at_best,
        "best_test_acc": max(tests) if tests else float("nan"),
        "last_test_acc": tests[-1] if tests else float("nan"),
        "best_epoch": state.best_epoch,
        "epochs": state.epoch,
        "train_seconds": state.train_seconds,
        "epoch_train_seconds": state.epoch_seconds,
        "peak_memory_mib": state.peak_memory_mib,
        "n_params": n_params,
    }
