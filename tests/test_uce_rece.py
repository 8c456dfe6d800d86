"""UCE and RECE: the closed forms, the token rows, the adversarial embedding, the Erasure they return.

Most tests run in seconds on a toy-shaped UNet with random weights and the real MiniLM
text encoder (offline, 24-token prompts): they check the math. The last section checks
erasure quality on the bundled trained toy model.
"""

from __future__ import annotations

import time

import pytest
import torch

import erasekit
from erasekit.errors import ErasekitError
from erasekit.methods import rece, uce
from erasekit.targets import prompt_targets as T
from erasekit.targets import resolve_sd_targets
from erasekit.toy import targets as toy_targets


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from erasekit.models.toy import toy_unet_config, write_toy_folder

    folder = tmp_path_factory.mktemp("uce_rece") / "m"
    torch.manual_seed(0)
    write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()))
    handle = erasekit.load_model(folder)
    yield handle
    assert not handle.applied_erasures


def kv_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: w.clone() for name, w in uce.key_value_weights(model, original=False).items()}


def states(model, prompt: str) -> torch.Tensor:
    return model.encode([prompt]).hidden_states[0].double()


# ------------------------------------------------------------------------------ the closed form
@pytest.mark.parametrize("num_erase", [5, 300])  # the low-rank and the dense order of the product
def test_closed_form_equals_the_spec_formula(num_erase):
    generator = torch.Generator().manual_seed(0)
    d, n = 64, 40
    W = torch.randn(n, d, generator=generator, dtype=torch.float64)
    E = torch.randn(num_erase, d, generator=generator, dtype=torch.float64)
    G = torch.randn(num_erase, d, generator=generator, dtype=torch.float64)
    P = torch.randn(30, d, generator=generator, dtype=torch.float64)
    lamb, s_e, s_p = 0.5, 1.3, 0.7
    numerator = lamb * W + s_e * (W @ G.T) @ E + s_p * (W @ P.T) @ P
    denominator = lamb * torch.eye(d, dtype=torch.float64) + s_e * E.T @ E + s_p * P.T @ P
    expected = numerator @ torch.linalg.inv(denominator)
    got = uce.uce_closed_form(W, E, G, P, lamb, s_e, s_p)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert got.dtype == torch.float64
    assert uce.uce_closed_form(W.float(), E, G, P, lamb, s_e, s_p).dtype == torch.float32


def test_closed_form_maps_erased_rows_to_guide_outputs(model):
    """Legacy rows, no preserve, tiny λ: W_new c_i = W_old g_i for every erased row of every matrix."""
    concept, guide = states(model, "red triangle"), states(model, "a painting")
    E, G = uce.select_token_rows(concept, guide, model.last_word_index("red triangle"), model.last_word_index("a painting"))
    solution = uce.uce_solve(E, G, None, lamb=1e-8)
    for name, W_old in uce.key_value_weights(model).items():
        W_new = solution.apply(W_old.double())
        target = G @ W_old.double().T
        error = (E @ W_new.T - target).norm() / target.norm()
        assert error < 1e-4, name


def test_last_token_erase_through_the_model(model):
    """last_token mode (no implicit ""), tiny λ: the concept's last-token row now gives the guide's outputs."""
    config = uce.UCEConfig(token_mode="last_token", lamb=1e-6)
    erasure = uce.erase(model, T(["blue triangle"], guide="circle"), config=config)
    assert erasure.info["erase_rows"] == 1 and erasure.info["preserve_rows"] == 0
    c = states(model, "blue triangle")[model.last_word_index("blue triangle")]
    g = states(model, "circle")[model.last_word_index("circle")]
    original = uce.key_value_weights(model)
    for name, W_old in original.items():
        W_new = W_old.double() + erasure.deltas[name].double()
        torch.testing.assert_close(W_new @ c, W_old.double() @ g, rtol=1e-3, atol=1e-3)


