"""Training steps replayed from CUDA graphs (``trainer.cuda_graphs=true``) train as the eager loop.

On the CPU the graph is stood in for by a capture that replays the step eagerly from the same
static input buffers: this holds the bookkeeping (batches written into those buffers or copied
in, one capture per epoch, other shapes eager, outputs read before the next replay) to the
eager loop, bit for bit. On a GPU the real capture is compared with the eager loop
(``experiments/gpu_check.sh`` runs it).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from snn_delays import cuda_graphs, training
from snn_delays.augment import Augment
from snn_delays.cuda_graphs import GraphedSteps, StaticInputs, set_capturable
from snn_delays.data.base import Split, batches
from snn_delays.data.synthetic import make_synthetic
from snn_delays.loggers import NullLogger
from snn_delays.model import DelaySNN
from snn_delays.training import FitConfig, Optimization, eval_step, fit, train_step


def eager_capture(body):  # noqa: ANN001, ANN201
    """A CPU stand-in for a graph: run once now, and on each replay refill the same outputs."""
    outputs = body()

    def replay() -> None:
        for out, new in zip(outputs, body(), strict=True):
            out.copy_(new)

    return replay, outputs


def _train(tmp_path, device: str, cuda_graphs: bool, epochs: int = 3, dropout: float = 0.1, augment=None):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    data = make_synthetic(n_train=300, n_valid=96, n_test=128, seed=1).to(device)
    model = DelaySNN(8, 4, n_hidden=16, n_layers=1, kernel_size=15, dropout=dropout).to(device)
    weights = torch.optim.Adam(model.weight_parameters(), lr=1e-3)
    positions = torch.optim.Adam(model.delay_parameters(), lr=0.1)
    opt = Optimization(
        weights,
        torch.optim.lr_scheduler.OneCycleLR(weights, max_lr=5e-3, total_steps=epochs),
        positions,
        torch.optim.lr_scheduler.CosineAnnealingLR(positions, T_max=epochs),
        sigma_init=7.0,
        sigma_decay_epochs=2,
    )
    cfg = FitConfig(epochs, 64, 40, progress=False, save_checkpoints=False, cuda_graphs=cuda_graphs)
    state = fit(model, data, opt, NullLogger(), cfg, tmp_path, augment=augment)
    return model, state


# masks and CutMix make a new batch from the one written into the graph's buffer, which is
# then copied back into that buffer: both orders of use of one buffer must hold
AUGMENT = Augment(
    time_masks=2, time_mask_steps=5, channel_masks=1, channel_mask_width=2, cutmix_prob=0.5, n_classes=4
)


@pytest.mark.parametrize("augment", [None, AUGMENT], ids=["plain", "augmented"])
def test_graphed_epochs_train_exactly_as_the_eager_loop(tmp_path, monkeypatch, augment):
    runners = []

    def cpu_graphs(model, opt, dist, required=True):  # noqa: ANN001, ANN202
        inputs = StaticInputs()  # shared, as graphed_steps shares them
        for body in (lambda x, t: train_step(model, opt, x, t), lambda x, y: eval_step(model, x, y)):
            runners.append(GraphedSteps(body, eager_capture, side_stream=False, inputs=inputs))
        return tuple(runners)

    eager_model, eager_state = _train(tmp_path / "eager", "cpu", cuda_graphs=False, augment=augment)
    monkeypatch.setattr(training, "graphed_steps", cpu_graphs)
    graph_model, graph_state = _train(tmp_path / "graphs", "cpu", cuda_graphs=True, augment=augment)

    runner, eval_runner = runners
    # 300 samples in batches of 64: per epoch one eager warm-up, one capture, two replays and
    # the last batch of 44 eagerly
    assert (runner.captures, runner.replays) == (3, 6)
    # 96 validation and 128 test samples in batches of 40, one graph for the whole run: per
    # epoch 2 + 3 full batches (less the first warm-up and the capture), the last ones eagerly
    assert (eval_runner.captures, eval_runner.replays) == (1, 3 * 5 - 2)
    # every batch was gathered straight into the buffer its graph reads: none was copied there
    # but the augmented ones (a capture and two replays an epoch)
    assert (runner.batch_copies, eval_runner.batch_copies) == (0 if augment is None else 9, 0)
    assert runner._inputs is None  # the training graph and its buffer went at the epoch's end
    for (name, got), want in zip(
        graph_model.state_dict().items(), eager_model.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    assert graph_state.history == eager_state.history  # losses and accuracies, every split


def test_a_replay_reads_the_new_batch():
    seen = []
    steps = GraphedSteps(lambda x, t: (x.sum() + t.sum(),), eager_capture, side_stream=False)
    for value in range(5):
        seen.append(float(steps(torch.full((2, 3), float(value)), torch.zeros(2))[0]))
    assert seen == [0.0, 6.0, 12.0, 18.0, 24.0]
    assert float(steps(torch.ones(1, 3), torch.zeros(1))[0]) == 3.0  # another shape: eager


def test_batches_written_into_buffers_equal_the_gathered_ones():
    """``batches(into=...)`` writes each batch into the tensor it is given, in the layout (and
    with the values) of the batch it would have gathered; one tensor per layout, reused."""
    gen = torch.Generator().manual_seed(0)
    n, t_max, c = 11, 9, 5
    x = torch.randint(0, 3, (n, t_max, c), generator=gen, dtype=torch.uint8)
    lengths = torch.tensor([9, 4, 9, 9, 7, 9, 3, 2, 9, 9, 5])
    split = Split(x, lengths, torch.arange(n) % 3)
    inputs = StaticInputs()
    order = torch.randperm(n, generator=gen)
    gathered = list(batches(split, 4, indices=order))
    seen = []  # a batch's tensor is overwritten by the next batch of its layout: check as they come
    for (want, want_y, want_idx), (got, y, idx) in zip(
        gathered, batches(split, 4, indices=order, into=inputs.buffer), strict=True
    ):
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert (got.shape, got.stride()) == (want.shape, want.stride())
        assert torch.equal(y, want_y) and torch.equal(idx, want_idx)
        seen.append((got.shape, got.data_ptr()))
    assert len(seen) == 3
    assert seen[0][0] == seen[1][0] and seen[0][1] == seen[1][1]  # same layout, same buffer
    assert seen[2][0][1] == 3 and seen[2][1] != seen[0][1]  # the last, smaller batch


def test_static_inputs_copy_a_tensor_unless_it_is_the_buffer():
    inputs = StaticInputs()
    mine = torch.arange(6.0).reshape(2, 3)
    buf, copied = inputs.take(mine)
    assert copied and buf is not mine and torch.equal(buf, mine)  # a caller's tensor is cloned
    assert inputs.take(buf) == (buf, False)  # the buffer itself: read in place
    other = torch.ones(2, 3)
    again, copied = inputs.take(other)
    assert copied and again is buf and torch.equal(buf, other)  # same layout: copied into it
    assert inputs.buffer((2, 3), (3, 1), torch.float32, torch.device("cpu")) is buf
    assert inputs.take(mine.t())[0] is not buf  # other strides, another buffer
    adopted = inputs.adopt(torch.zeros(4))
    assert inputs.take(adopted) == (adopted, False)
    gone = weakref.ref(buf)
    del buf, again
    gc.collect()
    assert gone() is None  # nobody holds it: the registry let it go
    assert inputs.buffer((2, 3), (3, 1), torch.float32, torch.device("cpu")).shape == (2, 3)


def test_two_runners_on_shared_inputs_read_one_buffer():
    """The benchmark's graphed rows (and the trainer's train and eval steps, where their batches
    have one layout) read one buffer: an adopted input is read in place by both graphs."""
    inputs = StaticInputs()
    x = inputs.adopt(torch.arange(12.0).reshape(3, 4))
    t = inputs.adopt(torch.zeros(3))
    train = GraphedSteps(lambda x, t: (x.sum(),), eager_capture, side_stream=False, inputs=inputs)
    evaluation = GraphedSteps(lambda x, t: (x.mean(),), eager_capture, side_stream=False, inputs=inputs)
    for _ in range(3):
        assert float(train(x, t)[0]) == 66.0
        assert float(evaluation(x, t)[0]) == 5.5
    x.add_(1.0)  # the input changed in place: both graphs read the new values
    assert (float(train(x, t)[0]), float(evaluation(x, t)[0])) == (78.0, 6.5)
    assert train._inputs[0] is x and evaluation._inputs[0] is x
    assert (train.batch_copies, evaluation.batch_copies) == (0, 0)
    assert (train.replays, evaluation.replays) == (2, 2)


def test_a_capture_records_only_a_shape_a_warm_up_ran():
    """Batches padded to their longest sample change shape: a batch of a shape not run eagerly
    since the warm-up is a new warm-up, not a capture (whose lazily made state, such as DFT
    matrices for a new length, would be made inside the capture and fail it)."""
    captured = []

    def capture(body):  # noqa: ANN001, ANN202
        replay, outputs = eager_capture(body)
        captured.append(int(outputs[1]))  # the captured batch's length
        return replay, outputs

    steps = GraphedSteps(lambda x, t: (x.sum(), torch.tensor(x.shape[0])), capture, side_stream=False)
    lengths = [100, 97, 97, 97, 100, 97]
    sums = [float(steps(torch.ones(t, 3), torch.zeros(3))[0]) for t in lengths]
    assert sums == [3.0 * t for t in lengths]
    assert captured == [97] and (steps.captures, steps.replays) == (1, 2)
    steps.new_epoch()  # a new epoch warms up again before it captures
    for t in (100, 100):
        steps(torch.ones(t, 3), torch.zeros(3))
    assert captured == [97, 100]


def test_every_eager_step_and_capture_uses_one_side_stream(monkeypatch):
    """A fresh stream per epoch would keep one more cuBLAS workspace per epoch, and eager steps
    on the main stream one more for the run (graph_stream)."""
    made, used = [], []

    class FakeStream:
        def __init__(self, device: int | None = None) -> None:
            made.append(self)

        def wait_stream(self, other: object) -> None:
            pass

    class Current(FakeStream):
        def __init__(self) -> None:
            pass

    @contextlib.contextmanager
    def on(stream):  # noqa: ANN001, ANN202
        used.append(stream)
        yield

    def capture(body):  # noqa: ANN001, ANN202
        used.append(cuda_graphs.graph_stream())  # as cuda_capture records on it
        return eager_capture(body)

    monkeypatch.setattr(cuda_graphs, "_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", Current)
    train = GraphedSteps(lambda x, t: (x.sum(),), capture)
    evaluation = GraphedSteps(lambda x, t: (x.mean(),), capture)
    for _ in range(4):
        train.new_epoch()
        for n in (2, 2, 2, 1):  # the last, smaller batch runs eagerly
            train(torch.ones(n), torch.zeros(n))
            evaluation(torch.ones(n), torch.zeros(n))
    # a warm-up and a capture per epoch for training, once for the run for evaluation
    assert (train.captures, evaluation.captures) == (4, 1)
    assert (train.replays, evaluation.replays) == (4, 10)
    # 4 x 3 training steps not replayed (warm-up, capture, the smaller batch) and 2 + 4
    # evaluation steps (warm-up, capture, then the smaller batch of every epoch)
    assert len(made) == 1 and len(used) == 4 * 3 + 2 + 4 and all(s is made[0] for s in used)


def test_cpu_training_falls_back_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="snn_delays.training"):
        model, state = _train(tmp_path, "cpu", cuda_graphs=True, epochs=1)
    assert "needs one process on a CUDA device" in caplog.text
    assert state.epoch == 1


def test_auto_on_the_cpu_trains_eagerly_and_says_so_only_at_debug(tmp_path, caplog):
    """``auto`` (the default) on the CPU printed "needs one process on a CUDA device (got cpu,
    1 processes)" at the start of every CPU run: expected there, so it is a debug line now."""
    with caplog.at_level(logging.INFO, logger="snn_delays.training"):
        _train(tmp_path / "info", "cpu", cuda_graphs="auto", epochs=1)
    assert "cuda_graphs" not in caplog.text
    with caplog.at_level(logging.DEBUG, logger="snn_delays.training"):
        _train(tmp_path / "debug", "cpu", cuda_graphs="auto", epochs=1)
    assert "needs one process on a CUDA device (got cpu, 1 process)" in caplog.text


