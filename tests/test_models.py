"""The model handle and load_model, on tiny SD 1.x, SDXL and toy models built from configs."""

from __future__ import annotations

import pytest
import torch

from erasekit import Conditioning, Erasure, ErasekitError, load_model, save_pipeline
from conftest import assert_same_picture

STEPS = 4  # sampling steps in these tests: the fewest PNDM takes (its order), fast on one core


@pytest.fixture(scope="module")
def sd_model(tiny_sd_folder):
    return load_model(tiny_sd_folder)


@pytest.fixture(scope="module")
def sdxl_model(tiny_sdxl_folder):
    return load_model(tiny_sdxl_folder)


@pytest.fixture(scope="module")
def toy_model(toy_folder):
    return load_model(toy_folder)


def expected_cross_attention_count(config) -> int:
    """attn2 modules a UNet2DConditionModel builds for this config (one per BasicTransformerBlock)."""
    n_blocks = len(config.down_block_types)
    per_block = config.transformer_layers_per_block
    per_block = [per_block] * n_blocks if isinstance(per_block, int) else list(per_block)
    count = 0
    for index, block in enumerate(config.down_block_types):
        if "CrossAttn" in block:
            count += config.layers_per_block * per_block[index]
    for index, block in enumerate(config.up_block_types):
        if "CrossAttn" in block:
            count += (config.layers_per_block + 1) * per_block[::-1][index]
    if config.mid_block_type is not None and "CrossAttn" in config.mid_block_type:
        count += per_block[-1]
    return count


def pipeline_images(model, prompt: str, seed: int, scheduler_name: str | None = None) -> torch.Tensor:
    """What diffusers' own pipeline makes from the latents ``generate`` draws for this seed."""
    pipe = model.pipeline
    original = pipe.scheduler
    pipe.scheduler = model.make_scheduler(scheduler_name)  # a copy: the model's own stays untouched
    try:
        latents = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(seed))
        out = pipe(
            prompt, num_inference_steps=STEPS, guidance_scale=model.default_guidance, latents=latents,
            output_type="pt", height=model.resolution, width=model.resolution,
        )
    finally:
        pipe.scheduler = original
    return out.images


# ------------------------------------------------------------------- loading
@pytest.mark.parametrize("folder_fixture, kind", [("tiny_sd_folder", "sd"), ("tiny_sdxl_folder", "sdxl"), ("toy_folder", "toy")])
def test_load_model_gives_the_right_kind(request, folder_fixture, kind):
    folder = request.getfixturevalue(folder_fixture)
    model = request.getfixturevalue({"sd": "sd_model", "sdxl": "sdxl_model", "toy": "toy_model"}[kind])
    assert model.kind == kind
    assert model.name == str(folder)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert len(model.text_encoders) == len(model.tokenizers) == (2 if kind == "sdxl" else 1)
    assert (model.vae is None) == (kind == "toy")
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ErasekitError, match="no_such_model") as error:
        load_model(missing)
    assert str(missing) in str(error.value)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ErasekitError, match="model_index.json"):
        load_model(tmp_path)


def test_unsupported_architecture_says_what_is_supported(sd3_folder):
    with pytest.raises(ErasekitError) as error:
        load_model(sd3_folder)
    message = str(error.value)
    assert "StableDiffusion3Pipeline" in message
    assert "supported" in message and "StableDiffusionXLPipeline" in message


def test_unknown_dtype_is_refused(tiny_sd_folder):
    with pytest.raises(ErasekitError, match="dtype"):
        load_model(tiny_sd_folder, dtype="float8")


