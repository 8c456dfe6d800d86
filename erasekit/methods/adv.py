"""Adversarial erasure: ESD-style unlearning against a strong inner attack, with a retention term.

In the spirit of AdvUnlearn (Zhang et al., NeurIPS 2024, Eq. 5-6): a bi-level problem whose upper
level erases the concept from the prompts an attacker finds and whose lower level is the attacker::

    min_θ  E[ || ε_θ(x_t, c_adv, t) - ε_tgt ||² ] + || ε_θ(x_t, c, t) - ε_tgt ||² + γ E_r || ε_θ(x_r, r, t) - ε_θ*(x_r, r, t) ||²
    c_adv = argmin_{c'}  || ε_θ(x_t, c', t) - ε_θ*(x_t, c, t) ||²

c is a caption naming the concept (``target.prompts``), x_t its latent after k DDIM steps as in ESD
(:mod:`erasekit.methods.esd`, whose trainer this one extends: parameter sets, the frozen teacher,
precision, data parallel and checkpoints are ESD's), r a retained prompt (the target's ``preserve``
and ``kept``, plus the ``retain_prompts`` list) with x_r sampled from r the same way, γ
``retain_weight``. ε_tgt is ``target="negative"`` ESD's negative guidance (AdvUnlearn's loss) or
``"guide"`` the frozen model's prediction for the target's guide (the sibling caption on the toy model).

The attacker (UnlearnDiffAtk's idea with P4D's teacher loss: make the erased model predict what
the original predicts for the concept) optimises ``attack_tokens`` prefix token embeddings in
front of c (``attack_space="tokens"``) or an additive perturbation of the conditioning the UNet
sees, bounded per token by ``conditioning_radius`` times the mean token-state norm
(``"conditioning"``), or a pool of each (``"both"``). It keeps ``adversaries`` of them per concept,
each warm-started from its last value (AdvUnlearn's "latest" init), and every ``attack_every``
iterations runs ``attack_steps`` Adam steps on them and on ``attack_restarts`` fresh random starts,
keeping the strongest (lowest attack loss). Every kept adversary is trained on in each step.

What trains (``parameter_set``): ESD's UNet sets, ``text-encoder`` (AdvUnlearn's best variant), or
``erasers``: Receler's (Huang et al., 2024, Eq. 3) low-rank erasers after every cross-attention layer,
trained here by this loss instead of Receler's, and saved as Receler modules.

Deviations from AdvUnlearn, deliberate: the inner attack is stronger (restarts, several adversaries,
the conditioning space); the plain caption is trained alongside the adversarial ones; retention latents
are sampled from the retained prompts by the frozen model, not taken from COCO images.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from erasekit.erasure import Erasure, model_signature
from erasekit.errors import ErasekitError
from erasekit.methods.esd import (
    PARAMETER_SET_ALIASES, PARAMETER_SETS, ESDConfig, ESDTrainer, sample_x_t, train_erasure,
)
from erasekit.models.attention import hooked_processor, remove_hooks
from erasekit.models.handle import TEXT_ENCODER_PREFIXES, Conditioning
from erasekit.models.tokens import candidate_token_ids, encode_slots, random_token_embeddings, token_template
from erasekit.targets import EraseTarget, guide_prompts, read_list
from erasekit.modules.receler import Eraser, eraser_state
from erasekit.training import generator_state, set_generator_state

ATTACK_SPACES = ("tokens", "conditioning", "both")
TEXT_SET = "text-encoder"
ERASER_SET = "erasers"
TARGETS = ("negative", "guide")


@dataclass
class AdvConfig(ESDConfig):
    """ESD's settings plus the inner attack and the retention term; defaults follow AdvUnlearn (landscape.md)."""

    parameter_set: str = field(default="xattn", metadata={
        "help": "What trains: ESD's UNet sets (xattn, noxattn, noxattn-linear, full, selfattn, xattn-strict), "
                "text-encoder (every text-encoder layer after the token and position embeddings, AdvUnlearn's choice) "
                "or erasers (Receler's low-rank erasers after each cross-attention layer, added; the UNet stays as it is).",
        "choices": (*PARAMETER_SETS, *PARAMETER_SET_ALIASES, TEXT_SET, ERASER_SET)})
    eraser_rank: int = field(default=128, metadata={
        "help": "parameter_set=erasers: the bottleneck width of each eraser (Receler's r).", "min": 1})
    erase_from: str | None = field(default=None, metadata={
        "help": "ESD's; not used by adv, which erases the targets' own prompts (set, it is refused)."})
    target: str = field(default="negative", metadata={
        "help": "What the concept's prompts are trained towards: negative (ESD's negative guidance, AdvUnlearn) or guide "
                "(the frozen model's prediction for the target's guide prompt).", "choices": TARGETS})
    attack_space: str = field(default="tokens", metadata={
        "help": "Where the inner attack searches: tokens (prefix input embeddings), conditioning (a bounded additive "
                "perturbation of the UNet's conditioning) or both (a pool of each).", "choices": ATTACK_SPACES})
    attack_tokens: int = field(default=1, metadata={"help": "Prefix tokens of a token-space adversary.", "min": 1})
    attack_steps: int = field(default=30, metadata={"help": "Adam steps of the inner attack per attack phase.", "min": 0})
    attack_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the inner attack.", "gt": 0})
    attack_every: int = field(default=1, metadata={"help": "Iterations between attack phases.", "min": 1})
    adversaries: int = field(default=1, metadata={"help": "Adversaries kept per concept and trained on in every step.", "min": 1})
    attack_restarts: int = field(default=0, metadata={
        "help": "Fresh random starts optimised in each attack phase beside the kept adversaries (the strongest are kept).",
        "min": 0})
    conditioning_radius: float = field(default=0.5, metadata={
        "help": "Conditioning-space adversaries: largest perturbation per token, relative to the mean token-state norm.",
        "gt": 0})
    plain_weight: float = field(default=1.0, metadata={"help": "Weight of the unattacked caption's erasure loss.", "min": 0})
    retain_weight: float = field(default=0.3, metadata={"help": "γ: weight of the retention loss on kept prompts.", "min": 0})
    retain_prompts: str = field(default="sentences", metadata={
        "help": "Generic prompts retained beside the targets' kept ones: a bundled anchor list name or a text file "
                "(empty: none)."})


