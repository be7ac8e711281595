"""Code paths that only a CUDA machine takes, held on the CPU by stand-ins (and on a GPU for real).

* A checkpoint holds one CUDA random state per GPU the saving process saw
  (``torch.cuda.get_rng_state_all``); resumed where there are fewer GPUs, restoring the extra
  states indexed past ``torch.cuda.default_generators`` (IndexError).
* The evaluation graph (``trainer.cuda_graphs``) was captured once for the run; with
  ``model.round_eval=false`` the evaluated network runs the Gaussian kernel, whose width sigma a
  CUDA graph bakes in as a number, so every later epoch was scored with the first one's sigma.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from snn_delays import training
from snn_delays.cuda_graphs import GraphedSteps, StaticInputs
from snn_delays.data.synthetic import make_synthetic
from snn_delays.delays import DelayLayer
from snn_delays.loggers import NullLogger
from snn_delays.model import DelaySNN
from snn_delays.training import (
    FitConfig,
    Optimization,
    eval_step,
    evaluate,
    fit,
    random_states,
    set_random_states,
    train_step,
)


# --- CUDA random states restored on a machine with fewer GPUs ----------------------------
class _FakeCudaGenerator:
    def __init__(self) -> None:
        self.state: torch.Tensor | None = None

    def set_state(self, state: torch.Tensor) -> None:
        self.state = state


def test_cuda_random_states_of_more_gpus_restore_on_fewer(monkeypatch):
    """A CPU stand-in for a one-GPU machine with CUDA initialised: torch's own
    ``set_rng_state_all`` runs, indexing ``torch.cuda.default_generators`` as on a GPU."""
    gpu0 = _FakeCudaGenerator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # _lazy_call runs at once
    monkeypatch.setattr(torch.cuda.random, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "default_generators", (gpu0,))
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # a 4-GPU machine's
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": saved,
    }
    set_random_states(state)  # was: IndexError (tuple index out of range)
    assert gpu0.state is not None and torch.equal(gpu0.state, saved[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_random_states_of_more_gpus_restore_on_the_gpu():
    torch.cuda.init()
    state = random_states()
    first = state["cuda"][0].clone()
    state["cuda"] = [*state["cuda"], first.clone()]  # one GPU more than this machine has
    torch.cuda.manual_seed_all(123)
    set_random_states(state)
    assert torch.equal(torch.cuda.get_rng_state(0), first)


# --- the evaluation graph and a sigma the evaluated network reads --------------------------
@contextlib.contextmanager
def _sigma_as(baked: dict[DelayLayer, float]):  # noqa: ANN202
    real = DelayLayer.sigma
    DelayLayer.sigma = property(lambda self: baked.get(self, real.fget(self)))
    try:
        yield
    finally:
        DelayLayer.sigma = real


def _sigma_baking_capture(model: DelaySNN):  # noqa: ANN202
    """A CPU stand-in for a CUDA graph: each replay reruns the step with the Python numbers the
    capture read (the delay layers' sigma), as a graph replays kernels launched with them."""

    def capture(body):  # noqa: ANN001, ANN202
        baked = {layer: layer.sigma for layer in model.delay_layers()}
        outputs = body()

        def replay() -> None:
            with _sigma_as(baked):
                new = body()
            for out, value in zip(outputs, new, strict=True):
                out.copy_(value)

        return replay, outputs

    return capture


def _fit(tmp_path, device: str, cuda_graphs: bool, epochs: int = 3):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    data = make_synthetic(n_train=200, n_valid=96, n_test=128, seed=1).to(device)
    model = DelaySNN(8, 4, n_hidden=16, n_layers=1, kernel_size=15, dropout=0.0, round_eval=False)
    model = model.to(device)
    weights = torch.optim.Adam(model.weight_parameters(), lr=1e-3)
    positions = torch.optim.Adam(model.delay_parameters(), lr=0.1)
    opt = Optimization(
        weights,
        torch.optim.lr_scheduler.ConstantLR(weights, factor=1.0),
        positions,
        torch.optim.lr_scheduler.ConstantLR(positions, factor=1.0),
        sigma_init=7.0,
        sigma_decay_epochs=2,  # sigma 7, 1.27, 0.23: another in every epoch
    )
    cfg = FitConfig(epochs, 64, 40, progress=False, save_checkpoints=False, cuda_graphs=cuda_graphs)
    state = fit(model, data, opt, NullLogger(), cfg, tmp_path)
    return model, data, state


def test_unrounded_evaluation_graph_follows_sigma(tmp_path, monkeypatch):
    runners = []

    def cpu_graphs(model, opt, dist, required=True):  # noqa: ANN001, ANN202
        inputs, capture = StaticInputs(), _sigma_baking_capture(model)
        for body in (lambda x, t: train_step(model, opt, x, t), lambda x, y: eval_step(model, x, y)):
            runners.append(GraphedSteps(body, capture, side_stream=False, inputs=inputs))
        return tuple(runners)

    _, _, eager = _fit(tmp_path / "eager", "cpu", cuda_graphs=False)
    monkeypatch.setattr(training, "graphed_steps", cpu_graphs)
    _, _, graphed = _fit(tmp_path / "graphs", "cpu", cuda_graphs=True)
    runner, eval_runner = runners
    assert runner.captures == 3 and eval_runner.captures == 3  # one per sigma
    assert eval_runner.replays > 0
    assert graphed.history == eager.history  # valid and test scored at each epoch's sigma


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unrounded_evaluation_graph_follows_sigma_on_the_gpu(tmp_path, monkeypatch):
    runners = []

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        runners.extend(real(*args, **kwargs))
        return tuple(runners)

    real = training.graphed_steps
    monkeypatch.setattr(training, "graphed_steps", recorded)
    model, data, state = _fit(tmp_path, "cuda", cuda_graphs=True)
    assert [(r.failed, r.captures) for r in runners] == [(False, 3), (False, 3)]
    last = state.history[-1]
    for name in ("valid", "test"):  # the last epoch's scores, against an eager evaluation
        again = evaluate(model, getattr(data, name), 40)
        assert last[f"{name}/loss"] == pytest.approx(again["loss"], rel=1e-4)
        assert last[f"{name}/acc"] == pytest.approx(again["acc"], abs=1e-6)