def test_preserved_prompts_barely_move(model):
    kept = ["blue circle", "a photo of a cat"]
    erasure = uce.erase(model, T(["red triangle"], preserve=kept))
    assert erasure.info["preserved_prompts"] == 3  # the two and "" (legacy mode)
    assert erasure.info["preserve_scale"] == pytest.approx(1 / 3)
    erased, _ = uce.select_token_rows(
        states(model, "red triangle"), states(model, " "), model.last_word_index("red triangle"), 0
    )
    preserved = torch.cat([states(model, p) for p in kept])
    for name, W_old in uce.key_value_weights(model).items():
        delta = erasure.deltas[name].double()
        W = W_old.double()
        preserved_change = (preserved @ delta.T).norm() / (preserved @ W.T).norm()
        erased_change = (erased @ delta.T).norm() / (erased @ W.T).norm()
        assert preserved_change < 0.1 * erased_change, name


def test_the_empty_prompt_is_preserved_in_legacy_mode_only(model):
    legacy = uce.erase(model, T(["triangle"]))
    assert legacy.info["preserved_prompts"] == 1 and legacy.info["preserve_scale"] == 1.0  # max(0.1, 1/|{""}|)
    assert legacy.info["preserve_rows"] == model.max_length
    rewrite = uce.erase(model, T(["triangle"]), config=erasekit.methods.build_config("uce", "rewrite"))
    assert rewrite.info["preserved_prompts"] == 0 and rewrite.info["preserve_scale"] == 1.0


# ------------------------------------------------------------------------------------ token rows
def test_legacy_rows_hand_computed(model):
    L = model.max_length  # 24
    assert model.last_word_index("red triangle") == 2  # [CLS] red triangle [SEP]
    assert model.last_word_index("triangle") == 1
    assert model.last_word_index(" ") == 0 and model.last_word_index("a painting") == 2
    # concept longer than the guide: concept rows 2..23 (word, SEP, pads), guide rows 0..21 (CLS, SEP, pads)
    assert uce.legacy_row_slices(2, 0, L) == (slice(2, 24), slice(0, 22))
    # guide longer than the concept: both trimmed to L - 2 rows
    assert uce.legacy_row_slices(1, 2, L) == (slice(1, 23), slice(2, 24))
    concept, guide = states(model, "triangle"), states(model, "a painting")
    E, G = uce.select_token_rows(concept, guide, 1, 2, "legacy")
    assert torch.equal(E, concept[1:23]) and torch.equal(G, guide[2:24])
    assert torch.equal(E[0], concept[1]) and torch.equal(G[0], guide[2])  # the word maps to the guide's word
    assert torch.equal(E[1], concept[2]) and torch.equal(G[1], guide[3])  # SEP to SEP


def test_last_token_rows_hand_computed(model):
    concept, guide = states(model, "red triangle"), states(model, " ")
    E, G = uce.select_token_rows(concept, guide, 2, 0, "last_token")
    assert torch.equal(E, concept[2:3]) and torch.equal(G, guide[0:1])  # "triangle" -> the guide's CLS
    kept = torch.stack([states(model, "blue circle"), states(model, "cat")])
    P = uce.preserve_token_rows(kept, [2, 1], "last_token")
    assert torch.equal(P, torch.stack([kept[0, 2], kept[1, 1]]))
    assert uce.preserve_token_rows(kept, [2, 1], "legacy").shape == (2 * model.max_length, kept.shape[-1])


def test_all_tokens_rows_map_every_row_to_the_same_guide_row(model):
    concept, guide = states(model, "a red triangle on a striped background"), states(model, "")
    E, G = uce.select_token_rows(concept, guide, 4, 0, "all_tokens")
    assert torch.equal(E, concept) and torch.equal(G, guide)  # row k -> row k, all 24 of them
    assert uce.preserve_token_rows(concept[None], [4], "all_tokens").shape == (model.max_length, concept.shape[-1])
    erasure = uce.erase(model, T(["triangle"], guide=""), config=uce.UCEConfig(token_mode="all_tokens"))
    assert erasure.info["erase_rows"] == model.max_length and erasure.info["preserve_rows"] == model.max_length  # "" kept
    assert erasure.info["preserve_scale"] == 1.0


