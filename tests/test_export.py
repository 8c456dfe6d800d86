"""Export (diffusers folder, LoRA, single-file checkpoint), single-file import, and ``erasekit.apply`` on plain
diffusers pipelines, on tiny models built from configs.

The erasures here are synthetic (random deltas of a chosen rank, random Receler erasers and CPE gates)
except where a method's own rank is the point (UCE).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import erasekit
from erasekit import Erasure, ErasekitError, load_model
from erasekit.erasure import model_signature
from erasekit.export import check_export, export, lora_factors
from erasekit.models.single_file import (
    BUNDLED_CONFIGS, MODEL_TYPES, detect_model_type, single_file_state_dict,
)
from erasekit.modules.cpe import ResAG
from erasekit.modules.receler import Eraser, eraser_state
from conftest import (
    SD_UNET_CONFIG, SDXL_TIME_EMBED, SDXL_UNET_CONFIG, TEXT_HIDDEN, assert_same_picture, cli_error, make_text_encoder,
    make_tokenizer, make_vae,
)

STEPS = 4


# ------------------------------------------------------------------- tiny models and erasures
def _save_sd(folder, vocab_folder, linear_projection: bool):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(SD_UNET_CONFIG, use_linear_projection=linear_projection))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tokenizer = make_tokenizer(vocab_folder, pad_token="!" if linear_projection else "<|endoftext|>")
    StableDiffusionPipeline(
        vae=make_vae(1), text_encoder=make_text_encoder(tokenizer, 2), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


WIDTH_2 = 48  # SDXL's second text encoder: wider than the first, as in SDXL (diffusers tells the two apart by width)


def _save_sdxl(folder, vocab_folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = make_tokenizer(vocab_folder), make_tokenizer(vocab_folder, pad_token="!")
    config = CLIPTextConfig(vocab_size=len(tokenizer_2), hidden_size=WIDTH_2, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=24, hidden_act="gelu",
                            bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
                            pad_token_id=tokenizer_2.pad_token_id)
    torch.manual_seed(3)
    encoder_2 = CLIPTextModelWithProjection(config).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(SDXL_UNET_CONFIG, cross_attention_dim=TEXT_HIDDEN + WIDTH_2,
                                       projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + 24))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    StableDiffusionXLPipeline(
        vae=make_vae(1), text_encoder=make_text_encoder(tokenizer, 2), text_encoder_2=encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_sd_folder, clip_vocab_folder):
    """One tiny diffusers folder per single-file layout: sd1 (conv projections), sd2 (linear projections, OpenCLIP
    layout) and sdxl (two text encoders of different widths)."""
    root = tmp_path_factory.mktemp("export_models")
    return {
        "sd1": tiny_sd_folder,
        "sd2": _save_sd(root / "sd2", clip_vocab_folder, linear_projection=True),
        "sdxl": _save_sdxl(root / "sdxl", clip_vocab_folder),
    }


def low_rank_erasure(model, rank: int, seed: int = 0, scale: float = 0.3) -> Erasure:
    """UCE-shaped: a delta of exactly ``rank`` on every cross-attention to_k / to_v weight."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.unet.named_parameters())
    deltas = {}
    for name in [f"{n}.weight" for n in model.key_value_projections()]:
        out, inp = parameters[name].shape
        deltas[name] = scale * torch.randn(out, rank, generator=generator) @ torch.randn(rank, inp, generator=generator) / rank
    return Erasure.from_deltas(model, "uce", ["cat"], {}, deltas)


