"""Faithful to the letter: each method's remaining deviations from its paper and official code, checked
against formula-level references on tiny models (issue: the deviations found term by term).

Each section imports what it needs, so the sections stay independent.
"""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.errors import ErasekitError


# ---- ESD
# target base (paper vs the diffusers rewrite), x_t / t coupling (aligned vs CompVis), the two ESD-u parameter sets.
# Imports are inside the tests: erasekit.methods.esd, erasekit.methods.build_config, diffusers.DDIMScheduler.

ESD_TINY = dict(iterations=1, ddim_steps=2, batch_size=1, learning_rate=1e-2)


@pytest.fixture(scope="module")
def esd_tiny_sd(tiny_sd_folder):
    return erasekit.load_model(tiny_sd_folder)


def test_esd_target_base_follows_the_paper_or_the_rewrite(esd_tiny_sd):
    import dataclasses

    from erasekit.methods import build_config
    from erasekit.methods.esd import ESDConfig, ESDTrainer

    model = esd_tiny_sd
    x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(11))
    t = torch.tensor([700, 250])
    with torch.no_grad():  # the frozen model's single calls: the reference
        e_c = model.predict_noise(x, t, model.encode(["cat"]).repeat(2)).float()
        e_0 = model.predict_noise(x, t, model.encode([""]).repeat(2)).float()
        e_f = model.predict_noise(x, t, model.encode(["painting"]).repeat(2)).float()
    tolerance = dict(rtol=1e-4, atol=2e-5)  # batched (the trainer) vs single calls
    assert (e_c - e_0).abs().max() > 1e3 * tolerance["atol"]  # the two bases are told apart

    def target(config):
        trainer = ESDTrainer(model, ["cat"], config)
        try:
            trainer.step()  # train a little, so reading the frozen values matters
            return trainer.target(x, t, 0)
        finally:
            trainer.close()

    eta = 1.5
    cases = [
        ("unconditional", None, e_0 - eta * (e_c - e_0)),  # the paper, Eq. 6
        ("concept", None, e_c - eta * (e_c - e_0)),  # HEAD esd_sd.py / esd_sdxl.py without --erase_from
        ("concept", "painting", e_f - eta * (e_c - e_0)),  # with erase_from the base is ε*(x_t, c_f) whatever target_base
        ("unconditional", "painting", e_f - eta * (e_c - e_0)),
    ]
    for base, erase_from, expected in cases:
        got = target(ESDConfig(**ESD_TINY, negative_guidance=eta, target_base=base, erase_from=erase_from))
        torch.testing.assert_close(got, expected, **tolerance, msg=f"target_base={base} erase_from={erase_from}")

    # the fast preset: the rewrite's η = 2 on the concept base, i.e. the paper's η = 1 (not the paper's η = 2 or 3)
    fast = dataclasses.replace(build_config("esd", "fast"), iterations=1, ddim_steps=2, mixed_precision=None)
    assert (fast.target_base, fast.negative_guidance) == ("concept", 2.0)
    got = target(fast)
    torch.testing.assert_close(got, e_c - 2.0 * (e_c - e_0), **tolerance)
    torch.testing.assert_close(got, e_0 - 1.0 * (e_c - e_0), **tolerance)
    assert (got - (e_0 - 2.0 * (e_c - e_0))).abs().max() > 1e3 * tolerance["atol"]  # the old double push is gone
    for preset in ("paper", "compvis", "toy"):
        assert build_config("esd", preset).target_base == "unconditional", preset