def test_toy_targets_erase_every_caption_naming_the_concept_and_keep_its_siblings():
    from erasekit.toy import world

    def caption_pairs(concepts, guide):
        by_concept, kept = toy_targets.caption_guides(concepts, guide)
        return [pair for pairs in by_concept.values() for pair in pairs], kept

    pairs, preserved = caption_pairs(["triangle"], "")
    captions = [c for c, _ in pairs]
    assert len(captions) == len(set(captions)) == 124  # 4*36 + 3*6 ... with "triangle" as the only shape word
    assert all("triangle" in c for c in captions)
    assert "a red triangle on a striped background" in captions and "triangle" in captions
    assert not any("three-sided" in c for c in captions)  # the synonym stays drawable: a measurable failure
    assert not any("triangle" in p or "three-sided" in p for p in preserved)
    for shape in ("circle", "square", "star", "cross", "heart"):
        assert all(p in preserved for p in world.training_captions("shape", shape))
    # a blank guide: the same caption with the sibling shape (the kept one before it, cyclic) in the triangle's place
    guides = dict(pairs)
    assert guides["a red triangle on a striped background"] == "a red square on a striped background"
    assert guides["triangle"] == "square"
    assert all(g in preserved for g in guides.values())  # every guide is a kept caption
    assert dict(caption_pairs(["circle"], "")[0])["circle"] == "heart"  # cyclic
    # a named guide fills the caption; two erased shapes are not preserved for each other, nor a guide
    pairs, preserved = caption_pairs(["triangle", "square"], "shape")
    assert ("a red triangle on a striped background", "a red shape on a striped background") in pairs
    assert not any("square" in p or "box" in p for p in preserved)
    blank = dict(caption_pairs(["triangle", "square"], "")[0])
    assert blank["a red triangle"] == blank["a red square"] == "a red circle"  # square is erased: the one before it
    # colours: whole words only ("red" is not replaced inside "checkered"); the sibling colour keeps the shape
    pairs, preserved = caption_pairs(["red"], "hue")
    assert ("a red square on a checkered background", "a hue square on a checkered background") in pairs
    guides = dict(caption_pairs(["red"], "")[0])
    assert guides["a red square on a checkered background"] == "a orange square on a checkered background"
    # every value of the attribute erased: the guide is ""
    assert set(dict(caption_pairs(world.SHAPES, "")[0]).values()) == {""}
    # styles: every caption with its adjective or noun, the other styles kept
    # ... and a blank guide sends a style's caption to the same caption on a plain background
    pairs, preserved = caption_pairs(["stripes"], "")
    assert all(("striped" in c) or ("stripes" in c) for c, _ in pairs)
    assert ("a red triangle on a striped background", "a red triangle on a plain background") in pairs
    assert ("a box, blue, with stripes behind it", "a box, blue, with nothing behind it") in pairs
    assert all(g in preserved for _, g in pairs)  # every guide caption is a plain-style training caption
    assert any("dotted" in p for p in preserved) and not any("striped" in p for p in preserved)
    # the plain style goes to the style before it (cyclic): checkerboard
    assert dict(caption_pairs(["plain"], "")[0])["a red triangle on a plain background"] == "a red triangle on a checkered background"
    # a caption erased for one concept is not preserved for another
    pairs, preserved = caption_pairs(["triangle", "red"], "")
    assert "a red circle" in dict(pairs) and "a red circle" not in preserved
    with pytest.raises(ErasekitError, match="toy-world concept"):
        caption_pairs(["van gogh"], "")


def test_generic_guides_are_the_mean_of_their_prompts_states(model):
    states = uce.encode_guides(model, ["a red circle", ("a red circle", "a red square"), ""])
    circle, square, empty = (model.encode([p]).hidden_states[0] for p in ("a red circle", "a red square", ""))
    torch.testing.assert_close(states[0], circle)
    torch.testing.assert_close(states[1], (circle + square) / 2)
    torch.testing.assert_close(states[2], empty)
    assert uce.guide_last_word_index(model, ("a red circle", "a red square")) == model.last_word_index("a red circle")


def test_erase_row_counts_follow_the_token_mode(model):
    legacy = uce.erase(model, T(["red triangle", "circle"]))
    assert legacy.info["erase_rows"] == (24 - 2) + (24 - 1)
    expanded = uce.erase(model, T(["circle"]), config=uce.UCEConfig(token_mode="last_token", expand_prompts=["photo of {concept}"]))
    assert expanded.info["erase_rows"] == 2