CONFIG = AdvConfig
DATA_PARALLEL = True

PRESETS = {
    "paper": {},
    # SD 1.x/2.x/SDXL: AdvUnlearn's attack (30 steps at 1e-3) and ESD's loss, with what the toy runs showed
    # (docs/robustness.md): a pool of token and conditioning adversaries with restarts, retention at 1; ESD-x's
    # parameters (for nudity, ESD-u's: --set parameter_set=noxattn).
    "sd": {"iterations": 400, "attack_space": "both", "conditioning_radius": 1.0, "attack_tokens": 3, "adversaries": 3,
           "attack_restarts": 1, "attack_every": 2, "retain_weight": 1.0, "mixed_precision": "bf16", "sample_with": "frozen"},
    # the toy model: cross-attention at 3e-4 towards the guide, against 3 adversaries of both spaces (docs/robustness.md:
    # outside cross-attention at 3e-5 kept locality on the triangle but left the circle 81% drawn)
    "toy": {"iterations": 200, "learning_rate": 3e-4, "batch_size": 2, "ddim_steps": 10, "target": "guide",
            "attack_space": "both", "conditioning_radius": 1.0, "attack_tokens": 3, "attack_steps": 10, "attack_lr": 1e-2,
            "adversaries": 3, "attack_restarts": 1, "attack_every": 2, "retain_weight": 1.0, "retain_prompts": "",
            "sample_with": "frozen"},
}


def _check(config: AdvConfig, targets: list[EraseTarget]) -> None:
    if config.target not in TARGETS:
        raise ErasekitError(f"target must be one of {', '.join(TARGETS)}, not {config.target!r}")
    if config.attack_space not in ATTACK_SPACES:
        raise ErasekitError(f"attack_space must be one of {', '.join(ATTACK_SPACES)}, not {config.attack_space!r}")
    if config.attack_tokens < 1 or config.adversaries < 1 or config.attack_every < 1:
        raise ErasekitError("adv needs attack_tokens, adversaries and attack_every of at least 1")
    if config.attack_steps < 0 or config.attack_restarts < 0:
        raise ErasekitError("attack_steps and attack_restarts cannot be negative")
    if config.attack_lr <= 0 or config.conditioning_radius <= 0:
        raise ErasekitError("attack_lr and conditioning_radius must be positive")
    if config.erase_from is not None:
        raise ErasekitError("adv erases the targets' own prompts; erase_from is ESD's and is not used here")
    if config.target == "guide" and any(not t.guides for t in targets):
        raise ErasekitError("target=guide needs a guide for every concept; pass --guide (or --kind), or use target=negative")
    if any(t.guides and len(t.guides) not in (1, len(t.prompts)) for t in targets):
        raise ErasekitError("a target has neither one guide nor one per prompt")


