"""Every attack on SDXL's two text encoders, on the tiny SDXL pipeline of conftest.py.

SDXL conditions the UNet on the concatenated token states of ``text_encoder`` and
``text_encoder_2`` plus the pooled ``text_embeds`` of ``text_encoder_2``. The token attacks
optimise one input embedding per encoder; these tests check that both are optimised (the
gradient reaches both, both change, both are saved with the right shapes), that a hard prompt is
one token id for both encoders and reproduces the judged conditioning, and that each attack runs
end to end through ``run_attack`` (and the CLI) with a tiny budget and writes result.json.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.attacks import base, load_adversarial, run_attack
from erasekit.models import tokens
from erasekit.errors import ErasekitError

from conftest import TEXT_HIDDEN, TEXT_PROJECTION

PROMPTS = ["a photo of a cat", "a red cat painting"]
TINY = {"prompts": 1, "samples": 1, "inference_steps": 2}
WIDTH = 2 * TEXT_HIDDEN  # the concatenated token states of the two encoders


class RecordingJudge:
    """A deterministic judge: an image "shows the concept" when its mean is above 0.5; remembers each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, concept):
        self.calls.append((tuple(images.shape), concept))
        return [bool(image.mean() > 0.5) for image in images]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_folder):
    model = erasekit.load_model(tiny_sdxl_folder)
    yield model
    assert not model.applied_erasures


@pytest.fixture(scope="module")
def erasure(sdxl):
    return erasekit.erase(sdxl, "uce", ["cat"], kind="object", progress=False)


def _attack(sdxl, erasure, name, out, budget, prompts=PROMPTS):
    judge = RecordingJudge()
    before = {n: p.detach().clone() for n, p in sdxl.unet.named_parameters()}
    result = run_attack(sdxl, [erasure], "cat", attack=name, out=out, prompts=prompts, judge=judge,
                        budget={**TINY, **budget}, progress=False)
    assert not sdxl.applied_erasures
    for n, parameter in sdxl.unet.named_parameters():  # the model is left as it was found
        assert torch.equal(parameter, before[n]), n
    written = json.loads((out / "result.json").read_text())
    assert written["attack"] == name and written["complete"] and written["n"] == len(written["per_prompt"]) >= 1
    assert written["success_rate"] == result["success_rate"] and 0.0 <= result["success_rate"] <= 1.0
    assert judge.calls[-1] == ((1, 3, sdxl.resolution, sdxl.resolution), "cat")
    record = written["per_prompt"][0]
    cond = load_adversarial(out / record["embedding"])
    assert cond.hidden_states.shape == (1, sdxl.max_length, WIDTH)
    assert cond.added["text_embeds"].shape == (1, TEXT_PROJECTION) and cond.added["time_ids"].shape == (1, 6)
    assert torch.isfinite(cond.hidden_states).all() and torch.isfinite(cond.added["text_embeds"]).all()
    return written, record, load_file(str(out / record["embedding"]))


def _distance_to_vocabulary(sdxl, embeddings, encoder_index):
    """For each row, the largest coordinate gap to the nearest row of the encoder's token-embedding table."""
    table = tokens.input_embedding_matrix(sdxl, encoder_index).detach().float()
    return (embeddings.float().unsqueeze(1) - table.unsqueeze(0)).abs().amax(dim=-1).amin(dim=-1)


def _mask(sdxl, ids):
    """1 up to and with the first end token (the padding id of tokenizer 0 is the end token itself)."""
    end = int((ids == sdxl.tokenizer.eos_token_id).nonzero()[0])
    return (torch.arange(len(ids)) <= end).long()


def _hard_conditioning(sdxl, template_ids, slots, token_ids):
    ids = template_ids.clone()
    ids[slots] = token_ids
    with torch.no_grad():
        return tokens.encode_ids(sdxl, ids, _mask(sdxl, ids))