def test_hundred_concepts_in_one_solve(model):
    words = ["triangle", "circle", "square", "star", "cat", "dog", "house", "tree", "car", "boat"]
    colours = ["red", "blue", "green", "yellow", "black", "white", "pink", "orange", "purple", "brown"]
    concepts = [f"{c} {w}" for c in colours for w in words]
    assert len(concepts) == 100
    started = time.perf_counter()
    erasure = uce.erase(model, T(concepts))
    seconds = time.perf_counter() - started
    assert erasure.info["erase_rows"] == 100 * (24 - 2)
    assert all(torch.isfinite(d).all() for d in erasure.deltas.values())
    assert seconds < 20, seconds


# ------------------------------------------------------------------------------- RECE step 1
def test_adversarial_embedding_is_the_regularised_least_squares_solution(model):
    erasure = uce.erase(model, T(["triangle"]))
    erasure.apply(model)
    try:
        c = model.encode(["triangle"]).hidden_states[0]
        adversarial = rece.closed_form_adversarial_embedding(model, c, regular_scale=0.1)
        edited, original = uce.key_value_weights(model, original=False), uce.key_value_weights(model, original=True)
    finally:
        erasure.remove(model)
    assert adversarial.shape == c.shape and adversarial.dtype == c.dtype
    # independent check: least squares on [W'_1; ...; W'_L; sqrt(λ) I] c' = [W⁰_1 c; ...; W⁰_L c; 0]
    W_edited = torch.cat([w.double() for w in edited.values()])
    W_original = torch.cat([original[n].double() for n in edited])
    d = c.shape[-1]
    system = torch.cat([W_edited, 0.1**0.5 * torch.eye(d, dtype=torch.float64)])
    rhs = torch.cat([W_original @ c.double().T, torch.zeros(d, c.shape[0], dtype=torch.float64)])
    expected = torch.linalg.lstsq(system, rhs).solution.T
    torch.testing.assert_close(adversarial.double(), expected, rtol=1e-3, atol=1e-4)


def test_adversarial_embedding_recovers_the_original_outputs(model):
    erasure = uce.erase(model, T(["triangle"]))
    erasure.apply(model)
    try:
        c = model.encode(["triangle"])
        adversarial = rece.closed_form_adversarial_embedding(model, c)
        edited, original = uce.key_value_weights(model, original=False), uce.key_value_weights(model, original=True)
    finally:
        erasure.remove(model)
    assert isinstance(adversarial, erasekit.Conditioning)
    plain = rece.adversarial_residual(edited, original, c.hidden_states, c.hidden_states)
    recovered = rece.adversarial_residual(edited, original, adversarial.hidden_states, c.hidden_states)
    assert plain > 0.5  # UCE changed what the concept's rows project to
    assert recovered < 0.75 * plain  # c' gets much of it back (UCE's edit is near-singular, so not all)
    # c' minimises Σ||W'c' - W⁰c||² + λ||c'||², so it does at least as well as c on that objective
    reference = sum(float((c.hidden_states[0].double() @ w.double().T).square().sum()) for w in original.values())

    def objective(x):
        squared_error = rece.adversarial_residual(edited, original, x, c.hidden_states) ** 2 * reference
        return squared_error + 0.1 * float(x.double().square().sum())

    assert objective(adversarial.hidden_states) < objective(c.hidden_states)


