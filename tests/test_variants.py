"""The model variants as configured (``model=fixed_delays``): what they train is what they say."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException

from snn_delays.train import CONF_DIR, build_model, build_optimization
from snn_delays.training import sigma_at


@pytest.mark.parametrize("overrides", [["model=fixed_delays"], ["model=delays", "model.delays=fixed"]])
@pytest.mark.parametrize("backend", ["fast", "dcls"])
def test_fixed_delays_train_the_network_they_evaluate_from_the_first_epoch(overrides, backend):
    """Fixed delays: positions neither trained nor moved, whole steps from the start (the
    published ``round_pos``), and at every epoch's sigma each synapse is one tap at its fixed
    delay, the network evaluated. They started at sigma K // 2 like the learned variant, a
    Gaussian blur over the whole kernel while sigma decayed, then split each synapse of a
    fractional position over two taps: a network other than the one evaluated."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=synthetic", *overrides, f"model.delay_backend={backend}", "logger=none"],
        )
    torch.manual_seed(0)
    model = build_model(cfg.model, n_inputs=8, n_classes=4, dt_ms=10.0)
    epochs = cfg.trainer.epochs
    opt = build_optimization(cfg.optim, model, epochs)
    assert model.delay_parameters() == [] and opt.positions is None
    layer = model.delay_layers()[0]
    assert not layer.dcls.P.requires_grad
    assert torch.equal(layer.dcls.P, layer.dcls.P.round())
    x = (torch.rand(40, 16, 8) < 0.3).float()
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
    layer.train()
    for epoch in range(epochs):
        layer.set_sigma(sigma_at(epoch, opt.sigma_init, opt.sigma_final, opt.sigma_decay_epochs))
        with torch.no_grad():
            trained = layer(x)
        # DCLS's Gaussian is never narrower than 0.27 steps: 1e-3 of a tap leaks to each neighbour
        assert torch.allclose(trained, evaluated, atol=0.01 * float(evaluated.abs().max())), (
            f"epoch {epoch}: sigma {layer.sigma:.3g}: not the evaluated network"
        )


def test_learned_delays_still_start_blurred_at_continuous_positions():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=synthetic", "logger=none"])
    model = build_model(cfg.model, n_inputs=8, n_classes=4, dt_ms=10.0)
    layer = model.delay_layers()[0]
    assert layer.sigma == layer.kernel_size // 2 and not torch.equal(layer.dcls.P, layer.dcls.P.round())


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_a_negative_sigma_is_refused(value):
    """DCLS takes |sigma|: model.sigma_init=-1 trained at sigma 1 while the schedule and the
    logs said -1."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=synthetic", "logger=none", f"model.sigma_init={value}"])
    with pytest.raises(InstantiationException, match="model.sigma_init must be a number >= 0"):
        build_model(cfg.model, n_inputs=8, n_classes=4, dt_ms=10.0)