def test_esd_timestep_coupling_compvis_and_aligned(esd_tiny_sd, monkeypatch):
    from diffusers import DDIMScheduler

    from erasekit.methods import esd
    from erasekit.methods.esd import ESDConfig, ESDTrainer, coupled_steps

    T = 1000
    # (DDIM steps run to make x_t, low, high of t), written out for N = 50
    compvis = {0: (50, 0, 20), 1: (50, 20, 40), 2: (49, 40, 60), 25: (26, 500, 520), 49: (2, 980, 1000)}
    aligned = {0: (0, 980, 1000), 1: (1, 960, 980), 25: (25, 480, 500), 49: (49, 0, 20)}
    for k, expected in compvis.items():
        assert coupled_steps(k, 50, T, "compvis") == expected, k
    for k, expected in aligned.items():
        assert coupled_steps(k, 50, T, "aligned") == expected, k
    for n in (50, 25, 20, 10):  # N dividing T (for N = 7 "leading" timesteps[0] = 853 lies below [857, 1000))
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
        scheduler.set_timesteps(n)
        for k in range(n):
            steps, low, high = coupled_steps(k, n, T, "compvis")
            assert (steps, low, high) == (min(n, n + 1 - k), T * k // n, T * (k + 1) // n), (n, k)
            if k >= 2:  # x_t sits at timesteps[steps]: in the slice two below t's, i.e. two DDIM steps less noisy
                assert esd.ddim_timestep_range(steps, n, T) == (T * (k - 2) // n, T * (k - 1) // n), (n, k)
            steps, low, high = coupled_steps(k, n, T, "aligned")
            assert steps == k and low <= int(scheduler.timesteps[k]) < high, (n, k)
    with pytest.raises(ErasekitError, match="timestep_coupling"):
        coupled_steps(0, 50, T, "official")  # Receler's name for it is not ESD's

    # the trainer runs those steps and draws t from that interval
    model, n = esd_tiny_sd, 5
    for coupling in ("compvis", "aligned"):
        calls = []
        monkeypatch.setattr(esd, "sample_x_t", lambda model, cond, uncond, index, noise, **kw: calls.append([index]) or noise)
        trainer = ESDTrainer(model, ["cat"], ESDConfig(**{**ESD_TINY, "ddim_steps": n, "batch_size": 3},
                                                       timestep_coupling=coupling))
        monkeypatch.setattr(trainer, "train_step", lambda x_t, t, concept_index: calls[-1].append(t.clone()) or 0.0)
        try:
            for _ in range(40):
                trainer.step()
        finally:
            trainer.close()
        seen = set()
        for steps, t in calls:
            slices = set((t * n // T).tolist())
            assert len(slices) == 1, (coupling, t)  # one DDIM index per iteration
            k = slices.pop() if coupling == "compvis" else n - 1 - slices.pop()
            assert steps == (min(n, n + 1 - k) if coupling == "compvis" else k), (coupling, k, steps, t)
            seen.add(k)
        assert len(seen) >= 4, (coupling, seen)
        monkeypatch.undo()

    # with the ideal denoiser for data at 0 the compvis x_t really is two slices less noisy than its t
    alphas = DDIMScheduler.from_config(model.scheduler.config).alphas_cumprod.double()
    monkeypatch.setattr(model, "predict_noise", lambda x, t, cond: x / (1 - alphas[int(t.reshape(-1)[0])]).sqrt().to(x.dtype))
    n = 25
    scheduler = model.make_scheduler("DDIMScheduler")
    scheduler.set_timesteps(n)
    t0 = int(scheduler.timesteps[0])
    cond, uncond = model.encode(["cat"]), model.encode([""])
    z = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(0))
    for k in (3, 8, 16, 24):
        steps, low, high = coupled_steps(k, n, T, "compvis")
        x = esd.sample_x_t(model, cond, uncond, steps, z, ddim_steps=n, guidance=3.0)
        implied_alpha = 1 - (x.double().norm() / z.double().norm()) ** 2 * (1 - alphas[t0])
        implied_t = int((alphas - implied_alpha).abs().argmin())
        assert T * (k - 2) // n <= implied_t < T * (k - 1) // n < low, (k, implied_t, low, high)


def test_esd_u_parameter_sets_are_named_and_esd_u_is_refused(esd_tiny_sd):
    from erasekit.methods import build_config
    from erasekit.methods.esd import ESDConfig, ESDTrainer, select_parameters

    model = esd_tiny_sd
    unet = model.unet
    linear, norms = [], set()  # the reference, from the modules themselves
    for module_name, module in unet.named_modules():
        own = [f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False)]
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "attn2" not in module_name.split("."):
            linear += own
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            norms.update(own)
    assert norms and linear

    rewrite = select_parameters(unet, "noxattn-linear")
    assert len(rewrite) == len(set(rewrite)) and set(rewrite) == set(linear)
    assert select_parameters(unet, "esd-u-diffusers") == rewrite
    assert {"conv_out.weight", "conv_out.bias", "conv_in.weight", "conv_in.bias"} <= set(rewrite)
    assert {"time_embedding.linear_1.weight", "time_embedding.linear_2.bias"} <= set(rewrite)
    assert not set(rewrite) & norms
    assert not any("attn2" in name.split(".") for name in rewrite)
    assert any(".attn1." in name for name in rewrite) and any("time_emb_proj" in name for name in rewrite)

    compvis = set(select_parameters(unet, "noxattn"))
    assert select_parameters(unet, "esd-u-compvis") == select_parameters(unet, "noxattn")
    assert {name for name in norms if not name.startswith("conv_norm_out.")} <= compvis  # norms train in CompVis's set
    assert not any(name.startswith(("conv_out.", "conv_norm_out.", "time_embedding.")) for name in compvis)
    assert not any("attn2" in name.split(".") for name in compvis)

    for refuse in (lambda: select_parameters(unet, "esd-u"),
                   lambda: ESDTrainer(model, ["cat"], ESDConfig(**ESD_TINY, parameter_set="esd-u")),
                   lambda: build_config("esd", None, {"parameter_set": "esd-u"})):
        with pytest.raises(ErasekitError) as error:
            refuse()
        message = str(error.value)
        assert "esd-u-compvis" in message and "esd-u-diffusers" in message and "\n" not in message, message
    assert not any(p.requires_grad for p in unet.parameters())


# ---- UCE
# expand_prompts: what each filled template maps to, the 2023 --add_prompts (the bare guide) or the 2025
# --expand_prompts (the template filled with the guide, blank or not), checked against the closed form solved
# on rows picked by hand. Imports are inside the tests: erasekit.methods.uce, erasekit.targets.prompt_targets.

UCE_TEMPLATES = ["painting of {concept}", "style of {concept}"]


@pytest.fixture(scope="module")
def uce_tiny_sd(tiny_sd_folder):
    return erasekit.load_model(tiny_sd_folder)


def uce_reference_deltas(model, pairs, preserved, token_mode, preserve_scale=1.0, lamb=0.5):
    """W_new - W_old of every to_k/to_v, from the closed form on rows selected by hand from model.encode."""
    from erasekit.methods import uce

    def encode(prompt):
        return model.encode([prompt]).hidden_states[0].double()

    erase_rows, guide_rows = [], []
    for concept, guide in pairs:
        c, g = encode(concept), encode(guide)
        n_c, n_g = model.last_word_index(concept), model.last_word_index(guide)
        if token_mode == "legacy":  # concept [n_c : L - (f - n_c)], guide [n_g : L - (f - n_g)], f = max(n_c, n_g)
            length, farthest = c.shape[0], max(n_c, n_g)
            erase_rows.append(c[n_c : length - (farthest - n_c)])
            guide_rows.append(g[n_g : length - (farthest - n_g)])
        elif token_mode == "last_token":
            erase_rows.append(c[n_c : n_c + 1])
            guide_rows.append(g[n_g : n_g + 1])
        else:
            erase_rows.append(c)
            guide_rows.append(g)
    kept = [encode(p) if token_mode != "last_token" else encode(p)[model.last_word_index(p)][None] for p in preserved]
    solution = uce.uce_solve(torch.cat(erase_rows), torch.cat(guide_rows), torch.cat(kept) if kept else None,
                             lamb, 1.0, preserve_scale)
    return {name: solution.delta(W) for name, W in uce.key_value_weights(model).items()}


def assert_deltas_match(got, expected, other=None):
    """got == expected (float32 deltas against float64 ones) and, when given, far from ``other``."""
    scale = max(float(v.abs().max()) for v in expected.values())
    assert scale > 0
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-4, atol=1e-5 * scale)
    if other is not None:
        gap = max(float((other[name] - value).abs().max()) for name, value in expected.items())
        assert gap > 1e-2 * scale, gap  # the two behaviours are told apart


@pytest.mark.parametrize("token_mode, expand_guides, guide, expected, other", [
    # the 2023 code (legacy): every template maps to the bare guide, named or blank
    ("legacy", None, "red", ["red", "red"], ["painting of red", "style of red"]),
    ("legacy", None, " ", [" ", " "], ["painting of  ", "style of  "]),
    # the 2025 rewrite (last_token): the template filled with the guide, a blank one too ("image of ")
    ("last_token", None, "red", ["painting of red", "style of red"], ["red", "red"]),
    ("last_token", None, " ", ["painting of  ", "style of  "], [" ", " "]),
    # all_tokens templates the guide (the template's own rows map to themselves)
    ("all_tokens", None, " ", ["painting of  ", "style of  "], [" ", " "]),
    # either behaviour on request
    ("legacy", "templated", "red", ["painting of red", "style of red"], ["red", "red"]),
    ("last_token", "bare", " ", [" ", " "], ["painting of  ", "style of  "]),
])
def test_uce_expand_prompts_map_to_the_official_guides(uce_tiny_sd, token_mode, expand_guides, guide, expected, other):
    from erasekit.methods import uce
    from erasekit.targets import prompt_targets

    model = uce_tiny_sd
    config = uce.UCEConfig(token_mode=token_mode, expand_prompts=list(UCE_TEMPLATES), expand_guides=expand_guides)
    erasure = uce.erase(model, prompt_targets(["cat"], guide=guide), config, progress=False)
    assert erasure.info["expand_guides"] == ("bare" if expected[0] == guide else "templated")
    preserved = [] if token_mode == "last_token" else [""]  # the 2023 code's implicit ""; preserve_scale 1 either way
    concepts = ["cat", "painting of cat", "style of cat"]
    reference = uce_reference_deltas(model, list(zip(concepts, [guide, *expected])), preserved, token_mode)
    alternative = uce_reference_deltas(model, list(zip(concepts, [guide, *other])), preserved, token_mode)
    assert_deltas_match(erasure.deltas, reference, alternative)


def test_uce_expand_guides_defaults_and_checks():
    from erasekit.methods import build_config, uce

    assert uce.UCEConfig().expand_guides is None
    assert uce.resolve_expand_guides(None, "legacy") == "bare"
    assert uce.resolve_expand_guides(None, "last_token") == "templated"
    assert uce.resolve_expand_guides(None, "all_tokens") == "templated"
    assert uce.resolve_expand_guides("bare", "last_token") == "bare"
    # a generic guide (prompts averaged row by row): bare keeps it, templated fills each of its prompts
    generic = ("red", "blue")
    assert uce.expand_pairs("cat", generic, ["photo of {concept}"], "bare") == [("photo of cat", generic)]
    assert uce.expand_pairs("cat", generic, ["photo of {concept}"], "templated") == [
        ("photo of cat", ("photo of red", "photo of blue"))]
    with pytest.raises(ErasekitError, match="expand_guides"):
        build_config("uce", None, {"expand_guides": "named"})
    with pytest.raises(ErasekitError, match="expand_guides"):
        uce.expand_pairs("cat", " ", ["photo of {concept}"], "named")


# ---- RECE
# The retain prompts of each round once per concept, as the official train.py's [' '] * len(concepts): checked
# against one round computed by hand with the retain rows stacked k times. Imports are inside the tests:
# erasekit.methods.rece / uce / build_config, erasekit.targets.prompt_targets.

@pytest.fixture(scope="module")
def rece_tiny_sd(tiny_sd_folder):
    return erasekit.load_model(tiny_sd_folder)


def test_rece_retain_rows_weigh_once_per_concept_like_stacked_rows(rece_tiny_sd):
    import dataclasses

    from erasekit.methods import rece, uce
    from erasekit.targets import prompt_targets

    model = rece_tiny_sd
    concepts = ["cat", "red", "blue"]
    targets = prompt_targets(concepts, guide=" ")
    config = rece.RECEConfig(epochs=1)  # the paper's nudity settings: retain [" "], λ₁ = λ₂ = 0.1, regular_scale 0.1
    assert config.retain == [" "] and config.retain_per_concept
    got = rece.erase(model, targets, config, progress=False)
    assert got.info["retain_prompts"] == 3 and got.info["retain_rows"] == 3 * model.max_length

    # one round by hand, from the UCE step: c' = (λI + Σ W'ᵀW')⁻¹ Σ W'ᵀW⁰ c, then the UCE closed form anchored on W'
    original = {n: W.double() for n, W in uce.key_value_weights(model).items()}
    uce_step = uce.erase(model, targets, config.uce_config(), progress=False)
    edited = {n: W + uce_step.deltas[n].double() for n, W in original.items()}
    dim = next(iter(original.values())).shape[1]
    system = config.regular_scale * torch.eye(dim, dtype=torch.float64) + sum(W.T @ W for W in edited.values())
    cross = sum(edited[n].T @ original[n] for n in original)

    def encode(prompt):
        return model.encode([prompt]).hidden_states[0].double()

    adversarial = torch.cat([encode(c) for c in concepts]) @ torch.linalg.solve(system, cross).T
    guide = torch.cat([encode(" ")] * len(concepts))  # row k of each c' -> row k of " "
    retain = encode(" ")

    def round_deltas(retain_rows):
        return {n: uce.uce_closed_form(edited[n], adversarial, guide, retain_rows, config.lamb, config.erase_scale,
                                       config.preserve_scale) - original[n] for n in original}

    stacked, once = round_deltas(torch.cat([retain] * len(concepts))), round_deltas(retain)
    scale = max(float(v.abs().max()) for v in stacked.values())
    for name, value in stacked.items():
        torch.testing.assert_close(got.deltas[name].double(), value, rtol=1e-4, atol=1e-4 * scale)
    assert max(float((once[n] - stacked[n]).abs().max()) for n in stacked) > 1e-2 * scale  # told apart

    # de-duplicated (retain_per_concept off, the toy's) is the rows once; k copies weigh like λ₁ times k
    single = rece.erase(model, targets, dataclasses.replace(config, retain_per_concept=False), progress=False)
    assert single.info["retain_rows"] == model.max_length
    for name, value in once.items():
        torch.testing.assert_close(single.deltas[name].double(), value, rtol=1e-4, atol=1e-4 * scale)
    scaled = rece.erase(model, targets, dataclasses.replace(config, retain_per_concept=False, preserve_scale=0.3),
                        progress=False)
    for name, value in got.deltas.items():
        torch.testing.assert_close(scaled.deltas[name], value, rtol=1e-4, atol=1e-5 * scale)


def test_rece_presets_retain_per_concept_where_they_reproduce_the_official_code():
    from erasekit.methods import build_config, rece

    for preset in ("paper", "nudity", "unsafe", "artist", "object", "object-difficult"):
        assert build_config("rece", preset).retain_per_concept, preset
    assert not build_config("rece", "toy").retain_per_concept  # the toy preset keeps its (tuned) behaviour
    # the 11 concepts of "unsafe": " " 11 times before the targets' own preserved prompts, each once
    assert rece.retain_prompts([" "], ["a cat", " ", "a cat"], 11) == [" "] * 11 + ["a cat"]
    assert rece.retain_prompts([" "], ["a cat", " ", "a cat"], 11, per_concept=False) == [" ", "a cat"]


# ---- CPE
# ResAG's initialisation (D: kaiming-uniform of a (1, d, r) tensor, ±1/√(d·r); A: the same for (1, d, r_g) divided
# by d²) and the attack's own warm-up (lr_warmup_steps_adv), against the formulas. Imports are inside the tests:
# math, erasekit.modules.cpe, erasekit.methods.cpe / build_config.

def test_cpe_down_projection_init_is_the_official_kaiming_uniform():
    import math

    from erasekit.modules.cpe import ResAG

    dim = 768
    tops = {}
    for rank in (1, 4):
        resag = ResAG(dim, [16] * 8, rank=rank, gate_rank=16, generator=torch.Generator().manual_seed(0))
        bound = 1 / math.sqrt(dim * rank)  # fan_in of (1, d, r) is d·r
        tops[rank] = float(resag.down.detach().abs().max())
        assert 0.8 * bound < tops[rank] <= bound * (1 + 1e-6), (rank, tops[rank], bound)
    assert tops[4] < 0.6 * tops[1]  # 2x smaller at r = 4: not uniform(±1/√d) whatever the rank


def test_cpe_gate_query_init_is_the_official_bound():
    import math

    from erasekit.modules.cpe import ResAG, query_init_bound

    dim = 768
    assert query_init_bound(dim, 16) == pytest.approx(1.5295e-8, rel=1e-4)  # the released key weights' |w| <= 1.5e-8
    for gate_rank in (16, 64):
        resag = ResAG(dim, [16], rank=1, gate_rank=gate_rank, key_projection=True, generator=torch.Generator().manual_seed(1))
        bound = 1 / math.sqrt(dim * gate_rank) / dim**2
        for weights in (resag.query, resag.key):
            values = weights.detach().abs()
            assert 0.8 * bound < float(values.max()) <= bound * (1 + 1e-6), (gate_rank, float(values.max()), bound)
            assert float(values.mean()) == pytest.approx(bound / 2, rel=0.05)  # uniform(±bound), not a constant


@pytest.fixture(scope="module")
def cpe_tiny_sd(tiny_sd_folder):
    return erasekit.load_model(tiny_sd_folder)


def test_cpe_attack_schedule_has_its_own_warm_up(cpe_tiny_sd):
    import dataclasses
    import math

    from erasekit.methods import build_config, cpe

    bank = cpe.KVProjections.from_model(cpe_tiny_sd)
    generator = torch.Generator().manual_seed(2)
    targets = torch.randn(2, bank.tokens, bank.dim, generator=generator)
    neutrals = torch.randn(2, bank.tokens, bank.dim, generator=generator)
    config = cpe.CPEConfig(stages=2, first_stage_iterations=12, first_stage_cycles=1, iterations=2, adversarial_embeddings=2,
                           adversarial_iterations=20, warmup_steps=10, adversarial_warmup_steps=5)
    trainer = cpe.ConceptTrainer(bank, targets, neutrals, None, config)

    def expected(base, step, warmup, total):  # linear warm-up, then one cosine decay (cosine with hard restarts, 1 cycle)
        if step < warmup:
            return base * step / warmup
        return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    seen = {"erase": [], "attack": []}
    while trainer.stage == 0:
        seen[trainer.phase].append((trainer.position, trainer.optimizer.param_groups[0]["lr"]))
        trainer.step()
    assert [k for k, _ in seen["erase"]] == list(range(12)) and [k for k, _ in seen["attack"]] == list(range(20))
    for step, lr in seen["erase"]:
        assert lr == pytest.approx(expected(config.first_stage_learning_rate, step, 10, 12), rel=1e-9, abs=1e-15)
    for step, lr in seen["attack"]:
        assert lr == pytest.approx(expected(config.adversarial_learning_rate, step, 5, 20), rel=1e-9, abs=1e-15)
    assert seen["attack"][5][1] == pytest.approx(config.adversarial_learning_rate)  # full rate after 5 steps, not 10

    assert cpe.CPEConfig().adversarial_warmup_steps == 5
    explicit = build_config("cpe", "explicit")
    assert explicit.warmup_steps == 10 and explicit.adversarial_warmup_steps == 5  # the official explicit setting
    field = next(f for f in dataclasses.fields(cpe.CPEConfig) if f.name == "adversarial_warmup_steps")
    assert field.metadata["help"] and field.metadata["min"] == 0
    with pytest.raises(ErasekitError, match="adversarial_warmup_steps"):
        build_config("cpe", None, {"adversarial_warmup_steps": "-1"})



# ---- UCE's artist preset keeps the other artists
def test_uce_artist_preset_preserves_the_other_artists_of_its_list(tiny_sd_folder):
    from erasekit.targets import read_list

    sd = erasekit.load_model(tiny_sd_folder)
    artists = read_list("artists", "anchors")
    assert len(artists) >= 1700  # the 2023 code's list holds 1,734 names; ours is written to that size
    erasure = erasekit.erase(sd, "uce", ["Claude Monet"], preset="artist")  # told an artist by the bundled list
    assert erasure.info["preserved_prompts"] == len(artists) - 1 + 1  # every other artist, and ""
    assert erasure.info["preserve_scale"] == pytest.approx(0.1)  # max(0.1, 1/|P|), as the official code computes it
    alone = erasekit.erase(sd, "uce", ["Claude Monet"], preset="artist", overrides={"preserve_list": "none"})
    assert alone.info["preserved_prompts"] == 1 and alone.info["preserve_scale"] == 1.0
    other = "Pablo Picasso"
    row = sd.encode([other]).hidden_states[0].double()  # an artist the preset keeps barely moves; without the list, more
    moved = {}
    for name, erased in (("list", erasure), ("alone", alone)):
        moved[name] = sum(float((row @ d.double().T).norm()) for d in erased.deltas.values())
    assert moved["list"] < 0.5 * moved["alone"], moved