def test_adversarial_embedding_of_an_unedited_model_is_the_embedding(model):
    c = model.encode(["triangle"]).hidden_states[0]
    adversarial = rece.closed_form_adversarial_embedding(model, c, regular_scale=1e-6)
    torch.testing.assert_close(adversarial, c, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------- RECE rounds
def test_rece_erases_the_adversarial_embedding(model):
    config = rece.RECEConfig(epochs=2)
    erasure = rece.erase(model, T(["triangle"]), config=config, progress=False)
    before, after = erasure.info["adversarial_residual_before"], erasure.info["adversarial_residual_after"]
    assert len(before) == len(after) == 2
    for b, a in zip(before, after):
        assert a > b + 0.1  # each round moves c' away from the concept's original outputs
    # the next round's adversarial embedding recovers less of the concept than the UCE edit's did
    assert before[1] > before[0]
    # and RECE's final weights recover less than UCE's
    c = model.encode(["triangle"]).hidden_states[0]
    original = uce.key_value_weights(model)
    uce_deltas = uce.erase(model, T(["triangle"]), config=config.uce_config()).deltas
    uce_weights = {n: w + uce_deltas[n] for n, w in original.items()}
    rece_weights = {n: w + erasure.deltas[n] for n, w in original.items()}
    residuals = {}
    for label, weights in [("uce", uce_weights), ("rece", rece_weights)]:
        adversarial = rece.closed_form_adversarial_embedding(None, c, weights, original, config.regular_scale)
        residuals[label] = rece.adversarial_residual(weights, original, adversarial, c)
    assert residuals["rece"] > residuals["uce"] + 0.05
    # RECE tracks the weights as W⁰ S; its first residual is the one computed from the UCE weights themselves
    assert before[0] == pytest.approx(residuals["uce"], rel=1e-4)


def test_rece_round_maps_the_adversarial_embedding_to_the_guide(model):
    """One round on text states given directly: W_new c' is close to W g, as UCE's closed form asks."""
    config = rece.RECEConfig(epochs=1, lamb=1e-4, preserve_scale=1e-4)
    solution, original, _ = uce.uce_edit(model, T(["triangle"]), config=config.uce_config())
    c, g = states(model, "triangle"), states(model, " ")
    deltas, info = rece.rece_rounds(original, solution.transform(), c, g, None, config)
    current = {n: w + d for (n, w), d in zip(original.items(), uce.uce_deltas(original, solution).values())}
    adversarial = rece.closed_form_adversarial_embedding(None, c, current, original, config.regular_scale)
    for name, W in current.items():
        W_new = original[name].double() + deltas[name].double()
        target = g @ W.double().T
        before = (adversarial @ W.double().T - target).norm()
        after = (adversarial @ W_new.T - target).norm()
        assert after < 0.05 * before, name


def test_validation_keeps_the_lowest_scoring_round(model):
    scores = iter([3.0, 1.0, 2.0])
    seen = []

    def validate(handle):
        assert len(handle.applied_erasures) == 1  # the candidate is applied while it is scored
        seen.append(kv_snapshot(handle))
        return next(scores)

    before = kv_snapshot(model)
    erasure = rece.erase(model, T(["triangle"]), config=rece.RECEConfig(epochs=3), validate=validate, progress=False)
    assert erasure.info["scores"] == [3.0, 1.0, 2.0] and erasure.info["chosen_epoch"] == 1
    after = kv_snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # every candidate was taken off
    erasure.apply(model)
    try:
        chosen = kv_snapshot(model)
    finally:
        erasure.remove(model)
    for name in chosen:
        torch.testing.assert_close(chosen[name], seen[1][name], rtol=0, atol=1e-6)
        assert not torch.allclose(chosen[name], seen[2][name])


def test_keep_concept_erased_holds_the_concepts_outputs_where_uce_put_them(model):
    """keep_concept_erased retains the concept's rows at their current (UCE-erased) outputs in every round."""
    c = states(model, "triangle")
    original = uce.key_value_weights(model)
    uce_deltas = uce.erase(model, T(["triangle"]), config=rece.RECEConfig().uce_config()).deltas
    drift = {}
    for keep in (False, True):
        erasure = rece.erase(model, T(["triangle"]), config=rece.RECEConfig(epochs=3, keep_concept_erased=keep), progress=False)
        drift[keep] = sum(float((c @ (erasure.deltas[n] - uce_deltas[n]).double().T).norm()) for n in original)
    assert drift[True] < 0.2 * drift[False], drift


def test_rece_without_validation_keeps_the_last_round(model):
    erasure = rece.erase(model, T(["triangle"]), config=rece.RECEConfig(epochs=2), progress=False)
    assert erasure.info["chosen_epoch"] == 1 and erasure.info["scores"] is None
    only_uce = rece.erase(model, T(["triangle"]), config=rece.RECEConfig(epochs=0), progress=False)
    assert only_uce.info["chosen_epoch"] == -1
    legacy = uce.erase(model, T(["triangle"]), config=rece.RECEConfig().uce_config())
    for name, delta in legacy.deltas.items():
        torch.testing.assert_close(only_uce.deltas[name], delta)


# ------------------------------------------------------------------------------- the Erasure
@pytest.mark.parametrize("method", ["uce", "rece"])
def test_apply_and_remove_restore_the_weights_exactly(model, method, tmp_path):
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    erasure = erasekit.erase(model, method, ["triangle"], progress=False)
    assert len(erasure.deltas) == len(model.key_value_projections())
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in erasure.deltas)
    erasure.apply(model)
    changed = dict(model.unet.named_parameters())
    assert any(not torch.equal(before[n], changed[n]) for n in erasure.deltas)
    erasure.remove(model)
    assert all(torch.equal(before[n], p) for n, p in model.unet.named_parameters())
    loaded = erasekit.Erasure.load(erasure.save(tmp_path / method))
    assert loaded.info == erasure.info and set(loaded.deltas) == set(erasure.deltas)