def esd_x_erasure(model, seed: int = 0) -> Erasure:
    """ESD-x-shaped: full-rank deltas on every attn2 weight and bias (to_out.0 has a bias)."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {name: 0.05 * torch.randn(p.shape, generator=generator) for name, p in model.unet.named_parameters()
              if ".attn2." in name}
    assert any(name.endswith(".bias") for name in deltas)
    return Erasure.from_deltas(model, "esd", ["cat"], {}, deltas)


def receler_erasure(model, seed: int = 0) -> Erasure:
    generator = torch.Generator().manual_seed(seed)
    erasers = {}
    for path, attn in model.cross_attention_layers().items():
        eraser = Eraser(attn.to_out[0].out_features, 4, generator)
        with torch.no_grad():
            eraser.up.weight.copy_(4 * torch.randn(eraser.up.weight.shape, generator=generator))
        erasers[path] = eraser
    return Erasure(method="receler", concepts=["cat"], base_model=model.name, config={}, modules=eraser_state(erasers),
                   module_type="receler", base_signature=model_signature(model, [f"{p}.to_out.0.weight" for p in erasers]))


def cpe_erasure(model, seed: int = 0) -> Erasure:
    generator = torch.Generator().manual_seed(seed)
    projections = model.key_value_projections()
    names = list(projections)
    resag = ResAG(projections[names[0]].in_features, [projections[n].out_features for n in names], rank=2, gate_rank=4,
                  generator=generator)
    with torch.no_grad():
        resag.query.copy_(torch.randn(resag.query.shape, generator=generator))
        resag.scaler.copy_(torch.randn(resag.scaler.shape, generator=generator))
        for up in resag.up:
            up.copy_(8 * torch.randn(up.shape, generator=generator))
    return Erasure(method="cpe", concepts=["cat"], base_model=model.name, config={}, module_type="cpe",
                   modules={k: v[None] for k, v in resag.state(names).items()},
                   base_signature=model_signature(model, [f"{n}.weight" for n in names]))


def unet_output(unet, model, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction for two prompts at one noisy latent (the handle's conditioning)."""
    x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(seed))
    cond = model.encode(["a red cat", "a photo of a blue circle"])
    extra = {"added_cond_kwargs": cond.added} if cond.added else {}
    with torch.no_grad():
        return unet(x, torch.tensor(500), encoder_hidden_states=cond.hidden_states, **extra).sample


def pipeline_images(pipe, model, prompt: str, seed: int) -> torch.Tensor:
    """A plain diffusers pipeline's picture from the latents ``model.generate`` draws for this seed."""
    latents = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(seed))
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=model.default_guidance, latents=latents, output_type="pt",
                height=model.resolution, width=model.resolution).images


def stock_pipeline(folder, kind: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    return StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)


# ------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_lora_loads_in_a_stock_pipeline_and_matches_the_merged_model(folders, tmp_path, layout):
    pytest.importorskip("peft")
    model = load_model(folders[layout])
    erasure = low_rank_erasure(model, rank=3)
    result = export(model, [erasure], tmp_path / "cat-lora", format="lora")
    assert result.path == tmp_path / "cat-lora.safetensors" and result.rank == 3 and result.max_error < 1e-6
    assert any(line.startswith("exact: rank 3") for line in result.lines)
    keys = set(load_file(result.path))
    modules = {f"unet.{name[: -len('.weight')]}" for name in erasure.deltas}
    assert keys == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    assert not model.applied_erasures  # export leaves the model as it was

    pipe = stock_pipeline(folders[layout], model.kind)
    pipe.load_lora_weights(str(result.path))
    erasure.apply(model)
    merged = unet_output(model.unet, model)
    erasure.remove(model)
    base = unet_output(model.unet, model)
    with_lora = unet_output(pipe.unet, model)
    change = (merged - base).abs().max()
    assert change > 0.05
    assert (with_lora - merged).abs().max() < 1e-3 * change


def test_lora_picture_equals_the_exported_diffusers_folder(folders, tmp_path):
    pytest.importorskip("peft")
    model = load_model(folders["sd1"])
    erasure = low_rank_erasure(model, rank=2, scale=1.0)
    lora = export(model, [erasure], tmp_path / "cat.safetensors", format="lora").path
    folder = export(model, [erasure], tmp_path / "erased", format="diffusers").path
    with_lora = stock_pipeline(folders["sd1"], "sd")
    with_lora.load_lora_weights(str(lora))
    merged = stock_pipeline(folder, "sd")
    picture = pipeline_images(merged, model, "a red cat", 7)
    assert_same_picture(pipeline_images(with_lora, model, "a red cat", 7), picture)
    assert (picture - pipeline_images(stock_pipeline(folders["sd1"], "sd"), model, "a red cat", 7)).abs().max() > 0.05


def test_uce_delta_rank_is_its_erased_rows_and_exports_exactly(tiny_sd_folder, tmp_path):
    model = load_model(tiny_sd_folder)
    erasure = erasekit.erase(model, "uce", ["cat"], kind="object", overrides={"token_mode": "last_token"}, progress=False)
    rows = erasure.info["erase_rows"]
    assert 1 <= rows < 8  # well below the tiny model's width (32): the delta is low rank
    assert {lora_factors(d)[2] for d in erasure.deltas.values()} == {rows}
    result = export(model, [erasure], tmp_path / "uce.safetensors", format="lora")
    assert result.rank == rows and result.max_error < 1e-6