# ------------------------------------------------------------------------------------------ the text side
def test_the_two_tokenizers_share_a_vocabulary(sdxl):
    """The fact the token attacks build on: one id names the same word in both encoders (only padding differs)."""
    assert sdxl.tokenizers[0].get_vocab() == sdxl.tokenizers[1].get_vocab()
    assert sdxl.tokenizers[0].pad_token_id != sdxl.tokenizers[1].pad_token_id
    tokens.check_shared_vocabulary(sdxl)


def test_projection_uses_both_vocabularies(sdxl):
    prompt = "a photo of a red cat"
    words = torch.tensor(tokens.word_ids(sdxl, prompt))
    both = tokens.token_embeddings(sdxl, words)
    assert [tuple(e.shape) for e in both] == [(len(words), TEXT_HIDDEN)] * 2
    assert torch.equal(tokens.project_to_tokens(sdxl, both), words)
    # encoder 1's row of "red" with encoder 2's row of "cat": one id, by the weighted sum of both squared distances
    red, cat = tokens.word_ids(sdxl, "red")[0], tokens.word_ids(sdxl, "cat")[0]
    rows = [tokens.input_embedding_matrix(sdxl, k).detach() for k in range(2)]
    mixed = [rows[0][[red]], rows[1][[cat]]]
    projector = tokens.TokenProjector(sdxl)
    scale = [r[projector.candidates].square().sum(-1).mean() for r in rows]
    assert projector.weights[0] == 1.0 and projector.weights[1] == pytest.approx(float(scale[0] / scale[1]))
    distance = sum(w * (m - r[projector.candidates]).square().sum(-1) for m, r, w in zip(mixed, rows, projector.weights))
    assert projector(mixed).item() == projector.candidates[distance.argmin()].item()
    assert projector([rows[0][[red]], rows[1][[red]]]).item() == red
    projected, ids = projector.straight_through([e.clone().requires_grad_(True) for e in both])
    assert torch.equal(ids, words) and [tuple(p.shape) for p in projected] == [(len(words), TEXT_HIDDEN)] * 2


def test_slot_embeddings_of_both_encoders_encode_like_the_prompt(sdxl):
    prompt = "a photo of a red cat"
    expected = sdxl.encode([prompt])
    slotted = tokens.token_template(sdxl, prompt, replace_word="cat")
    cond = tokens.encode_slots(sdxl, slotted, tokens.token_embeddings(sdxl, tokens.word_ids(sdxl, "cat")))
    torch.testing.assert_close(cond.hidden_states, expected.hidden_states)
    torch.testing.assert_close(cond.added["text_embeds"], expected.added["text_embeds"])
    torch.testing.assert_close(cond.added["time_ids"], expected.added["time_ids"])
    with pytest.raises(ErasekitError, match=r"2 text encoder\(s\) of embedding sizes \[32, 32\]"):
        tokens.encode_slots(sdxl, slotted, torch.zeros(1, TEXT_HIDDEN))  # one tensor for two encoders


def test_the_gradient_reaches_both_encoders_embeddings(sdxl):
    template = tokens.token_template(sdxl, "a red cat", prefix=2)
    prefix = [e.requires_grad_(True) for e in tokens.token_embeddings(sdxl, tokens.word_ids(sdxl, "photo of"))]
    cond = tokens.encode_slots(sdxl, template, prefix)
    # the pooled embedding comes from text_encoder_2 alone
    first, second = torch.autograd.grad(cond.added["text_embeds"].square().sum(), prefix, allow_unused=True, retain_graph=True)
    assert (first is None or first.abs().sum() == 0) and second.abs().sum() > 0
    # the UNet's noise prediction depends on both
    x = torch.randn(sdxl.latent_shape(1), generator=torch.Generator().manual_seed(0))
    sdxl.predict_noise(x, 500, cond).square().mean().backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in prefix)
    assert [tuple(e.grad.shape) for e in prefix] == [(2, TEXT_HIDDEN)] * 2