def test_registry_and_presets(model):
    erasure = erasekit.erase(model, "uce", ["triangle"])
    assert erasure.method == "uce" and erasure.concepts == ["triangle"] and erasure.config["lamb"] == 0.5
    for preset in uce.PRESETS:
        erasekit.methods.build_config("uce", preset)
    for preset in rece.PRESETS:
        erasekit.methods.build_config("rece", preset)
    artist_targets = resolve_sd_targets(["van gogh"], kind="artist")  # the toy model's own resolver knows no artists
    artist = rece.erase(model, artist_targets, config=erasekit.methods.build_config("rece", "artist"), progress=False)
    assert artist.info["targets"][0]["guide"] == "art" and artist.info["epochs"] == 1
    assert artist.info["uce"]["preserve_scale"] == 0.1
    keys_only = erasekit.erase(model, "uce", ["triangle"], overrides={"edit_keys": "false"})
    assert all(n.endswith("to_v.weight") for n in keys_only.deltas)


def test_edits_start_from_the_original_weights(model):
    """With another erasure applied, UCE still edits W_old = the original weights."""
    alone = uce.erase(model, T(["circle"]))
    other = uce.erase(model, T(["triangle"]))
    other.apply(model)
    try:
        stacked = uce.erase(model, T(["circle"]))
    finally:
        other.remove(model)
    for name, delta in alone.deltas.items():
        assert torch.equal(stacked.deltas[name], delta)


def test_bad_input_raises_a_clear_error(model):
    with pytest.raises(ErasekitError, match="shorten"):
        erasekit.erase(model, "uce", [" ".join(["triangle"] * 30)])
    with pytest.raises(ErasekitError, match="shorten"):
        erasekit.erase(model, "uce", ["triangle"], guide=" ".join(["circle"] * 30))
    with pytest.raises(ErasekitError, match="token_mode"):
        uce.erase(model, T(["triangle"]), config=uce.UCEConfig(token_mode="middle"))
    with pytest.raises(ErasekitError, match="singular"):
        uce.erase(model, T(["triangle"]), config=uce.UCEConfig(token_mode="last_token", lamb=0.0))
    with pytest.raises(ErasekitError, match="concept"):
        uce.erase(model, T(["triangle"]), config=uce.UCEConfig(expand_prompts=["photo of"]))
    with pytest.raises(ErasekitError, match="epochs"):
        rece.erase(model, T(["triangle"]), config=rece.RECEConfig(epochs=-1))
    with pytest.raises(ErasekitError, match="shorten"):  # a retain prompt only RECE's rounds encode
        rece.erase(model, T(["triangle"]), config=rece.RECEConfig(retain=[" ".join(["circle"] * 30)]), progress=False)
    diverged = torch.full((4, 4), float("nan"), dtype=torch.float64)  # weights that are no longer finite
    with pytest.raises(ErasekitError, match="diverged"):
        rece.adversarial_map_from_grams(diverged, diverged, regular_scale=0.1)
    with pytest.raises(ErasekitError, match="regular_scale > 0"):
        rece.adversarial_map_from_grams(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64), 0.0)


def test_sd_and_sdxl_shaped_models(tiny_sd_folder, tiny_sdxl_folder):
    for folder in (tiny_sd_folder, tiny_sdxl_folder):
        handle = erasekit.load_model(folder)
        with pytest.raises(ErasekitError, match="--kind"):  # the guide depends on what "red triangle" is
            erasekit.erase(handle, "rece", ["red triangle"], progress=False)
        erasure = erasekit.erase(handle, "rece", ["red triangle"], kind="object", progress=False)
        assert len(erasure.deltas) == len(handle.key_value_projections())
        assert all(torch.isfinite(d).all() for d in erasure.deltas.values())


