"""CPE: the residual attention gates, their training losses, top-1 routing, and the Erasure round trip.

The fast tests run on a toy-shaped UNet with random weights and the real MiniLM text encoder
(offline, 24-token prompts); they check the method's math and plumbing, not erasure quality.
The slow test erases shapes from the trained toy model and scores them with the toy classifier.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import erasekit
from erasekit import Erasure
from erasekit.methods import build_config, cpe
from erasekit.modules import cpe as cpe_modules
from erasekit.models.attention import HookedCrossAttnProcessor
from erasekit.targets import read_list, resolve_sd_targets
from erasekit.toy import targets as toy_targets
from erasekit.toy import world
from erasekit.training import Checkpoints

# Small enough to train in a few seconds on one CPU core; the gates still learn.
FAST = {
    "max_templates": "4", "stages": "2", "first_stage_iterations": "150", "iterations": "40",
    "adversarial_embeddings": "4", "adversarial_iterations": "30", "anchor_batch_size": "8",
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from erasekit.models.toy import toy_unet_config, write_toy_folder

    folder = tmp_path_factory.mktemp("cpe") / "m"
    torch.manual_seed(0)
    write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()))
    return folder


@pytest.fixture(scope="module")
def model(model_folder):
    handle = erasekit.load_model(model_folder)
    yield handle
    assert not handle.applied_erasures


@pytest.fixture(scope="module")
def trained(model):
    """'triangle' erased from the random toy model through the registry, with the toy preset made faster."""
    return erasekit.erase(model, "cpe", ["triangle"], preset="toy", overrides=FAST, progress=False)


def random_erasure(model, concepts, seed: int, rank: int = 2, gate_rank: int = 4) -> Erasure:
    """A CPE erasure with random (not trained) gates: every gate and residual is nonzero."""
    bank = cpe.KVProjections.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    states = []
    for _ in concepts:
        resag = cpe_modules.ResAG(bank.dim, bank.out_dims, rank, gate_rank, generator=generator)
        with torch.no_grad():
            resag.query.copy_(0.3 * torch.randn(resag.query.shape, generator=generator))  # peaked token attention
            resag.scaler.copy_(0.5 * torch.randn(resag.scaler.shape, generator=generator))
            for up in resag.up:
                up.copy_(0.05 * torch.randn(up.shape, generator=generator))
        states.append(resag.state(bank.names))
    config = cpe.CPEConfig(rank=rank, gate_rank=gate_rank)
    return cpe.build_erasure(model, list(concepts), states, config)


def unet_output(model, prompts=("a red triangle on a striped background", "a blue circle")) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), 3, 24, 24, generator=generator)
    with torch.no_grad():
        return model.predict_noise(x, 500, model.encode(list(prompts)))


def edited_kv(model, states: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every to_k / to_v hands to attention for these text states, through the installed hooks."""
    out = {}
    with torch.no_grad():
        for path, attn in model.cross_attention_layers().items():
            key, value = attn.to_k(states), attn.to_v(states)
            processor = attn.processor
            if isinstance(processor, HookedCrossAttnProcessor):
                for hook in processor.kv_hooks.values():
                    key, value = hook(attn, states, key, value)
            out[f"{path}.to_k"], out[f"{path}.to_v"] = key, value
    return out


def processor_types(model) -> dict[str, type]:
    return {name: type(attn.processor) for name, attn in model.cross_attention_layers().items()}


# ----------------------------------------------------------------------------------- the gate
def test_fresh_gate_changes_nothing(model):
    reference, types = unet_output(model), processor_types(model)
    bank = cpe.KVProjections.from_model(model)
    fresh = cpe_modules.ResAG(bank.dim, bank.out_dims, rank=1, gate_rank=16)
    states = model.encode(["a red triangle"]).hidden_states
    g, _ = fresh.gate(states)
    assert torch.equal(g, torch.full_like(g, 0.5))  # s = 0: every gate starts at 0.5
    assert all(torch.equal(fresh.residual(states, i), torch.zeros(1, 24, out)) for i, out in enumerate(bank.out_dims))

    erasure = cpe.build_erasure(model, ["triangle"], [fresh.state(bank.names)], cpe.CPEConfig())
    erasure.apply(model)
    assert all(t is HookedCrossAttnProcessor for t in processor_types(model).values())
    assert torch.equal(unet_output(model), reference)
    erasure.remove(model)
    assert processor_types(model) == types