def test_lora_rank_truncates_to_the_best_approximation_and_reports_its_error(tiny_sd_folder, tmp_path):
    model = load_model(tiny_sd_folder)
    erasure = low_rank_erasure(model, rank=3)
    result = export(model, [erasure], tmp_path / "r1.safetensors", format="lora", rank=1)
    assert result.rank == 1 and any(line.startswith("truncated: rank 1") for line in result.lines)
    tensors = load_file(result.path)
    worst = 0.0
    for name, delta in erasure.deltas.items():
        module = f"unet.{name[: -len('.weight')]}"
        written = tensors[f"{module}.lora_B.weight"].double() @ tensors[f"{module}.lora_A.weight"].double()
        U, S, Vh = torch.linalg.svd(delta.double())
        best = S[0] * torch.outer(U[:, 0], Vh[0])  # Eckart-Young: the best rank-1 approximation
        torch.testing.assert_close(written, best, atol=1e-6, rtol=1e-5)
        worst = max(worst, float(S[1:].norm() / S.norm()))
    assert worst > 0.1
    assert result.max_error == pytest.approx(worst, rel=1e-6)
    assert f"{worst:.2e}" in result.lines[1]


def test_lora_refuses_bias_deltas_unless_approximate(tiny_sd_folder, tmp_path, capsys):
    model = load_model(tiny_sd_folder)
    erasure = esd_x_erasure(model)
    path = erasure.save(tmp_path / "esd.safetensors")
    out = tmp_path / "esd-lora.safetensors"
    capsys.readouterr()  # the model's loading bars
    err = cli_error(capsys, ["export", "--model", str(tiny_sd_folder), "--erasure", str(path), "--format", "lora",
                             "--out", str(out)])
    assert "bias" in err and "--approximate" in err and not out.exists()

    result = export(model, [erasure], out, format="lora", approximate=True)
    assert any(line.startswith("approximate: left out") for line in result.lines)
    weights_only = {n: d for n, d in erasure.deltas.items() if n.endswith(".weight")}
    tensors = load_file(out)
    for name, delta in weights_only.items():
        module = f"unet.{name[: -len('.weight')]}"
        written = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
        torch.testing.assert_close(written, delta, atol=1e-5, rtol=1e-4)
    assert not any("bias" in k for k in tensors)


@pytest.mark.parametrize("fmt", ["lora", "single-file"])
def test_module_erasures_are_refused_where_they_cannot_go(tiny_sd_folder, tmp_path, capsys, fmt):
    model = load_model(tiny_sd_folder)
    path = receler_erasure(model).save(tmp_path / "receler.safetensors")
    capsys.readouterr()
    err = cli_error(capsys, ["export", "--model", str(tiny_sd_folder), "--erasure", str(path), "--format", fmt,
                             "--out", str(tmp_path / "out.safetensors")])
    assert "modules" in err and "--format diffusers" in err and "erasekit.apply" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["receler.safetensors"]


# ----------------------------------------------------------------------- single file
@pytest.mark.parametrize("layout", ["sd1", "sd2", "sdxl"])
def test_single_file_round_trip_through_diffusers(folders, tmp_path, layout):
    """Export with an erasure merged, then load with diffusers' from_single_file (local config) and with erasekit."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model = load_model(folders[layout])
    erasure = low_rank_erasure(model, rank=2)
    result = export(model, [erasure], tmp_path / "erased.safetensors", format="single-file")
    with safe_open(str(result.path), framework="pt") as f:
        keys = set(f.keys())
    expected = {
        "sd1": ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
        "sd2": ["model.diffusion_model.input_blocks.1.1.proj_in.weight",
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"],
        "sdxl": ["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
    }[layout] + ["first_stage_model.encoder.down.0.block.0.conv1.weight", "first_stage_model.decoder.mid.attn_1.q.weight"]
    assert set(expected) <= keys
    assert detect_model_type(result.path, keys, 4) == layout

    erasure.apply(model)
    reference = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict()}
    reference.update({f"text_encoder{'_2' if i else ''}": e.state_dict() for i, e in enumerate(model.text_encoders)})
    cls = StableDiffusionXLPipeline if layout == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(result.path), config=str(folders[layout]), local_files_only=True)
    loaded = load_model(result.path, config=folders[layout])
    assert loaded.kind == model.kind
    for name, state in reference.items():
        for other in (getattr(pipe, name).state_dict(), getattr(loaded.pipeline, name).state_dict()):
            assert set(other) == set(state), name
            assert all(torch.equal(other[k], v) for k, v in state.items()), name
    assert_same_picture(loaded.generate(["a red cat"], [1], num_inference_steps=STEPS),
                        model.generate(["a red cat"], [1], num_inference_steps=STEPS))


def test_single_file_uses_cached_tokenizer_files_when_the_config_has_none(folders, clip_vocab_folder, tmp_path, monkeypatch):
    """The bundled configs hold no tokenizer: erasekit takes CLIP's BPE files from the local Hugging Face cache."""
    import shutil

    import huggingface_hub.constants

    model = load_model(folders["sdxl"])
    checkpoint = export(model, [], tmp_path / "sdxl.safetensors", format="single-file").path
    config = tmp_path / "config"
    shutil.copytree(folders["sdxl"], config, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    index = json.loads((config / "model_index.json").read_text())
    index.update(tokenizer=[None, None], tokenizer_2=[None, None])
    (config / "model_index.json").write_text(json.dumps(index))

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ErasekitError, match="hf download openai/clip-vit-large-patch14"):
        load_model(checkpoint, config=config)
    repo = cache / "models--openai--clip-vit-large-patch14"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(clip_vocab_folder, repo / "snapshots" / ("0" * 40))
    loaded = load_model(checkpoint, config=config)
    assert loaded.tokenizers[1].pad_token == "!" and loaded.tokenizers[0].pad_token == "<|endoftext|>"
    assert_same_picture(loaded.generate(["a red cat"], [2], num_inference_steps=STEPS),
                        model.generate(["a red cat"], [2], num_inference_steps=STEPS))


