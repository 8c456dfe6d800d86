"""Added modules at inference (erasekit.modules), ``ModelHandle.erasures_off`` and the attacks' use of it.

The module erasures here are random (untrained) Receler erasers and CPE gates on the tiny SD model,
so every one of them changes the UNet's output.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erasekit import Erasure, load_model
from erasekit.attacks.base import AdversarialPrompt, Attack, execute
from erasekit.erasure import model_signature
from erasekit.models.attention import HookedCrossAttnProcessor
from erasekit.modules.cpe import ResAG
from erasekit.modules.receler import Eraser, eraser_state

PACKAGE = Path(__file__).resolve().parent.parent / "erasekit"


@pytest.fixture
def sd_model(tiny_sd_folder):
    """A fresh tiny SD model per test: these tests change its weights."""
    return load_model(tiny_sd_folder)


def kv_weights(model) -> list[str]:
    return [f"{name}.weight" for name in model.key_value_projections()]


def delta_erasure(model, seed: int) -> Erasure:
    """A UCE-style erasure: random deltas on every cross-attention to_k / to_v weight."""
    parameters = dict(model.unet.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    deltas = {name: 0.05 * torch.randn(parameters[name].shape, generator=generator) for name in kv_weights(model)}
    return Erasure.from_deltas(model, "uce", ["cat"], {}, deltas)


def receler_erasure(model, seed: int, rank: int = 4) -> Erasure:
    """Random Receler erasers on every cross-attention layer (``up`` nonzero, so they act)."""
    generator = torch.Generator().manual_seed(seed)
    erasers = {}
    for path, attn in model.cross_attention_layers().items():
        eraser = Eraser(attn.to_out[0].out_features, rank, generator)
        with torch.no_grad():
            eraser.up.weight.copy_(0.2 * torch.randn(eraser.up.weight.shape, generator=generator))
        erasers[path] = eraser
    return Erasure(method="receler", concepts=["cat"], base_model=model.name, config={"eraser_rank": rank},
                   modules=eraser_state(erasers), module_type="receler",
                   base_signature=model_signature(model, [f"{p}.to_out.0.weight" for p in erasers]))


def cpe_erasure(model, seed: int) -> Erasure:
    """One concept's random CPE gates on every to_k / to_v (every gate and residual nonzero)."""
    generator = torch.Generator().manual_seed(seed)
    projections = model.key_value_projections()
    names = list(projections)
    resag = ResAG(projections[names[0]].in_features, [projections[n].out_features for n in names], rank=2, gate_rank=4,
                  generator=generator)
    with torch.no_grad():
        resag.query.copy_(0.3 * torch.randn(resag.query.shape, generator=generator))
        resag.scaler.copy_(0.5 * torch.randn(resag.scaler.shape, generator=generator))
        for up in resag.up:
            up.copy_(0.2 * torch.randn(up.shape, generator=generator))
    modules = {name: tensor[None] for name, tensor in resag.state(names).items()}  # one concept
    return Erasure(method="cpe", concepts=["triangle"], base_model=model.name, config={"rank": 2}, modules=modules,
                   module_type="cpe", base_signature=model_signature(model, kv_weights(model)))


def unet_output(model) -> torch.Tensor:
    x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.predict_noise(x, torch.tensor([700, 300]), model.encode(["a red triangle", "a photo of a cat"]))


def unet_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.unet.named_parameters()}


def hook_state(model) -> dict:
    """Per cross-attention layer: the processor kind, its hook names in order, CPE's routed erasures in order."""
    state = {}
    for path, attn in model.cross_attention_layers().items():
        processor = attn.processor
        if not isinstance(processor, HookedCrossAttnProcessor):
            state[path] = type(processor).__name__
            continue
        routed = [(id(e.erasure), e.scale) for e in processor.kv_hooks["cpe"].router.entries] if "cpe" in processor.kv_hooks else []
        state[path] = (list(processor.kv_hooks), list(processor.probs_hooks), list(processor.output_hooks), routed)
    return state


def applied(model) -> list:
    return [(id(e), s) for e, s in model.applied_erasures]


def assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    for name, parameter in model.unet.named_parameters():
        assert torch.equal(parameter, expected[name]), name


# ---------------------------------------------------------------------------------- erasures_off
def test_erasures_off_takes_everything_off_and_restores_it_bit_exactly(sd_model):
    model = sd_model
    pristine_weights, pristine_hooks, pristine = unet_state(model), hook_state(model), unet_output(model)
    first, second = delta_erasure(model, 1), delta_erasure(model, 2)  # both edit the same weights
    receler, cpe = receler_erasure(model, 3), cpe_erasure(model, 4)
    first.apply(model)
    receler.apply(model, scale=0.8)
    second.apply(model, scale=0.7)
    cpe.apply(model, scale=1.5)
    weights, hooks, order, erased = unet_state(model), hook_state(model), applied(model), unet_output(model)
    assert not torch.allclose(erased, pristine)
    assert order == [(id(first), 1.0), (id(receler), 0.8), (id(second), 0.7), (id(cpe), 1.5)]

    with model.erasures_off() as unerased:
        assert unerased is model and model.applied_erasures == [] and model.original_parameters == {}
        assert_same_weights(model, pristine_weights)
        assert hook_state(model) == pristine_hooks
        assert torch.equal(unet_output(model), pristine)
    assert applied(model) == order and hook_state(model) == hooks
    assert_same_weights(model, weights)
    assert torch.equal(unet_output(model), erased)

    with pytest.raises(RuntimeError, match="inside"):  # an exception in the block still restores
        with model.erasures_off():
            assert torch.equal(unet_output(model), pristine)
            raise RuntimeError("inside")
    assert applied(model) == order and hook_state(model) == hooks
    assert_same_weights(model, weights)
    assert torch.equal(unet_output(model), erased)

    for erasure in (cpe, second, receler, first):  # and everything still comes off exactly
        erasure.remove(model)
    assert_same_weights(model, pristine_weights)
    assert hook_state(model) == pristine_hooks and model.original_parameters == {}