# ---------------------------------------------------------------------------- the trained toy
@pytest.fixture(scope="module")
def toy():
    try:
        return erasekit.load_model("toy")
    except ErasekitError as error:
        pytest.skip(f"no trained toy model: {error}")


def _evaluate_with(model, prompts, erasure=None, samples_per_prompt=2):
    from erasekit.toy.evaluate import evaluate_toy

    if erasure is not None:
        erasure.apply(model)
    try:
        return evaluate_toy(model, prompts, samples_per_prompt=samples_per_prompt, progress=False)
    finally:
        if erasure is not None:
            erasure.remove(model)


@pytest.fixture(scope="module")
def unerased_shapes(toy):
    """The unerased toy model on shape_prompts(per_shape=8) x 2 samples (16 images a shape)."""
    from erasekit.toy.evaluate import shape_prompts

    return _evaluate_with(toy, shape_prompts(per_shape=8))


def test_uce_toy_preset_erases_triangle_and_keeps_the_other_shapes(toy, unerased_shapes):
    """UCE's bar on 16 images a shape (paired seeds): the triangle <= 10% (1 image of 16), the five other
    shapes together (80 images) within 5 points (4 images) of the unerased model. The sweep
    (docs/toy-sweep.md: 64 and 160 images, evaluation seed 1) measured triangle 92% -> 0%, the others 96% -> 96%."""
    from erasekit.toy.evaluate import shape_prompts

    before = unerased_shapes["by_value"]["shape"]
    erasure = erasekit.erase(toy, "uce", ["triangle"], preset="toy")
    after = _evaluate_with(toy, shape_prompts(per_shape=8), erasure)["by_value"]["shape"]
    assert before["triangle"] >= 0.75, before
    assert after["triangle"] <= 0.10, after
    others = [shape for shape in before if shape != "triangle"]
    assert sum(after[s] for s in others) / len(others) >= sum(before[s] for s in others) / len(others) - 0.05, (before, after)


def test_rece_toy_rounds_leave_the_other_shapes_keys_and_values_nearly_in_place(toy):
    """RECE's 24 toy rounds hold each retained prompt at the previous round's outputs, so what every round
    gives up on them adds up. Erasing the cross, the other shapes' caption keys and values (relative to the
    unerased ones, over every to_k/to_v) must stay within 10%: measured 6.6% at the preset's preserve_scale
    10, 19.8% at 1, where the triangle then lost 31 points of accuracy."""
    from erasekit.methods.uce import encode_states, key_value_weights
    from erasekit.toy import world

    original = key_value_weights(toy, original=True)
    erasure = erasekit.erase(toy, "rece", ["cross"], preset="toy", progress=False)
    erasure.apply(toy)
    try:
        edited = key_value_weights(toy, original=False)
    finally:
        erasure.remove(toy)
    moved = {}
    for shape in world.SHAPES:
        states = encode_states(toy, world.training_captions("shape", shape))
        rows = states.reshape(-1, states.shape[-1]).double()
        change = sum(float(((rows @ (edited[n].double() - W.double()).T) ** 2).sum()) for n, W in original.items())
        scale = sum(float(((rows @ W.double().T) ** 2).sum()) for W in original.values())
        moved[shape] = (change / scale) ** 0.5
    assert moved["cross"] >= 0.2, moved  # the erased shape does move
    assert max(v for shape, v in moved.items() if shape != "cross") <= 0.10, moved


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_erasing_a_style_keeps_shape_and_colour(toy, unerased_shapes, method):
    """Measured: striped prompts 100% -> 0% striped; shape 97.9% -> 93.8% (UCE), 96.9% (RECE); colour 100% -> 100%."""
    from erasekit.toy.evaluate import shape_prompts

    before = unerased_shapes
    after = _evaluate_with(toy, shape_prompts(per_shape=8), erasekit.erase(toy, method, ["stripes"], preset="toy", progress=False))
    for attribute in ("shape", "color"):
        assert after["overall"][attribute] >= before["overall"][attribute] - 0.05, (attribute, before["overall"], after["overall"])
    assert before["by_value"]["style"]["stripes"] >= 0.75 and after["by_value"]["style"]["stripes"] <= 0.25, (
        before["by_value"]["style"], after["by_value"]["style"])