def test_bundled_configs_are_the_published_architectures_and_their_layout_converts_back():
    """Each bundled config builds (without weights) the parameter counts of the released models, and its
    single-file keys convert back through diffusers' own converters and are detected as its type."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    published = {  # UNet, VAE, text encoder(s): the released SD 1.5, SD 2.1 and SDXL base models
        "sd1": [859_520_964, 83_653_863, 123_060_480],
        "sd2": [865_910_724, 83_653_863, 340_387_840],
        "sd2-base": [865_910_724, 83_653_863, 340_387_840],
        "sdxl": [2_567_463_684, 83_653_863, 123_060_480, 694_659_840],
    }
    assert set(published) == set(MODEL_TYPES)
    for model_type, counts in published.items():
        folder = BUNDLED_CONFIGS / model_type
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
            if model_type == "sdxl":
                encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
        got = [sum(p.numel() for p in m.parameters()) for m in [unet, vae, *encoders]]
        assert got == counts, model_type
        layout = {"sd2-base": "sd2"}.get(model_type, model_type)
        state = single_file_state_dict(unet, vae, encoders, layout)  # checks against diffusers' converters
        assert detect_model_type(folder, set(state), state["model.diffusion_model.input_blocks.0.0.weight"].shape[1]) == layout


def test_pickled_checkpoints_are_refused_unread(tmp_path, capsys):
    for name in ("model.ckpt", "model.pt"):
        path = tmp_path / name
        path.write_bytes(b"not a pickle: reading it would fail differently")
        err = cli_error(capsys, ["export", "--model", str(path), "--format", "diffusers", "--out", str(tmp_path / "out")])
        assert "pickled" in err and "weights_only=True" in err and ".safetensors" in err
    assert not (tmp_path / "out").exists()


def test_single_file_type_checks(folders, tmp_path, capsys):
    model = load_model(folders["sd1"])
    checkpoint = export(model, [], tmp_path / "sd1.safetensors", format="single-file").path
    capsys.readouterr()
    err = cli_error(capsys, ["export", "--model", str(checkpoint), "--model-type", "sdxl", "--model-config",
                             str(folders["sd1"]), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert "--model-type sd1" in err
    err = cli_error(capsys, ["export", "--model", str(checkpoint), "--model-config", str(folders["sdxl"]),
                             "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert "StableDiffusionXLPipeline" in err and "same model type" in err
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    err = cli_error(capsys, ["export", "--model", str(tmp_path / "vae.safetensors"), "--format", "diffusers",
                             "--out", str(tmp_path / "out")])
    assert "no Stable Diffusion UNet" in err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------- modules on plain pipelines
@pytest.mark.parametrize("make", [receler_erasure, cpe_erasure], ids=["receler", "cpe"])
def test_apply_on_a_plain_pipeline_gives_the_handles_picture_and_comes_off(tiny_sd_folder, tmp_path, make):
    model = load_model(tiny_sd_folder)
    path = make(model).save(tmp_path / "erasure.safetensors")
    pipe = stock_pipeline(tiny_sd_folder, "sd")
    base = pipeline_images(pipe, model, "a red cat", 3)

    erasure = erasekit.apply(pipe, path)
    plain = pipeline_images(pipe, model, "a red cat", 3)
    Erasure.load(path).apply(model)
    assert_same_picture(plain, model.generate(["a red cat"], [3], num_inference_steps=STEPS))
    assert (plain - base).abs().max() > 0.05

    erasekit.remove(pipe, erasure)
    assert torch.equal(pipeline_images(pipe, model, "a red cat", 3), base)


def test_export_diffusers_merges_deltas_and_ships_modules_beside(tiny_sd_folder, tmp_path, capsys):
    model = load_model(tiny_sd_folder)
    uce, receler = low_rank_erasure(model, rank=2, scale=1.0), receler_erasure(model)
    paths = [uce.save(tmp_path / "uce.safetensors"), receler.save(tmp_path / "receler.safetensors")]
    out = tmp_path / "erased"
    from erasekit.cli import main

    argv = ["export", "--model", str(tiny_sd_folder), "--format", "diffusers", "--out", str(out)]
    for path in paths:
        argv += ["--erasure", str(path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    shipped = out / "erasures" / "01-receler.safetensors"
    assert shipped.is_file() and f"erasekit.apply(pipe, {str(shipped)!r})" in printed
    assert not list(out.rglob("*.bin"))

    pipe = stock_pipeline(out, "sd")
    erasekit.apply(pipe, shipped)  # its base is now the exported weights: the check passes
    for erasure in (uce, receler):
        erasure.apply(model)
    assert_same_picture(pipeline_images(pipe, model, "a red cat", 4), model.generate(["a red cat"], [4], num_inference_steps=STEPS))


def test_toy_model_exports_as_its_own_folder_and_has_no_single_file(toy_folder, tmp_path):
    model = load_model(toy_folder)
    erasure = low_rank_erasure(model, rank=1)
    folder = export(model, erasure, tmp_path / "toy-erased").path
    erasure.apply(model)
    state = load_model(folder).unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.unet.state_dict().items())
    erasure.remove(model)
    with pytest.raises(ErasekitError, match="no single-file layout"):
        export(model, [erasure], tmp_path / "toy.safetensors", format="single-file")
    assert not (tmp_path / "toy.safetensors").exists()


# ------------------------------------------------------------------------------ CLI
def test_cli_export_checks_its_input_before_any_work(tiny_sd_folder, tmp_path, capsys):
    model = load_model(tiny_sd_folder)
    path = low_rank_erasure(model, rank=2).save(tmp_path / "uce.safetensors")
    base = ["export", "--model", str(tiny_sd_folder), "--erasure", str(path)]
    capsys.readouterr()
    assert "--rank is for --format lora" in cli_error(capsys, base + ["--format", "diffusers", "--rank", "2", "--out", str(tmp_path / "a")])
    assert "--approximate is for" in cli_error(capsys, base + ["--format", "single-file", "--approximate", "--out", str(tmp_path / "a")])
    assert "does not exist" in cli_error(capsys, ["export", "--erasure", str(tmp_path / "none.safetensors"), "--format", "lora",
                                                  "--out", str(tmp_path / "a")])
    from erasekit.cli import main

    with pytest.raises(SystemExit) as exit:  # argparse's own check
        main(base + ["--format", "ckpt", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1 and "invalid choice" in err
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    assert "--overwrite" in cli_error(capsys, base + ["--format", "lora", "--out", str(tmp_path / "taken.safetensors")])
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep"
    assert "a LoRA holds weight deltas" in cli_error(capsys, ["export", "--model", str(tiny_sd_folder), "--format", "lora",
                                                              "--out", str(tmp_path / "a")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors", "uce.safetensors"]

    assert main(base + ["--format", "lora", "--rank", "1", "--out", str(tmp_path / "taken.safetensors"), "--overwrite"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'taken.safetensors'}: a LoRA of rank 1") and lines[1].startswith("truncated")


def test_check_export_names_the_written_path(tmp_path):
    assert check_export([], "single-file", tmp_path / "model") == tmp_path / "model.safetensors"
    assert check_export([], "diffusers", tmp_path / "model") == tmp_path / "model"
    with pytest.raises(ErasekitError, match="unknown export format"):
        check_export([], "ckpt", tmp_path / "model")


def test_loading_raises_no_deprecation_warning(tiny_sd_folder, folders, tmp_path):
    checkpoint = export(load_model(folders["sd1"]), [], tmp_path / "sd1.safetensors", format="single-file").path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(tiny_sd_folder)
        load_model(checkpoint, config=folders["sd1"])
    assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]