def test_parameter_count_matches_the_paper_layout(model):
    bank = cpe.KVProjections.from_model(model)
    resag = cpe_modules.ResAG(bank.dim, bank.out_dims, rank=1, gate_rank=16)
    # gate: A (d x r_g) + s (d); per projection: D (d x r) + U (r x out)
    expected = bank.dim * 16 + bank.dim + sum(bank.dim + out for out in bank.out_dims)
    assert sum(p.numel() for p in resag.parameters()) == expected
    assert len(bank.names) == 2 * len(model.cross_attention_layers()) == 14


def test_input_space_losses_equal_the_projection_outputs(model):
    """The Gram-matrix form of the losses gives the same numbers (and gradients) as W x - ResAG(E) directly."""
    bank = cpe.KVProjections.from_model(model)
    generator = torch.Generator().manual_seed(1)
    resag = cpe_modules.ResAG(bank.dim, bank.out_dims, rank=2, gate_rank=8, generator=generator)
    with torch.no_grad():
        resag.query.normal_(0, 0.05)
        resag.scaler.normal_(0, 0.5)
        for up in resag.up:
            up.normal_(0, 0.1)
    inputs = model.encode(["a red triangle", "a blue circle on a dotted background", "a star"]).hidden_states
    x = torch.randn(2, 24, bank.dim, generator=generator)
    fast = bank.losses(resag.mixed(inputs), resag.down, bank.factors(resag), x=x)
    direct = bank.direct_losses(resag, inputs, torch.cat([x, torch.zeros(1, 24, bank.dim)]))
    torch.testing.assert_close(fast, direct, rtol=1e-4, atol=1e-7)
    fast_grad = torch.autograd.grad(fast.sum(), resag.scaler)[0]
    direct_grad = torch.autograd.grad(bank.direct_losses(resag, inputs, torch.cat([x, torch.zeros(1, 24, bank.dim)])).sum(),
                                      resag.scaler)[0]
    torch.testing.assert_close(fast_grad, direct_grad, rtol=1e-3, atol=1e-8)


def test_layer_weights_follow_the_singular_values(model):
    bank = cpe.KVProjections.from_model(model)
    path, attn = next(iter(model.cross_attention_layers().items()))
    w_q, w_v, w_o = attn.to_q.weight.double(), attn.to_v.weight.double(), attn.to_out[0].weight.double()
    key_weight = torch.linalg.svdvals(w_o @ w_v)[0] * torch.linalg.svdvals(w_q)[0] / 24
    assert bank.names[:2] == [f"{path}.to_k", f"{path}.to_v"]
    assert bank.lipschitz[0].item() == pytest.approx(key_weight.item(), rel=1e-5)
    assert bank.lipschitz[1].item() == pytest.approx(torch.linalg.svdvals(w_o)[0].item(), rel=1e-5)