def test_erasures_off_restores_after_another_erasure_was_removed(sd_model):
    """Weights rebuilt by ``remove`` (original + the others' deltas) come back bit for bit too."""
    model = sd_model
    erasures = [delta_erasure(model, seed) for seed in (5, 6, 7)]
    for erasure, scale in zip(erasures, (1.0, 0.3, 2.0)):
        erasure.apply(model, scale=scale)
    erasures[1].remove(model)
    weights, order = unet_state(model), applied(model)
    with model.erasures_off():
        pass
    assert applied(model) == order
    assert_same_weights(model, weights)
    with model.erasures_off():  # no erasure at all: nothing to do
        with model.erasures_off():
            assert model.applied_erasures == []
    assert applied(model) == order


# ---------------------------------------------------------------------------------- the attacks
class ProbeAttack(Attack):
    """Records which erasures are on, and inside ``erasures_off``; optionally fails."""

    name = "probe"

    def __init__(self, fail: bool = False):
        super().__init__()
        self.config.inference_steps = 2
        self.fail, self.seen = fail, []

    def attack_prompt(self, run, prompt, index):
        self.seen.append(applied(run.model))
        with run.model.erasures_off():
            self.seen.append(applied(run.model))
        if self.fail:
            raise RuntimeError("attack failed")
        return AdversarialPrompt(run.model.encode([prompt]), text=prompt)


@pytest.mark.parametrize("fail", [False, True])
def test_attack_applies_the_erasures_and_leaves_the_model_as_it_found_it(sd_model, fail):
    model = sd_model
    on, off = delta_erasure(model, 8), receler_erasure(model, 9)
    on.apply(model, scale=0.5)  # already on (at its own scale) when the attack starts
    weights, hooks, order = unet_state(model), hook_state(model), applied(model)
    attack = ProbeAttack(fail)

    def run():
        return execute(attack, model, [off, on], "cat", prompts=["a photo of a cat"], judge=lambda images, c: [False] * len(images),
                       progress=False)

    if fail:
        with pytest.raises(RuntimeError, match="attack failed"):
            run()
    else:
        assert run()["n"] == 1
    assert attack.seen == [[(id(on), 0.5), (id(off), 1.0)], []]
    assert applied(model) == order and hook_state(model) == hooks
    assert_same_weights(model, weights)


# ---------------------------------------------------------------------------------- import direction
def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_imports_point_down():
    """erasure.py needs no method code; erasekit.modules only needs the model side."""
    assert not any(name.startswith("erasekit.methods") for name in imported_modules(PACKAGE / "erasure.py"))
    allowed = ("erasekit.models", "erasekit.errors", "erasekit.utils", "erasekit.modules")
    for path in sorted((PACKAGE / "modules").glob("*.py")):
        internal = {name for name in imported_modules(path) if name.split(".")[0] == "erasekit"}
        bad = {name for name in internal if not any(name == a or name.startswith(a + ".") for a in allowed)}
        assert not bad, (path.name, bad)


FRESH_PROCESS = r"""
import importlib.abc, json, sys

class NoMethods(importlib.abc.MetaPathFinder):  # the training code must not be needed to apply an erasure
    def find_spec(self, name, path=None, target=None):
        if name.startswith("erasekit.methods."):
            raise ImportError(f"{name} imported while applying a saved erasure")

sys.meta_path.insert(0, NoMethods())
import torch
from safetensors.torch import save_file
from erasekit.erasure import Erasure
from erasekit.models.loading import load_model

folder, out, *paths = sys.argv[1:]
model = load_model(folder)
erasures = [Erasure.load(p) for p in paths]
for erasure, scale in zip(erasures, (1.0, 0.5)):
    erasure.apply(model, scale=scale)
x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    erased = model.predict_noise(x, torch.tensor([700, 300]), model.encode(["a red triangle", "a photo of a cat"]))
for erasure in reversed(erasures):
    erasure.remove(model)
save_file({"erased": erased.contiguous()}, out)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("erasekit"))))
"""


def test_saved_receler_and_cpe_erasures_apply_in_a_fresh_process(sd_model, tiny_sd_folder, tmp_path):
    model = sd_model
    receler, cpe = receler_erasure(model, 10), cpe_erasure(model, 11)
    paths = [str(receler.save(tmp_path / "receler.safetensors")), str(cpe.save(tmp_path / "cpe.safetensors"))]
    pristine = unet_output(model)
    receler.apply(model)
    cpe.apply(model, scale=0.5)
    erased = unet_output(model)
    cpe.remove(model)
    receler.remove(model)

    out = tmp_path / "erased.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tiny_sd_folder), str(out), *paths],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"erasekit.modules", "erasekit.modules.receler", "erasekit.modules.cpe"} <= set(loaded)
    assert not any(m.startswith("erasekit.methods.") for m in loaded), loaded
    fresh = load_file(str(out))["erased"]
    torch.testing.assert_close(fresh, erased, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fresh, pristine)