def test_optimizers_that_cannot_be_graphed_train_eagerly(caplog):
    model = DelaySNN(8, 4, n_hidden=16, n_layers=1, kernel_size=15)
    sgd = torch.optim.SGD(model.weight_parameters(), lr=0.1)
    opt = Optimization(sgd, None, torch.optim.Adam(model.delay_parameters()), None)
    with caplog.at_level(logging.DEBUG, logger="snn_delays.training"):
        assert training.graphed_steps(model, opt, training.Distributed(), required=False) == (None, None)
        assert caplog.records[-1].levelno == logging.DEBUG  # auto, and on the CPU: a debug line
        assert training.graphed_steps(model, opt, training.Distributed()) == (None, None)
    assert caplog.records[-1].levelno == logging.WARNING
    assert "SGD cannot step inside a CUDA graph: training without graphs" in caplog.text
    assert (
        "capturable" not in opt.positions.param_groups[0] or not opt.positions.param_groups[0]["capturable"]
    )


def test_auto_graphs_stay_off_quietly_on_the_cpu(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="snn_delays.training"):
        model, state = _train(tmp_path, "cpu", cuda_graphs="auto", epochs=1)
    assert "CUDA" not in caplog.text
    assert state.epoch == 1
    with pytest.raises(ValueError, match="trainer.cuda_graphs must be auto, true or false, got 'yes'"):
        FitConfig(1, 8, 8, cuda_graphs="yes")


