"""The shared training harness's precision and memory switches (erasekit.training), on a toy-shaped UNet."""

from __future__ import annotations

import warnings

import pytest
import torch

import erasekit
from erasekit.errors import ErasekitError
from erasekit.methods.receler import RecelerConfig, RecelerTrainer
from erasekit.training import Precision, enable_gradient_checkpointing

TINY_RECELER = dict(iterations=2, ddim_steps=3, batch_size=1, eraser_rank=8, adversarial_steps=2, adversarial_tokens=4,
                    learning_rate=1e-2)


@pytest.fixture(scope="module")
def model(toy_folder):
    return erasekit.load_model(toy_folder)


def test_precision_is_float32_on_a_cpu_with_a_warning():
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        precision = Precision("bf16", torch.device("cpu"))
    assert precision.compute_dtype is None and precision.scaler is None and precision.name == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Precision(None, torch.device("cpu")).name == "float32"
    with pytest.raises(ErasekitError, match="use bf16, fp16 or none"):
        Precision("int8", torch.device("cpu"))


def test_precision_step_averages_between_backward_and_step():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    seen = []

    def sync():  # what DataParallel.average_gradients does across processes; here: halve, and record what it saw
        seen.append(weight.grad.clone())
        weight.grad.mul_(0.5)

    Precision(None, torch.device("cpu")).step((weight * torch.tensor([3.0, 4.0])).sum(), optimizer, sync=sync)
    assert torch.equal(seen[0], torch.tensor([3.0, 4.0]))
    assert torch.equal(weight.detach(), torch.tensor([1.0 - 1.5, 2.0 - 2.0]))

    other = torch.nn.Parameter(torch.tensor([5.0]))
    weight.grad = None
    Precision(None, torch.device("cpu")).step((weight.sum() * other).sum(), torch.optim.SGD([other], lr=0.0), inputs=[other])
    assert torch.equal(other.grad, weight.detach().sum()[None]) and weight.grad is None  # inputs=: only these get gradients


def test_gradient_checkpointing_switch_restores_the_previous_setting(model):
    unet = model.unet
    assert not unet.is_gradient_checkpointing
    restore = enable_gradient_checkpointing(unet, True)
    assert unet.is_gradient_checkpointing
    assert enable_gradient_checkpointing(unet, True)() is None and unet.is_gradient_checkpointing  # already on: left on
    restore()
    assert not unet.is_gradient_checkpointing
    enable_gradient_checkpointing(unet, False)()
    assert not unet.is_gradient_checkpointing


def test_receler_gradient_checkpointing_gives_the_same_erasers(model):
    trainer = RecelerTrainer(model, ["triangle"], RecelerConfig(**TINY_RECELER, gradient_checkpointing=True))
    try:
        assert model.unet.is_gradient_checkpointing
    finally:
        trainer.close()
    assert not model.unet.is_gradient_checkpointing
    plain = erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**TINY_RECELER), progress=False)
    checkpointed = erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**TINY_RECELER, gradient_checkpointing=True),
                                  progress=False)
    assert not model.unet.is_gradient_checkpointing
    assert plain.info["precision"] == checkpointed.info["precision"] == "float32"
    moved = max(v.abs().max().item() for k, v in plain.modules.items() if k.endswith(".up.weight"))
    assert moved > 1e-3  # the erasers trained (they start at zero)
    for name, value in plain.modules.items():
        torch.testing.assert_close(checkpointed.modules[name], value, rtol=1e-4, atol=1e-6)


def test_receler_mixed_precision_falls_back_to_float32_on_a_cpu(model):
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        erasure = erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**{**TINY_RECELER, "iterations": 1},
                                 mixed_precision="bf16"), progress=False)
    assert erasure.info["precision"] == "float32"
    with pytest.raises(ErasekitError, match="mixed_precision"):
        erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**TINY_RECELER, mixed_precision="int8"), progress=False)


def test_a_resumed_run_may_switch_gradient_checkpointing(model, tmp_path):
    from erasekit.methods.esd import ESDConfig

    base = dict(iterations=4, ddim_steps=3, batch_size=1, learning_rate=1e-3, checkpoint_every=2)
    uninterrupted = erasekit.erase(model, "esd", ["triangle"], config=ESDConfig(**base), progress=False)
    erasekit.erase(model, "esd", ["triangle"], config=ESDConfig(**{**base, "iterations": 2}, checkpoint_dir=str(tmp_path)),
                   progress=False)
    resumed = erasekit.erase(model, "esd", ["triangle"], progress=False, config=ESDConfig(
        **base, checkpoint_dir=str(tmp_path), resume=True, gradient_checkpointing=True))
    for name, delta in uninterrupted.deltas.items():
        torch.testing.assert_close(resumed.deltas[name], delta, rtol=1e-4, atol=1e-7)