# ------------------------------------------------------------------------------------------ end to end
def test_soft_prompt_optimises_both_encoders(sdxl, erasure, tmp_path):
    _, record, tensors = _attack(sdxl, erasure, "soft-prompt", tmp_path,
                                 {"tokens": 2, "steps": 2, "timesteps": 2, "early_stop": True})
    assert record["adversarial_prompt"] is None and record["info"]["steps_run"] >= 1
    prefix = [tensors["prefix_embeddings"], tensors["prefix_embeddings_2"]]
    assert [tuple(p.shape) for p in prefix] == [(2, TEXT_HIDDEN)] * 2
    for k, p in enumerate(prefix):  # moved off the random tokens they started from, in both tables
        assert _distance_to_vocabulary(sdxl, p, k).min() > 1e-3, k
    template = tokens.TokenTemplate(tensors["template_ids"], _mask(sdxl, tensors["template_ids"]), [1, 2])
    with torch.no_grad():
        cond = tokens.encode_slots(sdxl, template, prefix)
    saved = load_adversarial(tmp_path / record["embedding"])
    torch.testing.assert_close(saved.hidden_states, cond.hidden_states)  # the judged conditioning is the soft prompt's
    torch.testing.assert_close(saved.added["text_embeds"], cond.added["text_embeds"])


def test_unlearndiff_gives_one_real_prompt_for_both_encoders(sdxl, erasure, tmp_path):
    _, record, tensors = _attack(sdxl, erasure, "unlearndiff", tmp_path,
                                 {"tokens": 2, "steps": 2, "timesteps": 1, "early_stop": False})
    ids = tensors["prefix_ids"]
    assert ids.shape == (2,) and record["adversarial_prompt"].endswith(PROMPTS[0])
    assert tensors["prefix_embeddings"].shape == tensors["prefix_embeddings_2"].shape == (2, TEXT_HIDDEN)
    hard = _hard_conditioning(sdxl, tensors["template_ids"], [1, 2], ids)
    saved = load_adversarial(tmp_path / record["embedding"])
    torch.testing.assert_close(saved.hidden_states, hard.hidden_states)
    torch.testing.assert_close(saved.added["text_embeds"], hard.added["text_embeds"])


@pytest.mark.parametrize("variant", ["N", "K"])
def test_p4d_gives_one_real_prompt_for_both_encoders(sdxl, erasure, tmp_path, variant):
    _, record, tensors = _attack(sdxl, erasure, "p4d", tmp_path,
                                 {"variant": variant, "tokens": 3, "insert_every": 2, "steps": 2, "check_every": 1})
    assert record["info"]["steps_run"] in (1, 2) and record["adversarial_prompt"]
    ids, template_ids = tensors["token_ids"], tensors["template_ids"]
    template = tokens.token_template(sdxl, "" if variant == "N" else PROMPTS[0], prefix=3 if variant == "N" else 0,
                                          insert_every=0 if variant == "N" else 2)
    assert torch.equal(template.input_ids, template_ids) and ids.shape == (len(template.slots),)
    hard = _hard_conditioning(sdxl, template_ids, template.slots, ids)
    saved = load_adversarial(tmp_path / record["embedding"])
    torch.testing.assert_close(saved.hidden_states, hard.hidden_states)
    torch.testing.assert_close(saved.added["text_embeds"], hard.added["text_embeds"])