def test_optimizers_become_capturable_and_back():
    p = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    adam.step()
    set_capturable(True, adam, None)
    assert adam.param_groups[0]["capturable"] and torch.is_tensor(adam.state[p]["step"])
    with pytest.raises(ValueError, match="cannot step inside a CUDA graph"):
        set_capturable(True, torch.optim.SGD([p], lr=0.1))
    other = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="trainer.cuda_graphs: SGD cannot step inside a CUDA graph"):
        set_capturable(True, other, torch.optim.SGD([p], lr=0.1))
    assert not other.param_groups[0]["capturable"]  # refused before any optimizer changed
    with pytest.raises(AssertionError, match="capturable"):
        adam.step()  # a capturable Adam refuses CPU parameters: a graphed run resumed on the CPU
    set_capturable(False, adam, torch.optim.SGD([p], lr=0.1))
    adam.step()
    assert not adam.param_groups[0]["capturable"] and float(adam.state[p]["step"]) == 2.0


def _capturable_eager(model, opt, dist, required=True):  # noqa: ANN001, ANN202
    """The optimizers of a graphed run (``capturable=True``), stepped eagerly."""
    set_capturable(True, opt.weights, opt.positions)
    return None, None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_train_as_the_eager_loop_on_the_gpu(tmp_path, monkeypatch):
    """Replays against eager steps with the same (capturable) optimizers: the same parameters.

    A capturable Adam computes its bias corrections on the GPU in float32 (eagerly in Python
    floats), so against the default eager loop only the learning curve is held: Adam's
    normalised steps turn last-bit differences of near-zero position gradients into whole
    steps of the position learning rate.
    """
    runners = []

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        runners.extend(real(*args, **kwargs))
        return tuple(runners)

    real = training.graphed_steps
    eager_model, eager_state = _train(tmp_path / "eager", "cuda", cuda_graphs=False, dropout=0.0)
    monkeypatch.setattr(training, "graphed_steps", _capturable_eager)
    same_model, same_state = _train(tmp_path / "capturable", "cuda", cuda_graphs=True, dropout=0.0)
    monkeypatch.setattr(training, "graphed_steps", recorded)
    graph_model, graph_state = _train(tmp_path / "graphs", "cuda", cuda_graphs=True, dropout=0.0)
    assert [(r.failed, r.captures) for r in runners] == [(False, 3), (False, 1)]  # really captured
    for (name, got), want in zip(
        graph_model.state_dict().items(), same_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    for got, want, eager in zip(graph_state.history, same_state.history, eager_state.history, strict=True):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-4)
        assert got["test/acc"] == pytest.approx(eager["test/acc"], abs=0.05)


