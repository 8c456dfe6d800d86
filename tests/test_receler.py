"""Receler on a toy-shaped UNet with random weights (fast), and one slow test on the trained toy model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import DDIMScheduler

import erasekit
from erasekit import ErasekitError
from erasekit.erasure import Erasure
from erasekit.methods import build_config
from erasekit.methods import receler
from erasekit.methods.receler import (
    RecelerConfig, RecelerTrainer, choose_mask_layers, concept_attention_maps, concept_mask,
    coupled_timesteps, cross_attention_resolutions, eraser_parameter_count, localization_loss, resize_mask,
    splice_adversarial,
)
from erasekit.models.attention import HookedCrossAttnProcessor, hooked_processor, remove_hooks
from erasekit.modules.receler import Eraser
from erasekit.targets import prompt_targets

# A few iterations on very short DDIM schedules keep every fast test at a few seconds.
TINY = dict(iterations=2, ddim_steps=3, batch_size=1, eraser_rank=8, adversarial_steps=2, adversarial_tokens=4,
            learning_rate=1e-2)


@pytest.fixture(scope="module")
def model(toy_folder):
    return erasekit.load_model(toy_folder)


@pytest.fixture(scope="module")
def probe(model):
    """A fixed (x, t, conditioning) to compare UNet outputs on."""
    x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([700, 300]), model.encode(["a red triangle", "a blue circle"])


def output(model, probe) -> torch.Tensor:
    x, t, cond = probe
    with torch.no_grad():
        return model.predict_noise(x, t, cond)


def processors(model) -> dict:
    return {path: attn.processor for path, attn in model.cross_attention_layers().items()}


@pytest.fixture(scope="module")
def trained(model):
    """Two small erasures: triangle and circle."""
    first = erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**TINY, seed=1), progress=False)
    second = erasekit.erase(model, "receler", ["circle"], config=RecelerConfig(**TINY, seed=2), progress=False)
    return first, second


# ------------------------------------------------------------------------------ the eraser
def test_fresh_eraser_changes_nothing(model, probe):
    reference = output(model, probe)
    before = processors(model)
    trainer = RecelerTrainer(model, ["triangle"], RecelerConfig(**TINY))
    try:
        assert all(isinstance(p, HookedCrossAttnProcessor) for p in processors(model).values())
        assert torch.equal(output(model, probe), reference)  # up-projection zero-initialised: exact identity
        fresh = Erasure(method="receler", concepts=["triangle"], base_model=model.name, config={},
                        modules=trainer.state(), module_type="receler")
    finally:
        trainer.close()
    assert processors(model) == before
    fresh.apply(model)
    try:
        assert torch.equal(output(model, probe), reference)
    finally:
        fresh.remove(model)
    assert processors(model) == before


def test_one_eraser_per_cross_attention_layer_keyed_by_full_path(model, trained):
    erasure = trained[0]
    layers = model.cross_attention_layers()
    paths = {key.rsplit(".", 2)[0] for key in erasure.modules}
    assert paths == set(layers) and all(p.endswith("attn2") for p in paths)
    widths = [attn.to_out[0].out_features for attn in layers.values()]
    assert erasure.num_parameters == eraser_parameter_count(widths, TINY["eraser_rank"])
    # SD-1.x: 16 blocks whose widths sum to 12,480 give 257 * 12,480 + 16 * 128 values at rank 128
    sd_widths = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    assert eraser_parameter_count(sd_widths, 128) == 3_209_408
    eraser = Eraser(64, 8)
    assert torch.equal(eraser(torch.randn(3, 64)), torch.zeros(3, 64))


# ------------------------------------------------------------------------ the concept mask
def test_concept_mask_is_binary_min_max_thresholded():
    maps = torch.tensor([[[0.20, 0.21], [0.35, 1.20]], [[5.0, 5.0], [5.0, 5.0]]])
    # sample 0 normalised: 0, 0.01, 0.15, 1 -> >= 0.1 at the last two
    mask = concept_mask(maps, threshold=0.1)
    assert torch.equal(mask[0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask[1], torch.zeros(2, 2))  # a flat map has no concept region (the released code's NaN -> 0)
    assert torch.equal(concept_mask(maps * 7 + 3, 0.1), mask)  # invariant to affine rescaling
    assert concept_mask(maps, 0.5)[0].sum() == 1


def test_mask_resizes_with_nearest_neighbours():
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    up = resize_mask(mask, (4, 4)).view(1, 4, 4)
    assert torch.equal(up[0], mask[0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    down = resize_mask(torch.eye(4)[None], (2, 2)).view(1, 2, 2)
    assert set(down.unique().tolist()) <= {0.0, 1.0}
    assert resize_mask(mask, (3, 5)).shape == (1, 15)


def test_mask_is_one_where_the_concept_tokens_attend():
    batch, heads, side, tokens = 2, 4, 6, 24
    probs = torch.full((batch, heads, side * side, tokens), 1.0 / tokens)
    region = torch.zeros(side, side, dtype=torch.bool)
    region[1:3, 2:5] = True
    concept = [1, 2]
    probs[:, :, region.flatten(), 1] = 0.5  # the concept's first token attends strongly inside the region
    probs[:, :2, :, 7] = 0.9  # another token attends everywhere: it must not matter
    maps = concept_attention_maps(probs, concept).view(batch, side, side)
    mask = concept_mask(maps, 0.1)
    assert torch.equal(mask.bool(), region.expand(batch, -1, -1))


def test_layer_resolutions_match_the_unet_and_mask_layers_follow_the_spec(model):
    resolutions = cross_attention_resolutions(model)
    seen = {}
    layers = model.cross_attention_layers()
    for path, attn in layers.items():
        hooked_processor(attn).probs_hooks["test-size"] = lambda attn, probs, path=path: seen.__setitem__(path, probs.shape[2])
    try:
        output(model, (torch.randn(1, 3, 24, 24), torch.tensor([10]), model.encode(["a"])))
    finally:
        remove_hooks(layers, "test-size")
    assert seen == {path: h * w for path, (h, w) in resolutions.items()}
    # toy 24x24: the 6x6 layers (latent / 4, as SD-1.x's 16x16 maps of its 64x64 latent)
    chosen = choose_mask_layers(resolutions, 24, 4)
    assert chosen and all(resolutions[p] == (6, 6) for p in chosen)
    assert len(chosen) == sum(1 for r in resolutions.values() if r == (6, 6))
    # SD-1.x at 512 px: down_blocks.2 (2 layers) and up_blocks.1 (3 layers)
    sd = {f"down_blocks.{i}.attentions.{j}": (64 >> i, 64 >> i) for i in range(3) for j in range(2)}
    sd["mid_block.attentions.0"] = (8, 8)
    sd.update({f"up_blocks.{i}.attentions.{j}": (8 << i, 8 << i) for i in range(1, 4) for j in range(3)})
    assert sorted(choose_mask_layers(sd, 64, 4)) == sorted(
        [f"down_blocks.2.attentions.{j}" for j in range(2)] + [f"up_blocks.1.attentions.{j}" for j in range(3)])
    assert all(sd[p] == (8, 8) for p in choose_mask_layers(sd, 64, 6))  # the nearest size when none is exact
    no_16 = {p: r for p, r in sd.items() if r != (16, 16)}
    assert all(no_16[p] == (32, 32) for p in choose_mask_layers(no_16, 64, 4))  # a tie goes to the finer maps


def test_teacher_mask_per_layer_and_regularisation_outside_it(model):
    trainer = RecelerTrainer(model, ["triangle"], RecelerConfig(**TINY))
    try:
        x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(4))
        eps_c, eps_0, masks = trainer.teacher(x, torch.tensor([500, 200]), 0)
        assert eps_c.shape == eps_0.shape == x.shape and not torch.equal(eps_c, eps_0)
        assert set(masks) == set(trainer.layers)
        for path, mask in masks.items():
            h, w = trainer.resolutions[path]
            assert mask.shape == (2, h * w) and set(mask.unique().tolist()) <= {0.0, 1.0}
            assert mask.sum(-1).min() >= 1  # the maximum of the map is always inside
        # the teacher's mask is the thresholded mean map of the chosen layers
        maps = torch.stack([trainer._maps[p].view(2, 6, 6) for p in trainer.mask_layers]).mean(0)
        assert torch.equal(masks[trainer.mask_layers[0]].view(2, 6, 6), concept_mask(maps, 0.1))
        assert trainer._maps and all(p in trainer.mask_layers for p in trainer._maps)
        # no probability hook stays on after the teacher pass
        assert not any(p.probs_hooks for p in processors(model).values() if isinstance(p, HookedCrossAttnProcessor))
    finally:
        trainer.close()
    outputs = {"a": torch.ones(1, 4, 3)}
    assert localization_loss(outputs, {"a": torch.tensor([[1.0, 1.0, 1.0, 1.0]])}) == 0  # all inside: no penalty
    assert localization_loss({"a": torch.tensor([[[2.0], [0.0], [4.0], [9.0]]])}, {"a": torch.tensor([[0.0, 1.0, 0.0, 1.0]])}) == 10.0


# --------------------------------------------------------------------- adversarial prompt
def test_adversarial_vectors_reach_the_unet(model):
    """Pitfall R1: in the released code the vectors never reach the UNet; here they must."""
    trainer = RecelerTrainer(model, ["triangle"], RecelerConfig(**TINY))
    try:
        start = trainer.positions[0][-1] + 1
        spliced = trainer.adversarial_condition(0).hidden_states
        clean = trainer.cond[0].hidden_states
        assert torch.equal(spliced[:, :start], clean[:, :start]) and torch.equal(spliced[:, start + 4:], clean[:, start + 4:])
        assert torch.equal(spliced[0, start:start + 4], trainer.adversarial[0].detach())

        x = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(5))
        t = torch.tensor([400])
        with torch.no_grad():
            first = model.predict_noise(x, t, trainer.adversarial_condition(0))
            trainer.adversarial[0].add_(1.0)
            second = model.predict_noise(x, t, trainer.adversarial_condition(0))
        assert not torch.allclose(first, second)  # changing the vectors changes the UNet's output

        loss = (model.predict_noise(x, t, trainer.adversarial_condition(0)) ** 2).mean()
        (gradient,) = torch.autograd.grad(loss, [trainer.adversarial[0]])
        assert gradient.abs().sum() > 0

        eps_c, _, _ = trainer.teacher(x, t, 0)
        before = trainer.adversarial[0].detach().clone()
        trainer.attack_step(x, t, 0, eps_c)
        assert not torch.equal(trainer.adversarial[0].detach(), before)
        assert all(p.grad is None for p in trainer.parameters)  # the attack leaves the erasers alone
    finally:
        trainer.close()


def test_splice_errors_clearly_when_there_is_no_room(model):
    cond = model.encode(["triangle"])
    with pytest.raises(ErasekitError, match="adversarial_tokens"):
        splice_adversarial(cond, torch.zeros(30, cond.hidden_states.shape[-1]), 2)
    before = processors(model)
    with pytest.raises(ErasekitError, match="adversarial_tokens"):
        RecelerTrainer(model, ["triangle"], RecelerConfig(**{**TINY, "adversarial_tokens": 23}))
    assert processors(model) == before  # a trainer that fails to start leaves no hook behind


def test_zero_attack_steps_still_trains_the_eraser(model, probe):
    """Pitfall R2: with 0 attack steps the released code never updates the eraser."""
    reference = output(model, probe)
    erasure = erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**{**TINY, "adversarial_steps": 0}),
                             progress=False)
    ups = [v for k, v in erasure.modules.items() if k.endswith(".up.weight")]
    assert all(v.abs().max() > 0 for v in ups)
    assert erasure.info["attack_curve"] == [] and erasure.info["iterations"] == 2
    erasure.apply(model)
    try:
        assert not torch.allclose(output(model, probe), reference)
    finally:
        erasure.remove(model)


# ------------------------------------------------------------------------------ training
def test_erase_hands_the_model_back_unchanged(model, probe):
    reference = output(model, probe)
    before = processors(model)
    erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**{**TINY, "iterations": 1}), progress=False)
    assert processors(model) == before
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert torch.equal(output(model, probe), reference)


def test_several_concepts_share_one_eraser(model):
    config = RecelerConfig(**{**TINY, "iterations": 6, "adversarial_steps": 1})
    trainer = RecelerTrainer(model, ["triangle", "three-sided shape"], config)
    try:
        assert len(trainer.adversarial) == 2 and len(trainer.positions[1]) > 1
        trainer.train(progress=False)
        counts = trainer.summary()["concept_counts"]
    finally:
        trainer.close()
    assert sum(counts.values()) == 6 and all(v > 0 for v in counts.values()), counts


def test_training_is_seeded(model):
    config = RecelerConfig(**{**TINY, "iterations": 1})
    a = erasekit.erase(model, "receler", ["triangle"], config=config, progress=False)
    b = erasekit.erase(model, "receler", ["triangle"], config=config, progress=False)
    assert all(torch.equal(a.modules[k], b.modules[k]) for k in a.modules)


# ------------------------------------------------------------------- checkpoints and resume
CURVES = ("loss_curve", "erase_curve", "regularization_curve", "attack_curve")


def assert_same_erasure(a: Erasure, b: Erasure) -> None:
    assert sorted(a.modules) == sorted(b.modules)
    for name, value in a.modules.items():
        assert torch.equal(b.modules[name], value), name
    for key in (*CURVES, "concept_counts", "iterations"):
        assert a.info[key] == b.info[key], key


def checkpoint_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("adversarial_steps", [2, 0])
def test_checkpoint_and_resume_give_the_uninterrupted_erasers(model, tmp_path, adversarial_steps):
    base = dict(TINY, iterations=4, seed=7, adversarial_steps=adversarial_steps)
    concepts = ["triangle", "circle"]
    uninterrupted = erasekit.erase(model, "receler", concepts, config=RecelerConfig(**base), progress=False)

    folder = tmp_path / "ckpt"
    first = RecelerConfig(**{**base, "iterations": 2}, checkpoint_dir=str(folder), checkpoint_every=1)
    erasekit.erase(model, "receler", concepts, config=first, progress=False)  # "interrupted" after 2
    assert checkpoint_files(folder) == ["receler-000002.json", "receler-000002.safetensors"]  # older pair deleted
    saved = json.loads((folder / "receler-000002.json").read_text())
    state = saved["state"]
    assert state["iteration"] == 2 and len(state["history"]["loss"]) == 2 and state["generator"]
    assert len(state["adversarial_adam"]) == 2
    if adversarial_steps == 0:  # no attack: NaN in the history, stored as JSON null
        assert state["history"]["attack"] == [None, None]
    with pytest.raises(ErasekitError, match="resume=true"):  # a rerun without resume never overwrites the interrupted run
        erasekit.erase(model, "receler", concepts, config=first, progress=False)
    assert checkpoint_files(folder) == ["receler-000002.json", "receler-000002.safetensors"]

    resumed_config = RecelerConfig(**base, checkpoint_dir=str(folder), checkpoint_every=1, resume=True)
    resumed = erasekit.erase(model, "receler", concepts, config=resumed_config, progress=False)
    assert_same_erasure(uninterrupted, resumed)
    assert checkpoint_files(folder) == ["receler-000004.json", "receler-000004.safetensors"]

    other = dataclasses.replace(resumed_config, learning_rate=5e-3)
    with pytest.raises(ErasekitError, match="learning_rate"):
        erasekit.erase(model, "receler", concepts, config=other, progress=False)


def test_checkpoint_holds_the_adversarial_state_and_restores_it_in_place(model, tmp_path):
    config = RecelerConfig(**{**TINY, "iterations": 1}, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    trainer = RecelerTrainer(model, ["triangle"], config)
    try:
        trainer.train(progress=False)
        tensors, state = trainer.training_state()
        assert {"adversarial.0", "adversarial_adam.0.0.exp_avg", "adversarial_adam.0.0.exp_avg_sq", "adam.0.exp_avg"} <= set(tensors)
        expected = {name: value.detach().clone() for name, value in tensors.items()}
    finally:
        trainer.close()
    fresh = RecelerTrainer(model, ["triangle"], dataclasses.replace(config, resume=True))
    try:
        vectors, parameter = fresh.adversarial[0], fresh.parameters[0]
        assert not torch.equal(vectors.detach(), expected["adversarial.0"])
        fresh.load_state(1, expected, json.loads(json.dumps(state)))
        assert fresh.adversarial[0] is vectors and fresh.parameters[0] is parameter  # the same tensors, filled in
        assert fresh.adversarial_optimizers[0].param_groups[0]["params"][0] is vectors
        restored, _ = fresh.training_state()
        assert sorted(restored) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(restored[name].detach(), value), name
        assert fresh.iteration == 1 and fresh.history == trainer.history
    finally:
        fresh.close()


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


KILLED_RUN = """
import json, sys
import torch
import erasekit
from erasekit.methods.receler import RecelerConfig
torch.set_num_threads(1)
model = erasekit.load_model(sys.argv[1])
erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**json.loads(sys.argv[2])), progress=False)
"""


def newest_checkpoint_step(folder) -> int:
    steps = [int(m.group(1)) for p in folder.glob("receler-*.json") if (m := re.fullmatch(r"receler-(\d+)\.json", p.name))]
    return max(steps, default=0)


def test_a_killed_run_resumes_to_the_uninterrupted_erasers(model, toy_folder, tmp_path):
    """kill -9 a training process mid-run; the resumed run ends bit for bit where an uninterrupted one does."""
    folder = tmp_path / "ckpt"
    settings = dict(TINY, seed=3)
    endless = {**settings, "iterations": 100_000, "checkpoint_dir": str(folder), "checkpoint_every": 1}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(toy_folder), json.dumps(endless)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while newest_checkpoint_step(folder) < 2:  # (no folder yet: no step)
            assert process.poll() is None, f"the training process ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint at step 2 within 120 s"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    step = newest_checkpoint_step(folder)
    assert step >= 2
    total = step + 2
    with torch_threads(1):  # compute as the killed process did
        resumed_config = RecelerConfig(**{**settings, "iterations": total}, checkpoint_dir=str(folder), resume=True)
        resumed = erasekit.erase(model, "receler", ["triangle"], config=resumed_config, progress=False)
        uninterrupted = erasekit.erase(model, "receler", ["triangle"], config=RecelerConfig(**{**settings, "iterations": total}),
                                       progress=False)
    assert_same_erasure(uninterrupted, resumed)


def test_timestep_coupling():
    # official: t from the CompVis interval, x_t two DDIM steps less noisy (t_enc 0 and 1: a full sample)
    assert coupled_timesteps(0, 50, 1000, "official") == (50, 0, 20)
    assert coupled_timesteps(1, 50, 1000, "official") == (50, 20, 40)
    assert coupled_timesteps(10, 50, 1000, "official") == (41, 200, 220)
    assert coupled_timesteps(49, 50, 1000, "official") == (2, 980, 1000)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)  # SD 1.x
    scheduler.set_timesteps(50)
    for t_enc in range(2, 50):
        steps, low, _ = coupled_timesteps(t_enc, 50, 1000, "official")
        assert int(scheduler.timesteps[steps]) == 20 * (t_enc - 2) + 1  # the released sampler's stopping point
    # aligned: x_t at scheduler.timesteps[k], t from the interval holding it
    for k in range(50):
        steps, low, high = coupled_timesteps(k, 50, 1000, "aligned")
        assert steps == k and low <= int(scheduler.timesteps[k]) < high
    with pytest.raises(ErasekitError):
        coupled_timesteps(50, 50, 1000, "official")


def test_config_presets_and_errors(model):
    assert build_config("receler", "paper") == RecelerConfig()
    paper = RecelerConfig()
    assert (paper.iterations, paper.learning_rate, paper.eraser_rank, paper.adversarial_steps, paper.adversarial_tokens,
            paper.adversarial_learning_rate, paper.adversarial_weight_decay, paper.regularization_weight,
            paper.mask_threshold, paper.ddim_steps, paper.start_guidance) == (500, 3e-4, 128, 50, 16, 0.1, 0.1, 0.1, 0.1, 50, 3.0)
    toy = build_config("receler", "toy")
    assert all(getattr(toy, key) == value for key, value in receler.PRESETS["toy"].items())
    assert toy.ddim_steps < paper.ddim_steps and toy.iterations < paper.iterations
    with pytest.raises(ErasekitError, match="preserve"):
        receler.erase(model, prompt_targets(["triangle"], preserve=["circle"]), config=RecelerConfig(**TINY))
    with pytest.raises(ErasekitError, match="timestep_coupling"):
        RecelerTrainer(model, ["triangle"], RecelerConfig(**TINY, timestep_coupling="compvis"))


# ------------------------------------------------------------------- apply, stack, remove
def test_save_load_apply_remove_round_trip(model, probe, trained, tmp_path):
    erasure = trained[0]
    reference = output(model, probe)
    before = processors(model)
    erasure.apply(model)
    try:
        erased = output(model, probe)
    finally:
        erasure.remove(model)
    assert not torch.allclose(erased, reference)
    assert processors(model) == before
    assert torch.equal(output(model, probe), reference)  # removing restores the output exactly

    path = erasure.save(tmp_path / "triangle.safetensors")  # a fresh process applies it too: tests/test_modules.py
    loaded = Erasure.load(path)
    assert loaded.module_type == "receler" and loaded.concepts == ["triangle"] and loaded.config["eraser_rank"] == 8
    loaded.apply(model)
    try:
        assert torch.equal(output(model, probe), erased)
    finally:
        loaded.remove(model)
    assert torch.equal(output(model, probe), reference)


def test_inference_scale(model, probe, trained):
    erasure = trained[0]
    reference = output(model, probe)
    results = {}
    for scale in (0.0, 1.0, 2.0):
        erasure.apply(model, scale=scale)
        try:
            results[scale] = output(model, probe)
        finally:
            erasure.remove(model)
    assert torch.equal(results[0.0], reference)
    assert not torch.allclose(results[2.0], results[1.0])
    assert (results[2.0] - reference).abs().mean() > (results[1.0] - reference).abs().mean()


def test_separate_erasers_stack_and_come_off_one_at_a_time(model, probe, trained):
    first, second = trained
    reference = output(model, probe)
    second.apply(model)
    only_second = output(model, probe)
    second.remove(model)
    first.apply(model)
    only_first = output(model, probe)
    second.apply(model)
    try:
        both = output(model, probe)
        assert not torch.allclose(both, only_first) and not torch.allclose(both, only_second)
        first.remove(model)
        assert torch.equal(output(model, probe), only_second)
    finally:
        for erasure in (first, second):
            if any(e is erasure for e, _ in model.applied_erasures):
                erasure.remove(model)
    assert torch.equal(output(model, probe), reference)
    left = {k: (p.kv_hooks, p.probs_hooks, p.output_hooks) for k, p in processors(model).items() if isinstance(p, HookedCrossAttnProcessor)}
    assert not left, left


@pytest.mark.parametrize("folder", ["tiny_sd_folder", "tiny_sdxl_folder"])
def test_trains_and_applies_on_sd_and_sdxl_pipelines(folder, request):
    pipeline = erasekit.load_model(request.getfixturevalue(folder))
    resolutions = cross_attention_resolutions(pipeline)
    seen = {}
    layers = pipeline.cross_attention_layers()
    for path, attn in layers.items():
        hooked_processor(attn).probs_hooks["test-size"] = lambda attn, probs, path=path: seen.__setitem__(path, probs.shape[2])
    x = torch.randn(pipeline.latent_shape(1), generator=torch.Generator().manual_seed(6))
    probe = (x, torch.tensor([500]), pipeline.encode(["a red triangle"]))
    try:
        output(pipeline, probe)
    finally:
        remove_hooks(layers, "test-size")
    assert seen == {path: h * w for path, (h, w) in resolutions.items()}
    reference = output(pipeline, probe)
    erasure = erasekit.erase(pipeline, "receler", ["triangle"], config=RecelerConfig(**{**TINY, "iterations": 1}), progress=False)
    assert {key.rsplit(".", 2)[0] for key in erasure.modules} == set(layers)  # SDXL: one per transformer block
    erasure.apply(pipeline)
    try:
        assert not torch.allclose(output(pipeline, probe), reference)
    finally:
        erasure.remove(pipeline)
    assert torch.equal(output(pipeline, probe), reference)


def test_applying_to_another_architecture_fails_clearly(model, trained, tiny_sd_folder):
    other = erasekit.load_model(tiny_sd_folder)
    with pytest.raises(ErasekitError):
        trained[0].apply(other)
    with pytest.raises(ErasekitError, match="architecture"):
        trained[0].apply(other, force=True)
    assert not other.applied_erasures


# --------------------------------------------------------------------- the trained toy
@pytest.mark.slow
def test_toy_preset_erases_triangle_and_keeps_the_other_shapes():
    from erasekit.toy.evaluate import evaluate_toy, shape_prompts

    try:
        model = erasekit.load_model("toy")
        from erasekit.toy.classifier import load_classifier

        classifier = load_classifier()
    except ErasekitError as error:
        pytest.skip(f"the trained toy model or classifier is not available: {error}")
    # ESD-x's bar on 32 images a shape (8 prompts x 4 samples, paired seeds); on the smaller 8-image set
    # one image is 12.5 points. Measured (seed 0, guidance 2): triangle 100% -> 0%, the other shapes
    # within 6.25 points (square 100% -> 94%; the star 75% -> 97%).
    prompts = shape_prompts(per_shape=8)
    before = evaluate_toy(model, prompts, samples_per_prompt=4, progress=False, classifier=classifier)["by_value"]["shape"]
    started = time.time()
    erasure = erasekit.erase(model, "receler", ["triangle"], preset="toy", progress=False)
    seconds = time.time() - started
    erasure.apply(model)
    try:
        after = evaluate_toy(model, prompts, samples_per_prompt=4, progress=False, classifier=classifier)["by_value"]["shape"]
    finally:
        erasure.remove(model)
    print(f"\nReceler toy: {seconds:.0f}s; shape accuracy before {before}; after {after}")
    assert before["triangle"] >= 0.75, before
    assert after["triangle"] <= 0.10, after
    for shape, accuracy in before.items():
        if shape != "triangle":
            assert after[shape] >= accuracy - 0.10, (shape, accuracy, after[shape])