# ------------------------------------------------------------------ encoding
def test_encode_sd_matches_the_pipeline_and_fits_the_unet(sd_model):
    prompts = ["a photo of a red triangle", "a cat"]
    cond = sd_model.encode(prompts)
    assert isinstance(cond, Conditioning) and cond.added is None
    assert cond.hidden_states.shape == (2, sd_model.max_length, sd_model.unet.config.cross_attention_dim)
    expected, _ = sd_model.pipeline.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(cond.hidden_states, expected)
    assert not torch.allclose(cond.hidden_states[0], cond.hidden_states[1])
    assert sd_model.encode("a cat").hidden_states.shape[0] == 1
    x = torch.randn(sd_model.latent_shape(2))
    assert sd_model.predict_noise(x, 500, cond).shape == x.shape


def test_encode_sdxl_gives_text_embeds_and_time_ids(sdxl_model):
    prompts = ["a photo of a red triangle", "a cat"]
    cond = sdxl_model.encode(prompts)
    config = sdxl_model.unet.config
    assert cond.hidden_states.shape == (2, sdxl_model.max_length, config.cross_attention_dim)
    assert set(cond.added) == {"text_embeds", "time_ids"}
    assert cond.added["time_ids"].shape == (2, 6)
    side = sdxl_model.resolution
    assert cond.added["time_ids"][0].tolist() == [side, side, 0, 0, side, side]
    assert cond.added["text_embeds"].shape[1] + 6 * config.addition_time_embed_dim == config.projection_class_embeddings_input_dim
    embeds, _, pooled, _ = sdxl_model.pipeline.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.hidden_states, embeds)
    torch.testing.assert_close(cond.added["text_embeds"], pooled)
    x = torch.randn(sdxl_model.latent_shape(2))
    assert sdxl_model.predict_noise(x, 500, cond).shape == x.shape
    # a single row keeps its added conditioning (guidance concatenates rows)
    assert cond[1].added["text_embeds"].shape == (1, cond.added["text_embeds"].shape[1])


def test_sdxl_empty_prompt_is_zeros_when_the_pipeline_says_so(sdxl_model):
    assert sdxl_model.force_zeros_for_empty_prompt
    cond = sdxl_model.encode(["", "a cat"])
    assert torch.count_nonzero(cond.hidden_states[0]) == 0 and torch.count_nonzero(cond.added["text_embeds"][0]) == 0
    assert torch.count_nonzero(cond.hidden_states[1]) > 0


def test_encode_toy(toy_model):
    cond = toy_model.encode(["a red triangle", "a blue circle"])
    assert cond.hidden_states.shape == (2, toy_model.max_length, toy_model.unet.config.cross_attention_dim)
    x = torch.randn(toy_model.latent_shape(2))
    assert x.shape == (2, 3, 24, 24)
    assert toy_model.predict_noise(x, 10, cond).shape == x.shape


