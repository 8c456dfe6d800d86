"""ESD on a toy-shaped UNet with random weights (fast), and one slow test on the trained toy model."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import erasekit
from erasekit import ErasekitError
from erasekit.methods import esd
from erasekit.targets import prompt_targets
from erasekit.methods.esd import (
    ESDConfig, ESDTrainer, ddim_timestep_range, sample_training_timesteps, sample_x_t, select_parameters,
)

# A few iterations on very short DDIM schedules keep every fast test at a few seconds.
TINY = dict(iterations=3, ddim_steps=3, batch_size=1, learning_rate=1e-3)


@pytest.fixture(scope="module")
def model(toy_folder):
    return erasekit.load_model(toy_folder)


def unet_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.unet.named_parameters()}


# ------------------------------------------------------------------ DDIM index -> DDPM t
def test_timestep_range_runs_downwards_with_diffusers_timesteps():
    assert ddim_timestep_range(0, 50, 1000) == (980, 1000)  # k = 0 is pure noise: the top of the schedule
    assert ddim_timestep_range(49, 50, 1000) == (0, 20)  # after 49 steps: nearly clean
    assert ddim_timestep_range(12, 25, 1000) == (480, 520)
    schedulers = [
        DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),  # the toy model's (leading, offset 0)
        DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False),  # SD 1.x (leading, offset 1)
        DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing"),
    ]
    for scheduler in schedulers:
        for steps in (50, 25, 10):
            scheduler.set_timesteps(steps)
            for k, t in enumerate(scheduler.timesteps.tolist()):
                low, high = ddim_timestep_range(k, steps, 1000)
                assert low <= t < high, (scheduler.config.timestep_spacing, steps, k, t, low, high)
    drawn = sample_training_timesteps(3, 50, 1000, 1000, torch.Generator().manual_seed(0))
    assert drawn.min() >= 920 and drawn.max() < 940 and len(set(drawn.tolist())) == 20
    with pytest.raises(ErasekitError):
        ddim_timestep_range(50, 50)


def test_sampled_latent_has_the_noise_level_of_its_training_timesteps(model, monkeypatch):
    """With the ideal denoiser for data at 0, DDIM from noise z gives exactly z·sqrt(1-ᾱ(t_k))/sqrt(1-ᾱ(t_0)).

    Reading the noise level off the sampled latent must land in the interval the training
    timesteps are drawn from; a flipped mapping (k=0 -> t near 0) fails at every k but the middle.
    """
    alphas = DDIMScheduler.from_config(model.scheduler.config).alphas_cumprod.double()
    monkeypatch.setattr(model, "predict_noise", lambda x, t, cond: x / (1 - alphas[int(t)]).sqrt().to(x.dtype))
    steps = 25
    scheduler = model.make_scheduler("DDIMScheduler")
    scheduler.set_timesteps(steps)
    t0 = int(scheduler.timesteps[0])
    cond, uncond = model.encode(["a red triangle"]), model.encode([""])
    z = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(0))
    for k in (0, 3, 8, 16, 20, 24):
        x = sample_x_t(model, cond, uncond, k, z, ddim_steps=steps, guidance=3.0)
        ratio = (x.double().norm() / z.double().norm()) ** 2
        implied_alpha = 1 - ratio * (1 - alphas[t0])
        implied_t = int((alphas - implied_alpha).abs().argmin())
        t = sample_training_timesteps(k, steps, 1000, 64, torch.Generator().manual_seed(k))
        low, high = ddim_timestep_range(k, steps, 1000)
        assert low <= implied_t < high, (k, implied_t, low, high)
        assert (t >= low).all() and (t < high).all()
        if abs(k - steps / 2) > 2:  # the CompVis index order (k -> [T k/N, T (k+1)/N)) would be wrong here
            assert not 1000 * k // steps <= implied_t < 1000 * (k + 1) // steps


# ------------------------------------------------------------------------ parameter sets
def test_parameter_sets_select_the_right_names(model):
    unet = model.unet
    names = [n for n, _ in unet.named_parameters()]
    xattn = select_parameters(unet, "xattn")
    assert xattn == [n for n in names if ".attn2." in n]
    assert {n.split(".attn2.")[1].rsplit(".", 1)[0] for n in xattn} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert select_parameters(unet, "selfattn") == [n for n in names if ".attn1." in n]
    assert select_parameters(unet, "full") == names

    strict = select_parameters(unet, "xattn-strict")
    expected = []
    for name, linear in model.key_value_projections().items():
        expected += [f"{name}.weight"] + ([f"{name}.bias"] if linear.bias is not None else [])
    assert sorted(strict) == sorted(expected)
    assert len(strict) == 2 * len(model.cross_attention_layers()) > 0

    noxattn = set(select_parameters(unet, "noxattn"))
    assert not noxattn & set(xattn)
    assert not any(n.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")) for n in noxattn)
    assert "conv_in.weight" in noxattn and any("time_emb_proj" in n for n in noxattn)  # as CompVis (emb_layers)
    assert any(".attn1." in n for n in noxattn) and any(".resnets." in n for n in noxattn)
    assert noxattn | set(xattn) | {n for n in names if n.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))} == set(names)

    for alias, canonical in esd.PARAMETER_SET_ALIASES.items():
        assert select_parameters(unet, alias) == select_parameters(unet, canonical)
    with pytest.raises(ErasekitError, match="parameter_set"):
        select_parameters(unet, "attn")


def test_esd_u_leaves_out_sdxl_added_embedding():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    )
    noxattn = select_parameters(unet, "noxattn")
    assert any(n.startswith("add_embedding.") for n, _ in unet.named_parameters())
    assert not any(n.startswith(("add_embedding.", "time_embedding.")) for n in noxattn)


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("parameter_set", ["xattn", "noxattn"])
def test_only_selected_parameters_change_and_the_erasure_holds_exactly_them(model, parameter_set):
    before = unet_state(model)
    config = ESDConfig(**TINY, parameter_set=parameter_set)
    erasure = erasekit.erase(model, "esd", ["triangle"], config=config, progress=False)
    selected = select_parameters(model.unet, parameter_set)
    assert sorted(erasure.deltas) == sorted(selected)
    assert all(erasure.deltas[n].abs().max() > 0 for n in selected if n.endswith(".weight"))
    assert erasure.method == "esd" and erasure.concepts == ["triangle"] and erasure.config["parameter_set"] == parameter_set
    after = unet_state(model)  # erase hands the model back unchanged
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(p.requires_grad for p in model.unet.parameters())

    erasure.apply(model)
    try:
        applied = unet_state(model)
        changed = {n for n in before if not torch.equal(before[n], applied[n])}
        assert changed <= set(selected) and changed
    finally:
        erasure.remove(model)
    assert all(torch.equal(before[n], p) for n, p in model.unet.named_parameters())


def test_frozen_prediction_is_the_original_model_after_training(model):
    x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 300])
    cond = model.encode(["a blue circle"]).repeat(2)
    with torch.no_grad():
        original = model.predict_noise(x, t, cond)
    before = unet_state(model)
    trainer = ESDTrainer(model, ["circle"], ESDConfig(**{**TINY, "learning_rate": 1e-2}))
    try:
        # the frozen values are the trained subset only, not a second UNet
        assert set(trainer.frozen_values) == set(select_parameters(model.unet, "xattn"))
        for _ in range(2):
            trainer.step()
        with torch.no_grad():
            trained = model.predict_noise(x, t, cond)
            with trainer.frozen():
                frozen = model.predict_noise(x, t, cond)
            trained_again = model.predict_noise(x, t, cond)
        assert torch.equal(frozen, original)
        assert not torch.allclose(trained, original)
        assert torch.equal(trained, trained_again)  # the trained values are swapped back
    finally:
        trainer.close()
    assert all(torch.equal(before[n], p) for n, p in model.unet.named_parameters())


def test_loss_decreases_on_a_fixed_x_t(model):
    trainer = ESDTrainer(model, ["triangle"], ESDConfig(**{**TINY, "learning_rate": 3e-4, "negative_guidance": 3.0}))
    try:
        x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(2))
        t = torch.tensor([600, 400])
        losses = [trainer.train_step(x, t, 0) for _ in range(6)]
    finally:
        trainer.close()
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_target_is_negative_guidance_from_the_frozen_model(model):
    x = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500])
    with torch.no_grad():
        e_c = model.predict_noise(x, t, model.encode(["hat"]))
        e_0 = model.predict_noise(x, t, model.encode([""]))
        e_f = model.predict_noise(x, t, model.encode(["cowboy"]))
    for erase_from, source in ((None, e_0), ("cowboy", e_f)):
        trainer = ESDTrainer(model, ["hat"], ESDConfig(**TINY, negative_guidance=2.0, erase_from=erase_from))
        try:
            trainer.step()  # train a little so the frozen swap matters
            target = trainer.target(x, t, 0)
        finally:
            trainer.close()
        torch.testing.assert_close(target, source - 2.0 * (e_c - e_0), rtol=1e-4, atol=2e-5)  # batched vs single calls


def test_checkpoint_and_resume_give_the_uninterrupted_weights(model, tmp_path):
    base = dict(TINY, iterations=6, ddim_steps=2, seed=7)
    uninterrupted = erasekit.erase(model, "esd", ["triangle", "circle"], config=ESDConfig(**base), progress=False)

    folder = tmp_path / "ckpt"
    first = ESDConfig(**{**base, "iterations": 4}, checkpoint_dir=str(folder), checkpoint_every=2)
    erasekit.erase(model, "esd", ["triangle", "circle"], config=first, progress=False)  # "interrupted" after 4
    assert sorted(p.name for p in folder.iterdir()) == ["esd-000004.json", "esd-000004.safetensors"]  # older pair deleted
    state = json.loads((folder / "esd-000004.json").read_text())["state"]
    assert state["iteration"] == 4 and len(state["losses"]) == 4 and state["generator"]
    with pytest.raises(ErasekitError, match="resume=true"):  # a rerun without resume never overwrites the interrupted run
        erasekit.erase(model, "esd", ["triangle", "circle"], config=first, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["esd-000004.json", "esd-000004.safetensors"]

    resumed_config = ESDConfig(**base, checkpoint_dir=str(folder), checkpoint_every=2, resume=True)
    resumed = erasekit.erase(model, "esd", ["triangle", "circle"], config=resumed_config, progress=False)
    assert sorted(resumed.deltas) == sorted(uninterrupted.deltas)
    for name, delta in uninterrupted.deltas.items():
        assert torch.equal(resumed.deltas[name], delta), name
    assert resumed.info["loss_curve"] == uninterrupted.info["loss_curve"]

    other = dataclasses.replace(resumed_config, learning_rate=5e-3)
    with pytest.raises(ErasekitError, match="learning_rate"):
        erasekit.erase(model, "esd", ["triangle", "circle"], config=other, progress=False)
    # another teacher: a weight outside the trained cross-attention differs, so the run is not this one's
    conv, kept = model.unet.conv_in.weight, model.unet.conv_in.weight.detach().clone()
    with torch.no_grad():
        conv.add_(1e-3)
    try:
        with pytest.raises(ErasekitError, match="base"):
            erasekit.erase(model, "esd", ["triangle", "circle"], config=resumed_config, progress=False)
    finally:
        with torch.no_grad():
            conv.copy_(kept)


def test_several_concepts_are_all_drawn(model):
    config = ESDConfig(**{**TINY, "iterations": 12, "ddim_steps": 1}, seed=3)  # 1 step: x_t is the noise, no sampling
    erasure = erasekit.erase(model, "esd", ["triangle", "circle", "square"], config=config, progress=False)
    counts = erasure.info["concept_counts"]
    assert set(counts) == {"triangle", "circle", "square"}
    assert sum(counts.values()) == 12 and min(counts.values()) > 0, counts


def test_gradient_checkpointing_gives_the_same_result(model):
    trainer = ESDTrainer(model, ["triangle"], ESDConfig(**TINY, gradient_checkpointing=True))
    try:
        assert model.unet.is_gradient_checkpointing
    finally:
        trainer.close()
    plain = erasekit.erase(model, "esd", ["triangle"], config=ESDConfig(**{**TINY, "iterations": 2}), progress=False)
    config = ESDConfig(**{**TINY, "iterations": 2}, gradient_checkpointing=True)
    checkpointed = erasekit.erase(model, "esd", ["triangle"], config=config, progress=False)
    assert not model.unet.is_gradient_checkpointing
    for name, delta in plain.deltas.items():
        torch.testing.assert_close(checkpointed.deltas[name], delta, rtol=1e-4, atol=1e-7)


def test_clear_errors(model):
    with pytest.raises(ErasekitError, match="no preserve term"):
        esd.erase(model, prompt_targets(["triangle"], preserve=["circle"]), config=ESDConfig(**TINY), progress=False)
    for bad in ({"sample_with": "teacher"}, {"mixed_precision": "int8"}, {"resume": True}, {"parameter_set": "xyz"},
                {"parameter_set": "esd-u"}, {"target_base": "empty"}, {"timestep_coupling": "official"}):
        with pytest.raises(ErasekitError):
            esd.erase(model, prompt_targets(["triangle"]), config=ESDConfig(**{**TINY, **bad}), progress=False)
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_presets_build():
    from erasekit.methods import build_config

    assert build_config("esd", "paper") == ESDConfig()
    fast = build_config("esd", "fast", {"parameter_set": "noxattn"})
    assert (fast.iterations, fast.learning_rate, fast.negative_guidance, fast.sample_with, fast.mixed_precision) == (
        200, 5e-5, 2.0, "frozen", "bf16")
    assert fast.parameter_set == "noxattn"
    assert (fast.target_base, fast.timestep_coupling) == ("concept", "aligned")  # the rewrite's base and t = timesteps[k]
    assert build_config("esd", "toy").ddim_steps == 10
    for name in ("paper", "toy"):
        assert (build_config("esd", name).target_base, build_config("esd", name).timestep_coupling) == ("unconditional", "aligned")
    assert build_config("esd", "compvis") == dataclasses.replace(ESDConfig(), timestep_coupling="compvis")
    with pytest.raises(ErasekitError, match="esd-u-compvis.*esd-u-diffusers"):  # the CLI path refuses the ambiguous alias
        build_config("esd", None, {"parameter_set": "esd-u"})


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
    # 32 images a shape, paired seeds: the triangle <= 10%, the five others together (160 images) within 8 points
    # (13 images); the sweep (docs/toy-sweep.md, seed 1, 64/160 images) measured 92% -> 3% and 96% -> 92%.
    prompts = shape_prompts(per_shape=8)
    before = evaluate_toy(model, prompts, samples_per_prompt=4, progress=False, classifier=classifier)["by_value"]["shape"]
    started = time.time()
    erasure = erasekit.erase(model, "esd", ["triangle"], preset="toy", progress=False)
    seconds = time.time() - started
    erasure.apply(model)
    after = evaluate_toy(model, prompts, samples_per_prompt=4, progress=False, classifier=classifier)["by_value"]["shape"]
    erasure.remove(model)
    print(f"\nESD toy: {seconds:.0f}s; shape accuracy before {before}; after {after}")
    assert after["triangle"] <= 0.10
    others = [shape for shape in before if shape != "triangle"]
    assert sum(before[s] - after[s] for s in others) / len(others) <= 0.08, (before, after)