# ------------------------------------------------------------------------------------ training
def test_training_moves_the_concept_towards_its_target_and_keeps_anchors(model, trained):
    assert trained.method == "cpe" and trained.module_type == "cpe" and trained.concepts == ["triangle"]
    assert trained.config["guidance"] == cpe.PRESETS["toy"]["guidance"] and trained.config["stages"] == 2
    guidance = trained.config["guidance"]
    templates = ["a red {} on a striped background", "a {} in blue", "a {}"]
    concept = model.encode([t.format("triangle") for t in templates]).hidden_states
    neutral = model.encode([t.format(toy_targets.NEUTRALS["shape"]) for t in templates]).hidden_states
    anchors = model.encode(["a green circle on a dotted background", "a yellow star", "a heart in purple"]).hidden_states
    before_c, before_n, before_a = edited_kv(model, concept), edited_kv(model, neutral), edited_kv(model, anchors)
    trained.apply(model)
    try:
        after_c, after_a = edited_kv(model, concept), edited_kv(model, anchors)
    finally:
        trained.remove(model)
    target_gap_before = target_gap_after = concept_move = anchor_move = 0.0
    for name in before_c:
        target = (1 + guidance) * before_n[name] - guidance * before_c[name]
        target_gap_before += (before_c[name] - target).pow(2).sum().item()
        target_gap_after += (after_c[name] - target).pow(2).sum().item()
        concept_move += (after_c[name] - before_c[name]).pow(2).sum().item()
        anchor_move += (after_a[name] - before_a[name]).pow(2).sum().item()
    assert target_gap_after < 0.7 * target_gap_before  # the concept's keys/values moved towards the target (0.49 measured)
    assert anchor_move < 1e-3 * concept_move  # the anchors' barely moved (1.1e-5 measured with the official init)
    assert edited_kv(model, concept).keys() == before_c.keys()
    assert all(torch.equal(edited_kv(model, concept)[n], before_c[n]) for n in before_c)  # removed: exactly as before


def test_erase_records_what_it_did(trained):
    info = trained.info["concepts"]["triangle"]
    assert info["neutral"] == "object" and info["templates"] == 4 and info["anchors"] > 10
    assert [s["stage"] for s in info["stages"]] == [0, 1]
    assert "adversarial" in info["stages"][1] and "attack" in info["stages"][0] and "attack" not in info["stages"][1]
    shapes = {k: tuple(v.shape) for k, v in trained.modules.items()}
    assert shapes["gate.query"] == (1, 384, 16) and shapes["gate.scaler"] == (1, 384) and shapes["alpha"] == (1,)
    assert sum(k.endswith(".down") for k in shapes) == 14 and sum(k.endswith(".up") for k in shapes) == 14


# ---------------------------------------------------------------------------------- checkpoints
# 2 concepts of 24 + 8 (attack) + 10 steps each: 84 steps; every piece of the state matters
RESUMABLE = {**FAST, "max_templates": "3", "first_stage_iterations": "24", "iterations": "10", "adversarial_embeddings": "2",
             "adversarial_iterations": "8", "anchor_batch_size": "4", "similar_anchors": "4", "seed": "5"}
CONCEPTS = ["triangle", "circle"]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(model):
    return erasekit.erase(model, "cpe", CONCEPTS, config=build_config("cpe", "toy", RESUMABLE), progress=False)


def assert_same_run(erasure: Erasure, reference: Erasure) -> None:
    assert list(erasure.modules) == list(reference.modules)
    for name, value in reference.modules.items():
        assert torch.equal(erasure.modules[name], value), name
    assert list(erasure.info["concepts"]) == CONCEPTS
    for concept, info in reference.info["concepts"].items():
        assert {k: v for k, v in erasure.info["concepts"][concept].items() if k != "seconds"} == {
            k: v for k, v in info.items() if k != "seconds"}