@pytest.mark.parametrize("model_fixture", ["sd_model", "toy_model"])
def test_token_positions_finds_the_word(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    prompt = "a photo of a red triangle"  # <start> a photo of a red triangle <end>
    assert model.token_positions(prompt, "triangle") == [6]
    assert model.token_positions(prompt, "red") == [5]
    assert model.token_positions(prompt, "a") == [4]  # the last occurrence
    ids = model.tokenize([prompt])["input_ids"][0]
    word_ids = model.tokenizer("triangle", add_special_tokens=False)["input_ids"]
    assert ids[6:7].tolist() == word_ids


def test_token_positions_covers_every_sub_word_token(sd_model):
    # "zebra" is not in the tiny vocabulary: it is spelled out as z e b r a</w>
    assert sd_model.token_positions("a zebra in the style", "zebra") == [2, 3, 4, 5, 6]
    assert sd_model.token_positions("a zebra in the style", "style") == [9]


def test_token_positions_skip_the_head_of_a_longer_word(toy_model):
    # MiniLM's WordPiece: "starfish" is star ##fish, so its first piece is not the word "star"
    assert toy_model.tokenizer.convert_ids_to_tokens(toy_model.tokenize(["a starfish"])["input_ids"][0][2:4].tolist()) == ["star", "##fish"]
    assert toy_model.token_positions("a star and a starfish", "star") == [2]
    with pytest.raises(ErasekitError, match="star"):
        toy_model.token_positions("a red starfish", "star")


@pytest.mark.parametrize("model_fixture", ["sd_model", "sdxl_model", "toy_model"])
def test_token_positions_absent_word_raises(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    with pytest.raises(ErasekitError, match="cat"):
        model.token_positions("a photo of a red triangle", "cat")
    with pytest.raises(ErasekitError):
        model.token_positions("a photo of a red triangle", "")


def test_token_positions_cut_off_word_raises(sd_model):
    prompt = " ".join(["red"] * 80) + " cat"
    with pytest.raises(ErasekitError):
        sd_model.token_positions(prompt, "cat")
    with pytest.raises(ErasekitError, match="shorten"):
        sd_model.check_prompt_fits(prompt)
    sd_model.check_prompt_fits("a red cat")


# ----------------------------------------------------------- cross-attention
@pytest.mark.parametrize("model_fixture, count", [("sd_model", 4), ("sdxl_model", 8), ("toy_model", 7)])
def test_cross_attention_layers_are_exactly_the_attn2_modules(request, model_fixture, count):
    model = request.getfixturevalue(model_fixture)
    layers = model.cross_attention_layers()
    assert expected_cross_attention_count(model.unet.config) == count
    assert len(layers) == count
    attn2 = {name for name, _ in model.unet.named_modules() if name.endswith(".attn2")}
    assert set(layers) == attn2
    for name, layer in layers.items():
        assert layer is model.unet.get_submodule(name)
        assert layer.to_k.in_features == layer.to_v.in_features == model.unet.config.cross_attention_dim
    projections = model.key_value_projections()
    assert len(projections) == 2 * count
    assert all(isinstance(p, torch.nn.Linear) for p in projections.values())
    named = dict(model.unet.named_modules())
    assert all(named[name] is p for name, p in projections.items())


# ------------------------------------------------------------------ sampling
def test_sample_in_two_slices_equals_one_run(sd_model):
    cond = sd_model.encode(["a red triangle"])
    uncond = sd_model.encode([""])
    steps, k = 4, 2

    def run(**kwargs):
        return sd_model.sample(cond, uncond=uncond, num_inference_steps=steps, scheduler="DDIMScheduler", **kwargs)

    full = run(generator=torch.Generator().manual_seed(0))
    first = run(generator=torch.Generator().manual_seed(0), stop_step=k)
    rest = run(latents=first, start_step=k)
    assert not torch.allclose(first, full, atol=1e-3)
    assert torch.allclose(rest, full, atol=1e-5)


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler"])
def test_schedulers_by_name_match_the_diffusers_pipeline(sd_model, name):
    scheduler = sd_model.make_scheduler(name)
    assert type(scheduler).__name__ == name
    assert scheduler.config.num_train_timesteps == sd_model.scheduler.config.num_train_timesteps
    assert scheduler is not sd_model.make_scheduler(name)
    images = sd_model.generate(["a red triangle"], [3], num_inference_steps=STEPS, scheduler=name)
    assert images.shape == (1, 3, sd_model.resolution, sd_model.resolution)
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images, pipeline_images(sd_model, "a red triangle", 3, name), atol=1e-4, rtol=1e-4)


def test_unknown_scheduler_name_raises(sd_model):
    with pytest.raises(ErasekitError, match="NoSuchScheduler"):
        sd_model.make_scheduler("NoSuchScheduler")


def test_sdxl_generate_matches_the_diffusers_pipeline(sdxl_model):
    images = sdxl_model.generate(["a red triangle"], [5], num_inference_steps=STEPS)
    torch.testing.assert_close(images, pipeline_images(sdxl_model, "a red triangle", 5), atol=1e-4, rtol=1e-4)


def test_decode_gives_images_in_unit_range(sd_model, toy_model):
    latents = 3 * torch.randn(sd_model.latent_shape(2), generator=torch.Generator().manual_seed(0))
    images = sd_model.decode(latents)
    assert images.shape == (2, 3, sd_model.resolution, sd_model.resolution) == (2, 3, 16, 16)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        raw = sd_model.vae.decode(latents / sd_model.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))
    pixels = 2 * torch.randn(toy_model.latent_shape(2))
    torch.testing.assert_close(toy_model.decode(pixels), (pixels.clamp(-1, 1) + 1) / 2)


