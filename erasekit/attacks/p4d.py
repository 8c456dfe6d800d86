"""P4D, Prompting4Debugging (Chin et al., ICML 2024).

Find a prompt P* for which the erased model θ* denoises like the unerased model θ does on the
original prompt P (landscape.md, B2)::

    min_{P*}  E_t || ε_θ*(z_t, E(P*), t) - ε_θ(z_t, E(P), t) ||²

with z_t taken from the unerased model's sampling trajectory for P. The tokens of P* are
continuous embeddings projected to the nearest vocabulary tokens in every forward pass, the
gradient passed straight through (PEZ), so P* is always a real prompt.

* ``variant="N"`` (P4D-N): P* is ``tokens`` (16) fresh learnable tokens;
* ``variant="K"`` (P4D-K): a learnable token after every ``insert_every`` (3) tokens of P.

Defaults are the paper's: 3000 AdamW steps, lr 0.1, weight decay 0.1, and every 50 steps the
current prompt is tried on the erased model and the attack stops once the judge sees the concept.

On SDXL each learnable token has an embedding in both text encoders (768 and 1280 wide, started
from the same random token); both are optimised, the loss reaching them through the token states
and the pooled ``text_embeds``, and each slot is projected to one token id for both encoders
(their vocabulary is shared), so P* is still one real prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from erasekit.attacks.base import AdversarialPrompt, Attack, AttackConfig
from erasekit.models.tokens import (
    TokenProjector, candidate_token_ids, encode_ids, encode_slots, random_token_embeddings, template_text,
    token_template,
)
from erasekit.errors import ErasekitError
from erasekit.models.handle import Conditioning
from erasekit.utils import sample_seed


@dataclass
class P4DConfig(AttackConfig):
    """P4D's defaults (landscape.md, B2)."""

    variant: str = field(default="N", metadata={
        "help": "N: fresh learnable tokens only; K: a learnable token after every insert_every tokens of the prompt.",
        "choices": ("N", "K")})
    tokens: int = field(default=16, metadata={"help": "Learnable tokens of P4D-N.", "min": 1})
    insert_every: int = field(default=3, metadata={"help": "P4D-K's K: a learnable token after every K prompt tokens.", "min": 1})
    steps: int = field(default=3000, metadata={"help": "AdamW steps per prompt.", "min": 1})
    learning_rate: float = field(default=0.1, metadata={"help": "AdamW learning rate of the token embeddings.", "gt": 0})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the token embeddings.", "min": 0})
    check_every: int = field(default=50, metadata={
        "help": "Try the current prompt on the erased model every this many steps and stop on success (0: never).", "min": 0})
    batch: int = field(default=1, metadata={"help": "Trajectory points per optimiser step.", "min": 1})


class P4DAttack(Attack):
    name = "p4d"
    config_class = P4DConfig

    def prepare(self, run) -> None:
        if self.config.variant not in ("N", "K"):
            raise ErasekitError(f"variant={self.config.variant!r}; P4D has variants 'N' and 'K'")
        if self.config.steps < 1 or self.config.batch < 1:
            raise ErasekitError("p4d needs steps >= 1 and batch >= 1")
        self.candidates = candidate_token_ids(run.model)
        self.projector = TokenProjector(run.model, self.candidates)

    def _trajectory(self, run, prompt: str, index: int):
        """(z_t, t, ε_θ(z_t, E(P), t)) at every step of the unerased model's sampling of P."""
        model, points = run.model, []
        cond, uncond = model.encode([prompt]), run.uncond()

        def record(x, t, cond, uncond, guidance):
            both = model.predict_noise(torch.cat([x, x]), t, Conditioning.cat([uncond, cond]))
            eps_uncond, eps_cond = both.chunk(2)
            points.append((x.detach(), int(t), eps_cond.detach()))
            return eps_uncond + guidance * (eps_cond - eps_uncond)

        seed = sample_seed(run.seed, index, 2000)
        scheduler = model.make_scheduler()
        scheduler.set_timesteps(self.config.inference_steps or model.default_steps, device=model.device)
        latents = model.initial_latents(1, torch.Generator().manual_seed(seed), scheduler=scheduler)
        with torch.no_grad(), model.erasures_off():
            model.sample(cond, uncond=uncond, guidance=self.config.guidance, num_inference_steps=self.config.inference_steps,
                         latents=latents, noise_fn=record)
        return points

    def _hard(self, run, template, embeddings):
        with torch.no_grad():
            ids = self.projector.straight_through(embeddings)[1]
            hard = template.with_slot_ids(ids)
            return encode_ids(run.model, hard.input_ids, hard.attention_mask), template_text(run.model, hard), ids

    def attack_prompt(self, run, prompt: str, index: int) -> AdversarialPrompt:
        model, config = run.model, self.config
        generator = run.generator(index)
        points = self._trajectory(run, prompt, index)
        if config.variant == "N":
            template = token_template(model, "", prefix=config.tokens)
        else:
            template = token_template(model, prompt, insert_every=config.insert_every)
        embeddings = [e.requires_grad_(True) for e in random_token_embeddings(model, len(template.slots), self.candidates, generator)]
        optimizer = torch.optim.AdamW(embeddings, lr=config.learning_rate, weight_decay=config.weight_decay)
        losses, stopped_by, steps_run = [], None, 0
        for step in tqdm(range(config.steps), desc="p4d", disable=not run.progress, leave=False):
            picks = torch.randint(len(points), (config.batch,), generator=generator).tolist()
            x = torch.cat([points[k][0] for k in picks])
            t = torch.tensor([points[k][1] for k in picks], device=x.device)
            target = torch.cat([points[k][2] for k in picks])
            used = self.projector.straight_through(embeddings)[0]
            cond = encode_slots(model, template, [e.to(model.dtype) for e in used]).repeat(config.batch)
            loss = F.mse_loss(model.predict_noise(x, t, cond).float(), target.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps_run = step + 1
            if config.check_every and steps_run % config.check_every == 0 and run.check(self._hard(run, template, embeddings)[0], index):
                stopped_by = "success"
                break
            if run.out_of_time():
                stopped_by = "time budget"
                break
        cond, text, ids = self._hard(run, template, embeddings)
        info = {"variant": config.variant, "steps_run": steps_run, "stopped_by": stopped_by,
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
        return AdversarialPrompt(cond, text=text, tensors={"token_ids": ids, "template_ids": template.input_ids}, info=info)