def checkpoint_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_interrupted_runs_resume_to_the_uninterrupted_result(model, uninterrupted, tmp_path, monkeypatch):
    left = {"steps": 38}  # optimiser steps this session may take before it is "interrupted"
    step = cpe.ConceptTrainer.step

    def interruptible(self):
        if left["steps"] == 0:
            raise Interrupted
        left["steps"] -= 1
        step(self)

    monkeypatch.setattr(cpe.ConceptTrainer, "step", interruptible)
    folder = tmp_path / "ckpt"
    config = dataclasses.replace(build_config("cpe", "toy", RESUMABLE), checkpoint_dir=str(folder), checkpoint_every=5)
    with pytest.raises(Interrupted):
        erasekit.erase(model, "cpe", CONCEPTS, config=config, progress=False)
    assert checkpoint_files(folder) == ["cpe-000035.json", "cpe-000035.safetensors"]  # older pairs deleted
    state = json.loads((folder / "cpe-000035.json").read_text())["state"]
    assert state["finished"] == 0 and state["concept"]["stage"] == 1 and state["concept"]["phase"] == "erase"  # after δ
    with pytest.raises(erasekit.ErasekitError, match="resume=true"):  # never overwrites the interrupted run
        erasekit.erase(model, "cpe", CONCEPTS, config=config, progress=False)
    resume = dataclasses.replace(config, resume=True)
    for change in ({"guidance": 2.0}, {"iterations": 12}):  # iterations shapes the stages' schedules: no change either
        with pytest.raises(erasekit.ErasekitError, match=next(iter(change))):
            erasekit.erase(model, "cpe", CONCEPTS, config=dataclasses.replace(resume, **change), progress=False)
    assert checkpoint_files(folder) == ["cpe-000035.json", "cpe-000035.safetensors"]

    left["steps"] = 36  # resumed at 35, interrupted again at 71: the second concept's attack
    with pytest.raises(Interrupted):
        erasekit.erase(model, "cpe", CONCEPTS, config=resume, progress=False)
    state = json.loads((folder / "cpe-000070.json").read_text())["state"]
    assert state["finished"] == 1 and state["concept"]["stage"] == 0 and state["concept"]["phase"] == "attack"

    left["steps"] = -1  # no more interruptions
    assert_same_run(erasekit.erase(model, "cpe", CONCEPTS, config=resume, progress=False), uninterrupted)


KILLED_RUN = """
import json, sys, time
import torch
import erasekit
from erasekit.methods import build_config, cpe

folder, checkpoints, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
step = cpe.ConceptTrainer.step


def slow_step(self):  # slow enough to be killed mid-run; the numbers are untouched
    time.sleep(0.02)
    step(self)


cpe.ConceptTrainer.step = slow_step
model = erasekit.load_model(folder)
config = build_config("cpe", "toy", {**overrides, "checkpoint_dir": checkpoints, "checkpoint_every": "5"})
erasekit.erase(model, "cpe", ["triangle", "circle"], config=config, progress=False)
"""


def test_a_killed_run_resumes_to_the_uninterrupted_result(model, model_folder, uninterrupted, tmp_path):
    script, folder = tmp_path / "killed_run.py", tmp_path / "ckpt"
    script.write_text(KILLED_RUN)
    # the same thread count as this process, so that both compute the same bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, str(script), str(model_folder), str(folder), json.dumps(RESUMABLE)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    try:
        deadline = time.monotonic() + 120
        while killed_at is None and process.poll() is None and time.monotonic() < deadline:
            steps = [int(p.stem.split("-")[1]) for p in folder.glob("cpe-*.json")] if folder.is_dir() else []
            if steps and max(steps) >= 55:  # in the second concept, 29 steps before the end
                os.kill(process.pid, signal.SIGKILL)
                killed_at = max(steps)
            time.sleep(0.01)
    finally:
        if process.poll() is None and killed_at is None:
            process.kill()
        _, errors = process.communicate(timeout=60)
    assert killed_at is not None and process.returncode == -signal.SIGKILL, errors.decode()[-2000:]
    latest = Checkpoints(folder, "cpe", {}).latest()
    assert killed_at <= int(latest.stem.split("-")[1]) < 84
    config = build_config("cpe", "toy", {**RESUMABLE, "checkpoint_dir": str(folder), "checkpoint_every": "5", "resume": "true"})
    assert_same_run(erasekit.erase(model, "cpe", CONCEPTS, config=config, progress=False), uninterrupted)