def test_a_failed_capture_trains_on_without_graphs(caplog):
    def failing_capture(body):  # noqa: ANN001, ANN202
        raise RuntimeError("operation not permitted when stream is capturing")

    calls = []
    steps = GraphedSteps(
        lambda x, t: calls.append(float(x.sum())) or (x.sum(),), failing_capture, side_stream=False
    )
    with caplog.at_level(logging.WARNING, logger="snn_delays.cuda_graphs"):
        outs = [float(steps(torch.full((2,), float(v)), torch.zeros(2))[0]) for v in range(4)]
    assert outs == [0.0, 2.0, 4.0, 6.0] and calls == outs  # every batch ran once, eagerly
    assert steps.failed and steps.captures == 0 and not steps.captured
    assert "capture failed" in caplog.text


def test_a_graphed_runs_checkpoint_resumes_eagerly_on_the_cpu(tmp_path):
    """A GPU run with graphs saves capturable optimizers; resuming on the CPU turns that off."""
    from hydra import compose, initialize_config_dir

    from snn_delays.train import build_model, build_optimization, load_for_resume
    from snn_delays.training import checkpoint_payload, random_states

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=synthetic", "logger=none"])
    model = build_model(cfg.model, 8, 4, 10.0)
    opt = build_optimization(cfg.optim, model, 2)
    x, y = (torch.rand(24, 5, 8) < 0.3).float(), torch.randint(4, (5,))
    train_step(model, opt, x, y)  # Adam state with step counts
    for o in (opt.weights, opt.positions):  # as trainer.cuda_graphs=true on a GPU leaves them
        for group in o.param_groups:
            group["capturable"] = True
    extra = {"config": OmegaConf.to_container(cfg, resolve=True)}
    torch.save(
        {**checkpoint_payload(model, opt, training.TrainState(epoch=1), extra), "rng": random_states()},
        tmp_path / "last.pt",
    )

    model, opt = build_model(cfg.model, 8, 4, 10.0), build_optimization(cfg.optim, model, 2)
    load_for_resume(tmp_path / "last.pt", cfg, model, opt)
    assert not any(g["capturable"] for o in (opt.weights, opt.positions) for g in o.param_groups)
    train_step(model, opt, x, y)  # a capturable Adam would refuse these CPU parameters