def test_generate_same_seed_same_image_whatever_the_batch(sd_model):
    batch = sd_model.generate(["a red triangle", "a cat", "a blue circle"], [1, 2, 3], num_inference_steps=STEPS)
    alone = sd_model.generate(["a cat"], [2], num_inference_steps=STEPS)
    assert_same_picture(batch[1:2], alone)
    other_seed = sd_model.generate(["a cat"], [4], num_inference_steps=STEPS)
    assert not torch.allclose(alone, other_seed, atol=1e-3)
    with pytest.raises(ErasekitError, match="seed"):
        sd_model.generate(["a cat", "a red triangle"], [1])


def test_toy_sample_and_decode(toy_model):
    images = toy_model.generate(["a red triangle", "a blue circle"], [0, 1], num_inference_steps=STEPS)
    assert images.shape == (2, 3, 24, 24)
    assert images.min() >= 0 and images.max() <= 1


# ---------------------------------------------------------------- save_pipeline
def _kv_deltas(model, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{name}.weight": scale * torch.randn(linear.weight.shape, generator=generator)
        for name, linear in model.key_value_projections().items()
    }


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("how", ["apply", "merge"])
def test_save_pipeline_writes_the_erased_weights(tiny_sd_folder, tmp_path, how):
    model = load_model(tiny_sd_folder)
    before = _state(model.unet)
    erasure = Erasure.from_deltas(model, "test", ["cat"], {}, _kv_deltas(model, 0))
    getattr(erasure, how)(model)
    folder = save_pipeline(model, tmp_path / "erased")
    assert folder == tmp_path / "erased"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erased"]  # no temporary folder left
    saved = load_model(folder)
    assert saved.kind == "sd"
    after = saved.unet.state_dict()
    for name, value in model.unet.state_dict().items():
        assert torch.equal(after[name], value), name
        if name in erasure.deltas:
            torch.testing.assert_close(after[name], before[name] + erasure.deltas[name])
    for mine, theirs in [(model.vae, saved.vae), (model.text_encoders[0], saved.text_encoders[0])]:
        reference = mine.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in theirs.state_dict().items())
    # the saved model is a new base: the erasure's own base check now refuses it
    with pytest.raises(ErasekitError):
        erasure.apply(saved)


def test_save_pipeline_refuses_an_existing_folder(sd_model, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    with pytest.raises(ErasekitError, match="already exists"):
        save_pipeline(sd_model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert list(target.iterdir()) == []


def test_save_pipeline_toy_round_trip(toy_model, tmp_path):
    from erasekit.models.toy import write_toy_folder

    # a toy model whose defaults are not write_toy_folder's: the copy must keep them
    write_toy_folder(tmp_path / "toy", toy_model.unet, extra={"max_length": 20, "guidance": 5.0, "steps": 7})
    toy_model = load_model(tmp_path / "toy")
    folder = save_pipeline(toy_model, tmp_path / "toy_copy")
    copy = load_model(folder)
    assert copy.kind == "toy"
    assert (toy_model.max_length, toy_model.default_guidance, toy_model.default_steps) == (20, 5.0, 7)
    assert (copy.max_length, copy.default_guidance, copy.default_steps) == (
        toy_model.max_length, toy_model.default_guidance, toy_model.default_steps,
    )
    reference = toy_model.unet.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in copy.unet.state_dict().items())