# ------------------------------------------------------------------------------ several concepts
def test_stacked_erasures_route_each_token_to_the_top_gate(model):
    reference, types = unet_output(model), processor_types(model)
    first, second = random_erasure(model, ["a"], seed=1), random_erasure(model, ["b", "c"], seed=2)
    states = model.encode(["a red triangle on a striped background", "a yellow star"]).hidden_states
    before = edited_kv(model, states)

    def contributions(erasure):
        """Per concept of the erasure: (gate (B, T), residual per projection (B, T, out)), computed by hand."""
        m, result = erasure.modules, []
        rank = m[next(k for k in m if k.endswith(".down"))].shape[-1]
        for c in range(len(erasure.concepts)):
            q = states @ m["gate.query"][c]
            mixed = torch.softmax(q @ q.transpose(1, 2), dim=-1) @ states
            gate = torch.sigmoid(mixed @ m["gate.scaler"][c])
            z = m["alpha"][c] / rank * gate[..., None] * mixed
            result.append((gate, {n: z @ m[f"{n}.down"][c] @ m[f"{n}.up"][c] for n in before}))
        return result

    every = contributions(first) + contributions(second)
    gates = torch.stack([g for g, _ in every])
    winner = gates.argmax(0)
    assert len(set(winner.flatten().tolist())) > 1  # the test means something: different tokens, different winners

    first.apply(model)
    second.apply(model)
    got = edited_kv(model, states)
    for name in before:
        expected = before[name].clone()
        for c, (_, residual) in enumerate(every):
            expected += (winner == c)[..., None] * residual[name]
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5)

    # one erasure holding the same three concepts routes the same way
    both = Erasure(method="cpe", concepts=["a", "b", "c"], base_model=model.name, config={}, module_type="cpe",
                   modules={k: torch.cat([first.modules[k], second.modules[k]]) for k in first.modules})
    first.remove(model)
    only_second = edited_kv(model, states)
    assert not all(torch.allclose(only_second[n], got[n]) for n in before)
    second.remove(model)
    assert processor_types(model) == types and torch.equal(unet_output(model), reference)
    both.apply(model)
    try:
        merged = edited_kv(model, states)
        assert all(torch.allclose(merged[n], got[n], rtol=1e-4, atol=1e-5) for n in before)
    finally:
        both.remove(model)


def test_gate_cache_is_reused_and_never_stale(model, monkeypatch):
    erasure = random_erasure(model, ["a"], seed=3)
    calls = []
    original = cpe_modules.gate_outputs
    monkeypatch.setattr(cpe_modules, "gate_outputs", lambda *a, **k: calls.append(1) or original(*a, **k))
    states = model.encode(["a red triangle"]).hidden_states
    erasure.apply(model)
    try:
        first = edited_kv(model, states)
        assert len(calls) == 1  # one gate computation serves all 14 projections
        states.add_(0.5)  # in place: the same memory now holds other text states
        changed = edited_kv(model, states)
        assert len(calls) == 2
        fresh = edited_kv(model, states.clone())
        assert all(torch.equal(changed[n], fresh[n]) for n in first)
        assert not all(torch.allclose(changed[n], first[n]) for n in first)
    finally:
        erasure.remove(model)


# ---------------------------------------------------------------------------------- the artifact
def test_save_load_apply_remove_round_trip(model, trained, tmp_path):
    reference, types = unet_output(model), processor_types(model)
    trained.apply(model)
    erased = unet_output(model)
    trained.remove(model)
    assert not torch.allclose(erased, reference)
    assert torch.equal(unet_output(model), reference) and processor_types(model) == types

    loaded = Erasure.load(trained.save(tmp_path / "triangle.safetensors"))
    assert loaded.module_type == "cpe" and loaded.concepts == ["triangle"] and loaded.deltas == {}
    assert all(torch.equal(loaded.modules[k], v) for k, v in trained.modules.items())
    loaded.apply(model)
    assert torch.equal(unet_output(model), erased)
    with pytest.raises(erasekit.ErasekitError, match="cannot be merged"):
        loaded.merge(model)
    loaded.remove(model)
    assert torch.equal(unet_output(model), reference) and processor_types(model) == types

    # scale 0.5 halves every residual
    states = model.encode(["a red triangle"]).hidden_states
    before = edited_kv(model, states)
    loaded.apply(model)
    full = edited_kv(model, states)
    loaded.remove(model)
    loaded.apply(model, scale=0.5)
    half = edited_kv(model, states)
    loaded.remove(model)
    for name in before:
        torch.testing.assert_close(half[name] - before[name], 0.5 * (full[name] - before[name]), rtol=1e-4, atol=1e-6)