def _mean_conditioning(conds: Conditioning) -> Conditioning:
    """The mean over the batch (a generic guide: the average of its prompts' text states), batch 1."""
    added = None if conds.added is None else {k: v.float().mean(0, keepdim=True).to(v.dtype) for k, v in conds.added.items()}
    return Conditioning(conds.hidden_states.float().mean(0, keepdim=True).to(conds.hidden_states.dtype), added)


class AdvTrainer(ESDTrainer):
    """One adversarial run: ESD's trainer with the attack phase and the retention loss added to each step."""

    name = "adv"

    def __init__(self, model, targets: list[EraseTarget], config: AdvConfig):
        _check(config, targets)
        self.erasers: dict[str, Eraser] = {}
        self.erasers_on, self.hook_name = True, f"adv-train-{id(self)}"
        super().__init__(model, [t.concept for t in targets], config)
        try:
            self._setup(model, targets, config)
        except BaseException:
            self.close()
            raise
        for path, eraser in self.erasers.items():  # last, once nothing can fail
            hooked_processor(self.layers[path]).output_hooks[self.hook_name] = self._eraser_hook(eraser)

    def _setup(self, model, targets: list[EraseTarget], config: AdvConfig) -> None:
        self.targets = targets
        self.trains_text = self.config.parameter_set == TEXT_SET
        self.attack_generator = torch.Generator().manual_seed(config.seed + 1)
        self._encoded: dict[str, Conditioning] = {}
        self.captions = [list(t.prompts) for t in targets]
        self.guides = [list(t.guides or []) for t in targets]
        erased = {p for captions in self.captions for p in captions}
        generic = read_list(config.retain_prompts, "anchors") if config.retain_prompts else []
        retained = [p for t in targets for p in (*t.preserve, *t.kept)] + generic
        self.retain = [p for p in dict.fromkeys(retained) if p not in erased] or [""]
        for prompt in {p for captions in self.captions for p in captions}:
            model.check_prompt_fits(prompt)
        self.space_names = {"tokens": ["tokens"], "conditioning": ["conditioning"], "both": ["tokens", "conditioning"]}[config.attack_space]
        self.candidates = candidate_token_ids(model) if "tokens" in self.space_names else None
        self.templates: dict[str, object] = {}
        # each concept's pool of (space, tensors); with attack_space=both the spaces alternate
        self.pool = [[self.fresh(i, a) for a in range(config.adversaries)] for i in range(len(targets))]
        self.attack_first, self.attack_last, self.replaced = [], [], 0

    # ------------------------------------------------------------------ what trains
    def candidate_parameters(self) -> dict[str, torch.nn.Parameter]:
        if self.config.parameter_set == ERASER_SET:  # new erasers, ``up`` at zero: at first the model is unchanged
            self.layers = self.model.cross_attention_layers()
            if not self.layers:
                raise ErasekitError("the model has no cross-attention layer for erasers; choose another parameter_set")
            generator = torch.Generator().manual_seed(self.config.seed)
            self.erasers = {path: Eraser(attn.to_out[0].out_features, self.config.eraser_rank, generator).to(self.device)
                            for path, attn in self.layers.items()}
            return self._eraser_parameters()
        return self.model.weight_parameters()  # the UNet's and the text encoders' (text_encoder.<name>)

    def select_parameter_names(self) -> list[str]:
        if self.config.parameter_set == ERASER_SET:
            return list(self._eraser_parameters())
        if self.config.parameter_set == TEXT_SET:  # the token and position tables stay: soft prompts bypass them anyway
            return [name for name in self.model.weight_parameters()
                    if name.startswith(TEXT_ENCODER_PREFIXES) and ".embeddings." not in name]
        return super().select_parameter_names()

    def _eraser_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {f"{path}.{name}": p for path, eraser in self.erasers.items() for name, p in eraser.named_parameters()}

    def parameter_set_name(self) -> str:
        if self.config.parameter_set in (TEXT_SET, ERASER_SET):
            return self.config.parameter_set
        return super().parameter_set_name()

    def _eraser_hook(self, eraser: Eraser):
        def hook(attn, out):
            if not self.erasers_on:
                return out
            with torch.autocast(out.device.type, enabled=False):  # erasers compute in float32, as Receler's
                return out + eraser(out.float()).to(out.dtype)

        return hook

    @contextlib.contextmanager
    def frozen(self):
        """The original model: ESD's swap of the trained values, and the erasers off."""
        with super().frozen():
            on, self.erasers_on = self.erasers_on, False
            try:
                yield
            finally:
                self.erasers_on = on

    def erasure(self, deltas: dict[str, torch.Tensor], config: dict, info: dict) -> Erasure:
        if not self.erasers:
            return super().erasure(deltas, config, info)
        names = [f"{path}.to_out.0.weight" for path in self.layers]
        return Erasure(method=self.name, concepts=self.concepts, base_model=self.model.name, config=config, modules=deltas,
                       module_type="receler", base_signature=model_signature(self.model, names), info=info)

    def deltas(self) -> dict[str, torch.Tensor]:
        """The weight deltas; with erasers, the trained erasers (Receler's saved form)."""
        return eraser_state(self.erasers) if self.erasers else super().deltas()

    def close(self) -> None:
        super().close()
        if self.erasers:
            remove_hooks(self.layers, self.hook_name)

    # ------------------------------------------------------------------ conditioning
    def encoded(self, prompt: str) -> Conditioning:
        """The original model's conditioning of ``prompt`` (the frozen text encoder's), cached."""
        if prompt not in self._encoded:
            with torch.no_grad(), self.frozen():
                self._encoded[prompt] = self.model.encode([prompt]).detach()
        return self._encoded[prompt]

    def live(self, prompt: str) -> Conditioning:
        """The conditioning the trained model sees: through the trained text encoder (with gradients) when it trains."""
        return self.model.encode([prompt]) if self.trains_text else self.encoded(prompt)

    def guide_conditioning(self, index: int, caption: int) -> Conditioning:
        guides = self.guides[index]
        guide = guides[caption] if len(guides) > 1 else guides[0]
        key = "\x00".join(guide_prompts(guide))
        if key not in self._encoded:
            with torch.no_grad(), self.frozen():
                self._encoded[key] = _mean_conditioning(self.model.encode(list(guide_prompts(guide)))).detach()
        return self._encoded[key]

    def template(self, caption: str):
        if caption not in self.templates:
            self.templates[caption] = token_template(self.model, caption, prefix=self.config.attack_tokens)
        return self.templates[caption]

    def fresh(self, index: int, number: int) -> tuple[str, list[torch.Tensor]]:
        """The ``number``-th new adversary of a concept: random prefix tokens' input embeddings (one tensor per text
        encoder), or a small random perturbation of the conditioning."""
        space = self.space_names[number % len(self.space_names)]
        if space == "tokens":
            return space, [e.to(self.device) for e in random_token_embeddings(
                self.model, self.config.attack_tokens, self.candidates, self.attack_generator)]
        states = self.encoded(self.captions[index][0]).hidden_states
        start = torch.randn(states.shape[1:], generator=self.attack_generator) * 0.01
        return space, [start.to(self.device)]

    def adversarial(self, adversaries: list[tuple[str, list[torch.Tensor]]], caption: str) -> Conditioning:
        """The conditioning of ``caption`` under each adversary (batch = adversaries), differentiable in them."""
        plain = radius = None  # (only conditioning-space adversaries need them)
        conds = []
        for space, adversary in adversaries:
            if space == "tokens":
                conds.append(encode_slots(self.model, self.template(caption), [e.to(self.model.dtype) for e in adversary]))
            else:
                if plain is None:
                    plain = self.live(caption)
                    radius = self.config.conditioning_radius * float(self.encoded(caption).hidden_states.float().norm(dim=-1).mean())
                delta = adversary[0]
                norms = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta = delta * (radius / norms).clamp(max=1.0)  # projected onto the radius ball, token by token
                conds.append(plain.with_hidden_states(plain.hidden_states + delta.unsqueeze(0).to(plain.hidden_states.dtype)))
        return Conditioning.cat(conds)

    # ------------------------------------------------------------------ one step
    def teacher(self, x_t: torch.Tensor, t: torch.Tensor, conds: list[Conditioning]) -> list[torch.Tensor]:
        """The frozen model's predictions at x_t under each conditioning (batch 1 each), without gradients."""
        batch = x_t.shape[0]
        with torch.no_grad(), self.frozen(), self.autocast():
            eps = self.model.predict_noise(torch.cat([x_t] * len(conds)), t.repeat(len(conds)),
                                           Conditioning.cat([c.repeat(batch) for c in conds]))
        return list(eps.float().chunk(len(conds)))

    def erase_target(self, x_t, t, index: int, caption: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_tgt, the frozen model's prediction for the caption itself: the attacker's goal)."""
        cond = self.encoded(self.captions[index][caption])
        if self.config.target == "guide":
            eps_concept, eps_guide = self.teacher(x_t, t, [cond, self.guide_conditioning(index, caption)])
            return eps_guide, eps_concept
        eps_concept, eps_empty = self.teacher(x_t, t, [cond, self.uncond])
        base = eps_concept if self.config.target_base == "concept" else eps_empty
        return base - self.config.negative_guidance * (eps_concept - eps_empty), eps_concept

    def attack(self, x_t, t, index: int, caption: int, goal: torch.Tensor) -> None:
        """One attack phase on the current model: the kept adversaries plus fresh restarts, the strongest kept."""
        config, batch = self.config, x_t.shape[0]
        text = self.captions[index][caption]
        kept = len(self.pool[index])
        phase = len(self.attack_first)  # (restarts alternate the spaces from phase to phase with attack_space=both)
        pool = self.pool[index] + [self.fresh(index, kept + r + phase) for r in range(config.attack_restarts)]
        variables = [(space, [e.detach().clone().requires_grad_(True) for e in tensors]) for space, tensors in pool]
        flat = [e for _, tensors in variables for e in tensors]
        optimizer = torch.optim.Adam(flat, lr=config.attack_lr)
        goal = goal.repeat(len(pool), 1, 1, 1)
        x_many, t_many = x_t.repeat(len(pool), 1, 1, 1), t.repeat(len(pool))
        losses = torch.zeros(len(pool))
        for step in range(config.attack_steps + 1):
            cond = self.adversarial(variables, text).repeat(batch)
            with self.autocast():
                prediction = self.model.predict_noise(x_many, t_many, cond).float()
            per_adversary = (prediction - goal).square().flatten(1).mean(1).view(len(pool), batch).mean(1)
            losses = torch.tensor(self.parallel.mean(per_adversary.detach().cpu().tolist()))
            if step == 0:
                self.attack_first.append(float(losses[:kept].mean()))
            if step == config.attack_steps:
                break  # the last evaluation only ranks them
            optimizer.zero_grad()
            per_adversary.sum().backward(inputs=flat)  # (the trained weights' gradients are the outer step's)
            self.parallel.average_gradients(flat)
            optimizer.step()
        self.attack_last.append(float(losses.min()))
        strongest = sorted(sorted(range(len(pool)), key=lambda a: float(losses[a]))[:config.adversaries])
        self.replaced += sum(1 for a in strongest if a >= kept)
        self.pool[index] = [(variables[a][0], [e.detach() for e in variables[a][1]]) for a in strongest]

    def step(self) -> float:
        config = self.config
        index, steps, t, noise = self.draw()
        caption = int(torch.randint(len(self.captions[index]), (1,), generator=self.generator))
        kept = int(torch.randint(len(self.retain), (1,), generator=self.generator))
        rows = self.parallel.rows
        t, noise = t[rows].to(self.device), noise[rows]
        batch = self.parallel.local_batch
        text, retained = self.captions[index][caption], self.retain[kept]
        sampler = self.frozen() if config.sample_with == "frozen" else contextlib.nullcontext()
        with torch.no_grad(), sampler, self.autocast():
            x_t = sample_x_t(self.model, self.live(text).repeat(batch), self.live("").repeat(batch), steps, noise,
                             ddim_steps=config.ddim_steps, guidance=config.start_guidance, scheduler=self.scheduler).to(self.dtype)
        with torch.no_grad(), self.frozen(), self.autocast():
            x_r = sample_x_t(self.model, self.encoded(retained).repeat(batch), self.uncond.repeat(batch), steps, noise,
                             ddim_steps=config.ddim_steps, guidance=config.start_guidance, scheduler=self.scheduler).to(self.dtype)
        target, goal = self.erase_target(x_t, t, index, caption)
        if config.attack_steps > 0 and self.iteration % config.attack_every == 0:
            self.attack(x_t, t, index, caption, goal)
        pool = self.pool[index]
        (retain_goal,) = self.teacher(x_r, t, [self.encoded(retained)])
        # the trained model's side, through the trained text encoder when it trains
        conds = Conditioning.cat([self.live(text).repeat(batch), self.adversarial(pool, text).repeat(batch),
                                  self.live(retained).repeat(batch)])
        weights = torch.tensor([config.plain_weight] + [1.0] * len(pool) + [config.retain_weight], device=self.device)
        with self.autocast():
            prediction = self.model.predict_noise(torch.cat([x_t] * (1 + len(pool)) + [x_r]), t.repeat(2 + len(pool)), conds).float()
        goals = torch.cat([target] * (1 + len(pool)) + [retain_goal])
        per_part = (prediction - goals).square().flatten(1).mean(1).view(2 + len(pool), batch).mean(1)
        loss = (weights * per_part).sum()
        self.precision.step(loss, self.optimizer, sync=lambda: self.parallel.average_gradients(self.parameters.values()))
        value = self.parallel.mean([float(loss.detach())])[0]
        self.iteration += 1
        self.losses.append(value)
        self.concept_counts[index] += 1
        return value

    # ------------------------------------------------------------------ record and resume
    def summary(self) -> dict:
        info = super().summary()
        phases = len(self.attack_first)
        info.update({
            "attack_phases": phases, "restarts_kept": self.replaced, "retained_prompts": len(self.retain),
            # the attacker's loss at the start and the end of the phases: how much it still finds to exploit
            "attack_loss_first": [round(sum(v) / len(v), 6) for v in (self.attack_first[:10], self.attack_first[-10:]) if v],
            "attack_loss_last": [round(sum(v) / len(v), 6) for v in (self.attack_last[:10], self.attack_last[-10:]) if v],
            "targets": [t.describe() for t in self.targets],
        })
        return info

    def checkpoint_key(self) -> dict:
        key = super().checkpoint_key()
        key.update({"method": "adv", "targets": [dataclasses.asdict(t) for t in self.targets]})
        return key  # ESD's "base" holds the whole teacher, the layers the erasers sit on included

    def training_state(self):
        tensors, state = super().training_state()
        for i, pool in enumerate(self.pool):
            for a, (_, adversary) in enumerate(pool):
                for k, e in enumerate(adversary):
                    tensors[f"adversary.{i}.{a}.{k}"] = e
        state.update({"attack_generator": generator_state(self.attack_generator),
                      "spaces": [[space for space, _ in pool] for pool in self.pool],
                      "attack_first": self.attack_first, "attack_last": self.attack_last, "replaced": self.replaced})
        return tensors, state

    def load_state(self, step, tensors, state) -> None:
        super().load_state(step, tensors, state)
        for i, pool in enumerate(self.pool):
            for a in range(len(pool)):
                space = state["spaces"][i][a]
                count = len(self.model.text_encoders) if space == "tokens" else 1
                pool[a] = (space, [tensors[f"adversary.{i}.{a}.{k}"].to(self.device) for k in range(count)])
        set_generator_state(self.attack_generator, state["attack_generator"])
        self.attack_first, self.attack_last = list(state["attack_first"]), list(state["attack_last"])
        self.replaced = int(state["replaced"])


def erase(model, targets: list[EraseTarget], config: AdvConfig | None = None, progress: bool = True) -> Erasure:
    """Erase the targets' concepts by adversarial training (see the module docstring); the model is returned unchanged."""
    config = config or AdvConfig()
    if not targets:
        raise ErasekitError("no concept to erase; pass at least one concept")
    return train_erasure(AdvTrainer, model, list(targets), config, progress)
