"""Red-teaming attacks on the bundled toy model: every attack end to end, resume, the token utilities,
and the measured orderings (attacks succeed on the unerased model; the optimising attacks bring a
UCE-erased triangle back at least as often as paraphrasing does).

Budgets here are tiny (2-4 prompts, 8 images per attack, 10 sampling steps) so the file runs in
about two minutes on one core; the margins below were measured at these budgets
(benchmarks/bench_attacks.py measures larger ones; the slow test repeats its --medium run).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.attacks import ATTACKS, load_adversarial, make_attack, run_attack
from erasekit.models import tokens
from erasekit.errors import ErasekitError

RESULT_KEYS = {"attack", "concept", "success_rate", "n", "budget", "seed", "per_prompt"}
SMALL = {"prompts": 4, "samples": 2, "inference_steps": 10}
# the tiny budgets of the fast tests; the per-prompt optimisers attack 2 prompts with 4 images each
OPTIMISING = {
    "closed-form": {},
    "textual-inversion": {"steps": 10, "images": 4, "batch_size": 4, "gradient_accumulation": 1},
    "soft-prompt": {"steps": 16, "timesteps": 4, "early_stop": False, "prompts": 2, "samples": 4},
    "p4d": {"steps": 16, "check_every": 0, "batch": 2, "prompts": 2, "samples": 4},
}


@pytest.fixture(scope="module")
def model():
    handle = erasekit.load_model("toy")
    yield handle
    assert not handle.applied_erasures


@pytest.fixture(scope="module")
def erasure(model):
    return erasekit.erase(model, "uce", ["triangle"], preset="toy", progress=False)


@pytest.fixture(scope="module")
def erased_runs(model, erasure, tmp_path_factory):
    """Paraphrase and the optimising attacks against the UCE-erased triangle, with their output folders."""
    before = {name: p.detach().clone() for name, p in model.unet.named_parameters()}
    runs = {}
    for name, budget in {"paraphrase": {}, **OPTIMISING}.items():
        out = tmp_path_factory.mktemp(name)
        runs[name] = (run_attack(model, [erasure], "triangle", attack=name, out=out, budget={**SMALL, **budget}, progress=False), out)
    for name, parameter in model.unet.named_parameters():  # the model is left as it was found
        assert torch.equal(parameter, before[name]), name
    return runs


# ------------------------------------------------------------------------------------------ token utilities
def test_token_round_trip_on_the_toy_model(model):
    prompt = "a red triangle on a dotted background"
    ids = model.tokenize([prompt])["input_ids"][0]
    mask = model.tokenize([prompt])["attention_mask"][0].bool()
    words = ids[mask][1:-1]
    embeddings = tokens.input_embedding_matrix(model)[words]
    assert torch.equal(tokens.project_to_tokens(model, embeddings), words)
    assert tokens.ids_to_text(model, words) == prompt

    template = tokens.token_template(model, prompt)
    assert torch.equal(template.input_ids, ids) and template.slots == []
    expected = model.encode([prompt]).hidden_states
    torch.testing.assert_close(tokens.encode_ids(model, template.input_ids, template.attention_mask).hidden_states, expected)
    # a word replaced by a slot holding that word's own embedding encodes to the same states
    slotted = tokens.token_template(model, prompt, replace_word="triangle")
    triangle = tokens.word_ids(model, "triangle")
    assert len(slotted.slots) == 1 and ids[slotted.slots[0]].item() == triangle[0]
    states = tokens.encode_slots(model, slotted, tokens.input_embedding_matrix(model)[triangle]).hidden_states
    torch.testing.assert_close(states, expected)

    prefixed = tokens.token_template(model, prompt, prefix=3)
    assert prefixed.slots == [1, 2, 3] and torch.equal(prefixed.input_ids[4 : 4 + len(words)], words)
    inserted = tokens.token_template(model, "a red triangle", insert_every=2)
    assert len(inserted.slots) == 1 and inserted.slots[0] == 3  # [CLS] a red <slot> triangle [SEP]


def test_slot_embeddings_get_gradients(model):
    template = tokens.token_template(model, "a red triangle", prefix=2)
    embeddings = torch.randn(2, tokens.input_embedding_matrix(model).shape[1], requires_grad=True)
    tokens.encode_slots(model, template, embeddings).hidden_states.square().sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    with pytest.raises(ErasekitError, match="more than"):
        tokens.token_template(model, "a red triangle", prefix=30)


def test_token_utilities_on_tiny_sd(tiny_sd_folder):
    sd = erasekit.load_model(tiny_sd_folder)
    prompt = "a photo of a red cat"
    ids = sd.tokenize([prompt])["input_ids"][0]
    words = torch.tensor(tokens.word_ids(sd, prompt))
    embeddings = tokens.input_embedding_matrix(sd)[words]
    assert torch.equal(tokens.project_to_tokens(sd, embeddings), words)
    template = tokens.token_template(sd, prompt)
    assert torch.equal(template.input_ids, ids)
    expected = sd.encode([prompt]).hidden_states
    torch.testing.assert_close(tokens.encode_ids(sd, template.input_ids).hidden_states, expected)
    slotted = tokens.token_template(sd, prompt, replace_word="cat")
    states = tokens.encode_slots(sd, slotted, tokens.input_embedding_matrix(sd)[tokens.word_ids(sd, "cat")]).hidden_states
    torch.testing.assert_close(states, expected)
    prefix = torch.randn(2, tokens.input_embedding_matrix(sd).shape[1], requires_grad=True)
    tokens.encode_slots(sd, tokens.token_template(sd, prompt, prefix=2), prefix).hidden_states.sum().backward()
    assert prefix.grad.abs().sum() > 0


def test_token_attacks_on_two_encoders_need_a_shared_vocabulary(tiny_sdxl_folder):
    """SDXL's tokenizers share one vocabulary (tests/test_attacks_sdxl.py runs every attack there); a model whose
    tokenizers do not is refused with that reason."""
    import dataclasses

    sdxl = erasekit.load_model(tiny_sdxl_folder)
    hard = tokens.token_template(sdxl, "a red cat")  # hard prompts: same states as encode()
    torch.testing.assert_close(tokens.encode_ids(sdxl, hard.input_ids, hard.attention_mask).hidden_states,
                               sdxl.encode(["a red cat"]).hidden_states)

    class OtherVocabulary:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def get_vocab(self):
            vocabulary = self.tokenizer.get_vocab()
            return {token: len(vocabulary) - 1 - i for token, i in vocabulary.items()}

    other = dataclasses.replace(sdxl, tokenizers=[sdxl.tokenizers[0], OtherVocabulary(sdxl.tokenizers[1])])
    with pytest.raises(ErasekitError, match="another vocabulary"):
        tokens.token_template(other, "a red cat", prefix=1)
    with pytest.raises(ErasekitError, match="another vocabulary"):
        tokens.TokenProjector(other)


# ------------------------------------------------------------------------------------------ end to end
def _check_result_folder(result: dict, out, samples: int):
    written = json.loads((out / "result.json").read_text())
    assert RESULT_KEYS <= set(written)
    assert written["success_rate"] == result["success_rate"]
    assert written["n"] == samples * len(written["per_prompt"]) and written["complete"]
    assert 0.0 <= written["success_rate"] <= 1.0
    assert (out / "grid.png").is_file()
    for record in written["per_prompt"]:
        assert {"prompt", "adversarial_prompt", "embedding", "successes"} <= set(record)
        assert len(record["successes"]) == samples
        cond = load_adversarial(out / record["embedding"])
        assert cond.hidden_states.shape == (1, 24, 384)
        assert (out / "prompts" / f"{record['index']:03d}.json").is_file()
    return written


def test_measured_attacks_write_their_results(erased_runs):
    for name, (result, out) in erased_runs.items():
        budget = {**SMALL, **OPTIMISING.get(name, {})}
        written = _check_result_folder(result, out, samples=budget["samples"])
        assert written["attack"] == name and written["concept"] == "triangle" and written["seed"] == 0
        assert written["budget"]["samples"] == budget["samples"] and len(written["per_prompt"]) == budget["prompts"]


@pytest.mark.parametrize("name,budget", [
    ("unlearndiff", {"steps": 2, "timesteps": 2, "early_stop": True}),
    ("ring-a-bell", {"population": 8, "generations": 2}),
    ("ring-a-bell", {"variant": "soft"}),
])
def test_other_attacks_run_end_to_end(model, erasure, tmp_path, name, budget):
    result = run_attack(model, [erasure], "triangle", attack=name, out=tmp_path, progress=False,
                        budget={"prompts": 1, "samples": 1, "inference_steps": 5, **budget})
    written = _check_result_folder(result, tmp_path, samples=1)
    record = written["per_prompt"][0]
    if budget.get("variant") != "soft":  # discrete attacks give a reusable text prompt
        assert isinstance(record["adversarial_prompt"], str) and record["adversarial_prompt"]
    assert not model.applied_erasures


def test_the_adversarial_embedding_is_reusable(model, erasure, erased_runs):
    """Sampling the saved embedding of a prompt with the same seeds gives the images the attack judged."""
    from erasekit.attacks.base import generate_from_conditioning

    result, out = erased_runs["soft-prompt"]
    record = result["per_prompt"][0]
    erasure.apply(model)
    try:
        images = generate_from_conditioning(model, load_adversarial(out / record["embedding"]), record["seeds"], steps=10)
    finally:
        erasure.remove(model)
    from safetensors.torch import load_file

    saved = load_file(str(out / record["embedding"]))["images"]
    assert (images.mul(255).round().to(torch.uint8).int() - saved.int()).abs().max() <= 1


# ------------------------------------------------------------------------------------------ measured orderings
def test_optimising_attacks_bring_the_erased_triangle_back_more_than_paraphrase(erased_runs):
    paraphrase = erased_runs["paraphrase"][0]["success_rate"]
    rates = {name: erased_runs[name][0]["success_rate"] for name in OPTIMISING}
    print(f"success rates against the UCE-erased triangle: paraphrase {paraphrase:.3f}, {rates}")
    # measured at these budgets: paraphrase 0.25; closed-form 0.75, textual-inversion 1.0, soft-prompt 0.375, p4d 0.5
    assert paraphrase <= 0.5, rates
    for name, rate in rates.items():
        assert rate >= paraphrase, (name, rate, paraphrase)
    assert rates["closed-form"] >= paraphrase + 0.375, (rates, paraphrase)
    assert rates["textual-inversion"] >= paraphrase + 0.25, (rates, paraphrase)


def test_attacks_succeed_on_the_unerased_model(model):
    # the model's own 25 sampling steps: at 10 steps the unerased toy model itself draws ~75% triangles.
    # (The optimisers are measured on the unerased model by benchmarks/bench_attacks.py; too slow here.)
    for name, budget in {"closed-form": {}, "ring-a-bell": {"variant": "soft"}}.items():
        budget = {**SMALL, **budget, "prompts": 2, "inference_steps": None}
        result = run_attack(model, [], "triangle", attack=name, out=None, budget=budget, progress=False)
        assert result["success_rate"] >= 0.75, (name, result["success_rate"])


# ------------------------------------------------------------------------------------------ resume, budget, errors
def test_rerun_skips_finished_prompts(model, erasure, tmp_path):
    budget = {"prompts": 2, "samples": 1, "inference_steps": 5}
    first = run_attack(model, [erasure], "triangle", attack="paraphrase", out=tmp_path, budget=budget, progress=False)
    record = tmp_path / "prompts" / "000.json"
    kept = json.loads(record.read_text())
    kept["successes"] = [True]  # a marker: a skipped prompt keeps its stored result
    kept["info"] = {"marker": 1}
    record.write_text(json.dumps(kept))
    (tmp_path / "prompts" / "001.json").unlink()
    second = run_attack(model, [erasure], "triangle", attack="paraphrase", out=tmp_path, budget=budget, progress=False)
    assert second["per_prompt"][0]["info"] == {"marker": 1}
    assert second["per_prompt"][1]["successes"] == first["per_prompt"][1]["successes"]
    assert (tmp_path / "prompts" / "001.json").is_file()
    with pytest.raises(ErasekitError, match="other settings"):
        run_attack(model, [erasure], "triangle", attack="paraphrase", out=tmp_path, budget={**budget, "samples": 2}, progress=False)


def test_time_budget_stops_and_a_rerun_finishes(model, erasure, tmp_path):
    budget = {"prompts": 2, "samples": 1, "inference_steps": 5}
    stopped = run_attack(model, [erasure], "triangle", attack="closed-form", out=tmp_path, budget={**budget, "time_s": 0}, progress=False)
    assert stopped["n"] == 0 and not stopped["complete"] and stopped["stopped"] == "time budget"
    finished = run_attack(model, [erasure], "triangle", attack="closed-form", out=tmp_path, budget=budget, progress=False)
    assert finished["complete"] and finished["n"] == 2
    assert not model.applied_erasures


def test_custom_prompts_and_judge(model, erasure, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red triangle\na blue triangle on a plain background\n")
    seen = []

    def judge(images, concept):
        seen.append((tuple(images.shape), concept))
        return [True] * len(images)

    result = run_attack(model, [erasure], "triangle", attack="paraphrase", prompts=prompts, judge=judge, out=None,
                        budget={"samples": 2, "inference_steps": 3}, progress=False)
    assert result["success_rate"] == 1.0 and result["n"] == 4
    assert [p["prompt"] for p in result["per_prompt"]] == ["a red triangle", "a blue triangle on a plain background"]
    assert seen == [((2, 3, 24, 24), "triangle")] * 2


def test_bad_input_is_reported_clearly(model, erasure):
    assert {"paraphrase", "soft-prompt", "unlearndiff", "ring-a-bell", "p4d", "closed-form", "textual-inversion"} <= set(ATTACKS)
    assert make_attack("unlearndiff").config.variant == "hard" and make_attack("soft-prompt").config.variant == "soft"
    assert make_attack("ring-a-bell", {"steps": "7"}).config.generations == 7
    assert make_attack("p4d", {"steps": "5", "check_every": "0"}).config.steps == 5
    with pytest.raises(ErasekitError, match="unknown attack"):
        make_attack("gcg")
    with pytest.raises(ErasekitError, match="unknown budget key"):
        make_attack("p4d", {"populaton": 3})
    with pytest.raises(ErasekitError, match="not a toy-world concept"):
        run_attack(model, [erasure], "Van Gogh", attack="paraphrase", progress=False)
    with pytest.raises(ErasekitError, match="variant"):
        run_attack(model, [erasure], "triangle", attack="p4d", budget={"variant": "Z", "prompts": 1}, progress=False)
    assert not model.applied_erasures


def test_cli_attack(tmp_path, model, erasure, capsys):
    from erasekit.cli import main

    path = erasure.save(tmp_path / "triangle.safetensors")
    out = tmp_path / "atk"
    argv = ["attack", "--model", "toy", "--erasure", str(path), "--concept", "triangle", "--attack", "closed-form",
            "--out", str(out), "--budget", "prompts=1", "samples=1", "--budget", "inference_steps=5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "success rate" in printed and str(out / "result.json") in printed
    assert RESULT_KEYS <= set(json.loads((out / "result.json").read_text()))
    assert main([*argv[:-3], "--budget", "stepz"]) == 2
    assert "key=value" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ slow: bigger budgets
@pytest.mark.slow
def test_orderings_at_medium_budgets(model, erasure):
    """benchmarks/bench_attacks.py --medium, measured: paraphrase 38% against the erasure; soft-prompt 88% / 75%,
    textual-inversion 100% / 100%, closed-form 100% / 100% (unerased / erased). P4D at 100 steps is not
    asserted: 62% / 25%, it needs more of its 3000 steps on the toy model."""
    budget = {"samples": 2, "prompts": 4}
    paraphrase = run_attack(model, [erasure], "triangle", attack="paraphrase", budget=budget, progress=False)["success_rate"]
    for name, extra in {
        "closed-form": {},
        "soft-prompt": {"steps": 80, "timesteps": 8},
        "textual-inversion": {"steps": 100, "images": 8, "gradient_accumulation": 1},
    }.items():
        erased = run_attack(model, [erasure], "triangle", attack=name, budget={**budget, **extra}, progress=False)["success_rate"]
        unerased = run_attack(model, [], "triangle", attack=name, budget={**budget, **extra}, progress=False)["success_rate"]
        assert erased >= paraphrase + 0.25, (name, erased, paraphrase)
        assert unerased >= 0.75, (name, unerased)


def test_textual_inversion_resumes_from_its_checkpoint_bit_for_bit(model, erasure, tmp_path, monkeypatch):
    """Learning v* interrupted after 4 of 6 steps continues from its step-4 checkpoint to the uninterrupted v*."""
    from erasekit.attacks import base

    budget = {**SMALL, **OPTIMISING["textual-inversion"], "steps": 6, "checkpoint_every": 2, "prompts": 1, "samples": 1}
    whole = tmp_path / "whole"
    run_attack(model, [erasure], "triangle", attack="textual-inversion", out=whole, budget=budget, progress=False)
    expected = load_file(str(whole / "textual_inversion.safetensors"))["embedding"]

    cut, calls = tmp_path / "cut", []

    def interrupted(self):  # asked once a learning step, after that step's checkpoint
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(base.AttackRun, "out_of_time", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_attack(model, [erasure], "triangle", attack="textual-inversion", out=cut, budget=budget, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (cut / "textual_inversion").iterdir()) == ["v-000004.json", "v-000004.safetensors"]
    assert not (cut / "textual_inversion.safetensors").exists()
    run_attack(model, [erasure], "triangle", attack="textual-inversion", out=cut, budget=budget, progress=False)
    assert torch.equal(load_file(str(cut / "textual_inversion.safetensors"))["embedding"], expected)