def test_erasure_for_another_architecture_is_refused(model, tiny_sd_folder):
    sd = erasekit.load_model(tiny_sd_folder)
    erasure = random_erasure(model, ["a"], seed=4)
    with pytest.raises(erasekit.ErasekitError):
        erasure.apply(sd, force=True)
    assert sd.applied_erasures == [] and all(
        not isinstance(a.processor, HookedCrossAttnProcessor) for a in sd.cross_attention_layers().values())


# --------------------------------------------------------------------------------- text side
def test_bundled_lists_and_anchor_selection(model):
    for kind, name in [("anchors", "people"), ("anchors", "person_words"), ("anchors", "artists"), ("anchors", "art_words"),
                       ("anchors", "sentences"), ("anchors", "objects"), ("anchors", "object_words"), ("templates", "person"),
                       ("templates", "art"), ("templates", "explicit"), ("templates", "object")]:
        entries = read_list(name, kind)
        assert len(entries) >= (6 if name == "object_words" else 20) and len(set(entries)) == len(entries), name
        if kind == "templates":
            assert all(e.count("{}") == 1 for e in entries), name
    target = resolve_sd_targets(["Tom"], kind="celebrity", preserve=["a cat"])[0]
    assert target.kind == "person" and target.neutral == "a person"
    config = cpe.CPEConfig(similar_anchors=5)
    prompts = cpe.anchor_prompts(model, target, ["a photo of {}", "{}"], config)
    assert "Tom Hanks" not in prompts and "Tom Cruise" not in prompts  # names containing the concept are dropped
    assert "a photo of a cat" in prompts and "a person" in prompts
    assert len(prompts) == 2 * (len(read_list("person_words", "anchors")) + 5 + 1)
    with pytest.raises(erasekit.ErasekitError, match="bundled"):
        read_list("no-such-list", "anchors")


def test_toy_targets_give_cpe_its_text_side(model):
    target = erasekit.resolve_targets(model, ["triangle"])[0]
    assert target.kind == "shape" and target.neutral == "object"
    templates = cpe.templates_for(target, cpe.CPEConfig())
    assert len(templates) == 124 and "a red {} on a striped background" in templates
    assert "circle" in target.anchors and "triangle" not in target.anchors and "three-sided shape" not in target.anchors
    assert "red" in target.anchor_prompts and "striped" in target.anchor_prompts
    striped = erasekit.resolve_targets(model, ["striped"])[0]
    assert striped.neutral == "plain" and striped.templates[0].count("{}") == 1
    # the plain style is not its own neutral (CPE would then erase nothing): the style before it is
    assert erasekit.resolve_targets(model, ["plain"])[0].neutral == "checkered"
    # a colour's neutral is its sibling (no caption has a colourless word), "colored" only with every colour erased
    assert erasekit.resolve_targets(model, ["purple"])[0].neutral == "yellow"
    assert {t.neutral for t in erasekit.resolve_targets(model, list(world.COLORS))} == {"colored"}
    # the templates are filled with the word the captions use there: the style's adjective, the shape's name as given
    assert erasekit.resolve_targets(model, ["checkerboard"])[0].word == "checkered" and target.word == "triangle"
    assert erasekit.resolve_targets(model, ["box"])[0].word == "box"
    assert len(cpe.templates_for(target, cpe.CPEConfig(max_templates=7))) == 7