def test_textual_inversion_learns_the_token_in_both_encoders_and_resumes(sdxl, erasure, tmp_path, tiny_sdxl_folder):
    budget = {"steps": 2, "images": 1, "batch_size": 1, "gradient_accumulation": 1, "initializer": "painting", "prompts": 2}
    written, _, tensors = _attack(sdxl, erasure, "textual-inversion", tmp_path, budget)
    learned = load_file(str(tmp_path / "textual_inversion.safetensors"))
    assert sorted(learned) == ["clip_g", "clip_l"]
    initial = tokens.token_embeddings(sdxl, tokens.word_ids(sdxl, "painting")[0])
    for k, key in enumerate(["clip_l", "clip_g"]):
        assert learned[key].shape == (TEXT_HIDDEN,)
        assert (learned[key] - initial[k]).abs().max() > 1e-3, key  # learned away from "painting"
        assert torch.equal(tensors[key], learned[key])
    assert len(written["per_prompt"]) == 2 and written["per_prompt"][1]["info"]["steps_run"] == 2

    # the file loads into diffusers, each key with its encoder, and prompts the same conditioning as the attack
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_folder))
    pipe.load_textual_inversion(learned["clip_l"], token="<v*>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(learned["clip_g"], token="<v*>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(PROMPTS[0].replace("cat", "<v*>"), do_classifier_free_guidance=False)
    saved = load_adversarial(tmp_path / written["per_prompt"][0]["embedding"])
    torch.testing.assert_close(states, saved.hidden_states)
    torch.testing.assert_close(pooled, saved.added["text_embeds"])

    # a rerun keeps the finished prompt and redoes the missing one with the saved v*
    kept = json.loads((tmp_path / "prompts" / "000.json").read_text())
    kept["info"] = {"marker": 1}
    (tmp_path / "prompts" / "000.json").write_text(json.dumps(kept))
    (tmp_path / "prompts" / "001.json").unlink()
    again = run_attack(sdxl, [erasure], "cat", attack="textual-inversion", out=tmp_path, prompts=PROMPTS, judge=RecordingJudge(),
                       budget={**TINY, **budget}, progress=False)
    assert again["per_prompt"][0]["info"] == {"marker": 1}
    assert again["per_prompt"][1]["info"]["reused"] == "textual_inversion.safetensors"
    assert again["per_prompt"][1]["successes"] == written["per_prompt"][1]["successes"]


@pytest.mark.parametrize("name,budget", [
    ("ring-a-bell", {"population": 4, "generations": 2, "tokens": 3}),
    ("ring-a-bell", {"variant": "soft"}),
    ("closed-form", {}),
    ("paraphrase", {}),
])
def test_the_other_attacks_run_on_sdxl(sdxl, erasure, tmp_path, name, budget):
    _, record, _ = _attack(sdxl, erasure, name, tmp_path, budget)
    plain = sdxl.encode([PROMPTS[0]])
    saved = load_adversarial(tmp_path / record["embedding"])
    if name == "ring-a-bell" and budget.get("variant") == "soft":  # E(p) + η c moves both parts of the conditioning
        assert (saved.hidden_states - plain.hidden_states).abs().max() > 1e-3
        assert (saved.added["text_embeds"] - plain.added["text_embeds"]).abs().max() > 1e-4
    if name in ("ring-a-bell", "paraphrase") and budget.get("variant") != "soft":
        assert record["adversarial_prompt"]


def test_cli_attack_on_sdxl(sdxl, erasure, tmp_path, monkeypatch, tiny_sdxl_folder):
    from erasekit.cli import main

    from erasekit.eval import judges

    # no built-in judge knows "cat": without --judge, the judge is a RecordingJudge here
    make_judge = judges.make_judge
    default = lambda spec=None, *args, **kw: RecordingJudge() if spec is None else make_judge(spec, *args, **kw)  # noqa: E731
    monkeypatch.setattr(judges, "make_judge", default)
    monkeypatch.setattr(base, "make_judge", default)
    path = erasure.save(tmp_path / "cat.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "atk"
    argv = ["attack", "--model", str(tiny_sdxl_folder), "--erasure", str(path), "--concept", "cat", "--attack", "p4d",
            "--prompts", str(prompts), "--out", str(out),
            "--budget", "prompts=1", "samples=1", "inference_steps=2", "steps=2", "tokens=2", "check_every=0"]
    assert main(argv) == 0
    written = json.loads((out / "result.json").read_text())
    assert written["complete"] and written["n"] == 1 and written["per_prompt"][0]["adversarial_prompt"]
    assert (out / "adversarial_prompts.txt").read_text().strip() == written["per_prompt"][0]["adversarial_prompt"]