def test_a_batch_of_another_dtype_runs_eagerly():
    """A graph replays the dtype it was captured with: a batch of the graph's shape but another
    dtype is not cast into its buffer, it runs eagerly in its own."""
    steps = GraphedSteps(
        lambda x, t: (x.sum(), torch.tensor(x.dtype == torch.float64)), eager_capture, side_stream=False
    )
    for _ in range(3):  # a warm-up, the capture, a replay
        steps(torch.ones(2, 3), torch.zeros(2))
    x = torch.full((2, 3), 1.0 + 2.0**-40, dtype=torch.float64)  # not exact in float32
    total, is_double = steps(x, torch.zeros(2))
    assert bool(is_double) and total.dtype == torch.float64 and float(total) == float(x.sum())
    assert (steps.captures, steps.replays) == (1, 1)


def test_static_inputs_keep_one_buffer_per_stride():
    """Batches written through ``buffer`` get the strides asked for (``batches(into=)`` asks
    for the sample-major layout of the batch it would gather): one buffer per layout, strides
    included, not a buffer of the same shape in another layout."""
    inputs = StaticInputs()
    cpu = torch.device("cpu")
    rows = inputs.buffer((2, 3), (3, 1), torch.float32, cpu)
    cols = inputs.buffer((2, 3), (1, 2), torch.float32, cpu)
    assert rows.stride() == (3, 1) and cols.stride() == (1, 2) and cols is not rows
    assert inputs.buffer((2, 3), (1, 2), torch.float32, cpu) is cols
    assert inputs.buffer((2, 3), (3, 1), torch.float32, cpu) is rows