def test_bad_settings_fail_clearly(model):
    with pytest.raises(erasekit.ErasekitError, match="rank"):
        erasekit.erase(model, "cpe", ["triangle"], overrides={"rank": "0"})
    with pytest.raises(erasekit.ErasekitError, match="domain"):
        erasekit.erase(model, "cpe", ["triangle"], overrides={"domain": "celebrity"}, progress=False)  # a resolver's, not CPE's
    with pytest.raises(erasekit.ErasekitError, match="toy-world concept"):  # a typo is no shape
        erasekit.erase(model, "cpe", ["triangel"], progress=False)


def test_cpe_on_sd_needs_the_concepts_kind(tiny_sd_folder):
    sd = erasekit.load_model(tiny_sd_folder)
    with pytest.raises(erasekit.ErasekitError, match="--kind"):
        erasekit.erase(sd, "cpe", ["cat"], progress=False)
    with pytest.raises(erasekit.ErasekitError, match="--kind"):
        erasekit.erase(sd, "cpe", ["cat"], kind="vehicle", progress=False)


# ---------------------------------------------------------------------------- the trained toy
@pytest.mark.slow
def test_toy_model_forgets_one_shape_and_keeps_the_others():
    from erasekit.toy.evaluate import evaluate_toy, shape_prompts

    try:
        model = erasekit.load_model("toy")
    except erasekit.ErasekitError as error:
        pytest.skip(f"no trained toy model: {error}")
    # 16 images a shape, paired seeds: the triangle <= 10%, the five others together (80 images) within 5 points
    # (4 images). The sweep (docs/toy-sweep.md, seed 1, 64/160 images) measured 92% -> 0% and 96% -> 96%.
    prompts = shape_prompts(per_shape=8)
    before = evaluate_toy(model, prompts, samples_per_prompt=2, progress=False)["by_value"]["shape"]
    erasure = erasekit.erase(model, "cpe", ["triangle"], preset="toy", progress=False)
    erasure.apply(model)
    after = evaluate_toy(model, prompts, samples_per_prompt=2, progress=False)["by_value"]["shape"]
    erasure.remove(model)
    assert after["triangle"] <= 0.10, after
    others = [shape for shape in before if shape != "triangle"]
    assert sum(before[s] - after[s] for s in others) / len(others) <= 0.05, (before, after)


@pytest.mark.slow
def test_toy_preset_erases_a_colour_keeps_the_others_and_the_shapes_of_prompts_not_naming_it():
    """CPE's ``toy`` preset on purple (its neutral the sibling yellow), evaluation seed 2: purple <= 10% of 64 images, the
    other colours (160 images) within 5 points (8 images), and the shapes of the prompts that do not name purple
    (those of the 160 that name a shape) within 5 points. (Its own prompts lose some of their shapes: docs/toy-presets.md.)"""
    from dataclasses import replace

    from erasekit.eval.protocols import get_protocol
    from erasekit.eval.toy import evaluate_toy_protocol

    model = erasekit.load_model("toy")
    protocol = replace(get_protocol("toy"), samples_per_prompt=4, prompts_per_concept=16, prompts_per_other_value=8,
                       held_out_per_word=1, seed=2)

    def measure():
        result = evaluate_toy_protocol(model, ["purple"], protocol=protocol, progress=False)
        others = [p for p in result["prompts"] if p["group"] == "other" and p.get("shape")]
        shapes = [sum(x == p["shape"] for x in p["predicted"]["shape"]) for p in others]
        return result["rates"], sum(shapes) / sum(len(p["predicted"]["shape"]) for p in others)

    before, shapes_before = measure()
    erasure = erasekit.erase(model, "cpe", ["purple"], preset="toy", progress=False)
    erasure.apply(model)
    try:
        after, shapes_after = measure()
    finally:
        erasure.remove(model)
    assert before["erased"]["purple"]["rate"] >= 0.75 and after["erased"]["purple"]["rate"] <= 0.10, (before, after)
    assert after["other"]["color"]["n"] == 160
    assert after["other"]["color"]["rate"] >= before["other"]["color"]["rate"] - 0.05, (before["other"], after["other"])
    assert shapes_after >= shapes_before - 0.05, (shapes_before, shapes_after)