@pytest.mark.slow
def test_rece_toy_preset_erases_the_triangle_and_its_paraphrases_and_resists_the_closed_form_attack_better_than_uce(toy):
    """The issue's bar on 64 images a shape (4 samples of 16 prompts), paired seeds, guidance 2:

    UCE and RECE take the triangle to <= 10% with every other shape within 5 points and its held-out
    paraphrases (64 images) to <= 25%, and RECE draws it less than UCE under the closed-form attack (its
    8 default prompts x 8 = 64 images; margin 4 images). Measured at seed 0 with the sibling guide:
    triangle unerased 91%, UCE and RECE <= 10%; held-out 67 / 6 / 11%; closed-form attack UCE 92%, RECE 80%.
    (With the earlier mean guide UCE left 20% of the paraphrases and RECE 12%: RECE's ordering there is
    gone, since the sibling guide erases the paraphrases for UCE too.)"""
    from erasekit.attacks import run_attack
    from erasekit.toy import world
    from erasekit.toy.evaluate import held_out_prompts, shape_prompts

    prompt_sets = {"named": shape_prompts(["triangle"], per_shape=16), "held_out": held_out_prompts(["triangle"], per_word=8),
                   "others": shape_prompts([s for s in world.SHAPES if s != "triangle"], per_shape=16)}
    results = {}
    for method in (None, "uce", "rece"):
        erasures = [erasekit.erase(toy, method, ["triangle"], preset="toy", progress=False)] if method else []
        rates = {}
        for name, prompts in prompt_sets.items():
            rates[name] = _evaluate_with(toy, prompts, erasures[0] if erasures else None, samples_per_prompt=4)["by_value"]["shape"]
        if erasures:
            attack = run_attack(toy, erasures, "triangle", attack="closed-form", budget={"samples": 8}, progress=False)
            rates["closed_form"] = attack["success_rate"]
            assert attack["n"] == 64
        results[method or "none"] = rates
    none, uce_rates, rece_rates = results["none"], results["uce"], results["rece"]
    assert none["named"]["triangle"] >= 0.75, none
    for rates in (uce_rates, rece_rates):
        assert rates["named"]["triangle"] <= 0.10, results
        for shape, accuracy in none["others"].items():
            assert rates["others"][shape] >= accuracy - 0.05, (shape, results)
    for rates in (uce_rates, rece_rates):
        assert rates["held_out"]["triangle"] <= 0.25, results
    assert rece_rates["closed_form"] <= uce_rates["closed_form"] - 4 / 64, results


@pytest.mark.slow
def test_rece_toy_preset_takes_three_rounds_on_a_style_and_keeps_the_other_styles(toy):
    """RECE's ``toy:style`` layer (3 rounds, not 24) on the checkerboard, evaluation seed 2 (tuned on 0): the
    checkerboard <= 10% of 64 images, the other three styles together (96 images) within 8 points of the unerased
    model (8 images). At seed 0 the 24 rounds cost them 16 points (94 -> 78 of 96) and the 3 rounds 2 (92)."""
    from dataclasses import replace

    from erasekit.eval.protocols import get_protocol
    from erasekit.eval.toy import evaluate_toy_protocol

    protocol = replace(get_protocol("toy"), samples_per_prompt=4, prompts_per_concept=16, prompts_per_other_value=8,
                       held_out_per_word=1, seed=2)
    before = evaluate_toy_protocol(toy, ["checkerboard"], protocol=protocol, progress=False)["rates"]
    erasure = erasekit.erase(toy, "rece", ["checkerboard"], preset="toy", progress=False)
    assert erasure.config["epochs"] == 3  # the layer for the concept's kind, chosen by erase
    erasure.apply(toy)
    try:
        after = evaluate_toy_protocol(toy, ["checkerboard"], protocol=protocol, progress=False)["rates"]
    finally:
        erasure.remove(toy)
    assert before["erased"]["checkerboard"]["rate"] >= 0.75 and after["erased"]["checkerboard"]["rate"] <= 0.10, (before, after)
    assert after["other"]["style"]["n"] == 96
    assert after["other"]["style"]["rate"] >= before["other"]["style"]["rate"] - 0.08, (before["other"], after["other"])
