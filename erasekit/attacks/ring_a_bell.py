"""Ring-A-Bell (Tsai, Hsu et al., ICLR 2024): a concept vector in text-embedding space.

The concept vector is the mean difference of the text embeddings (full token states) of N
prompts with and without the concept (landscape.md, B3)::

    c = (1/N) Σ_i [ E(p_i⁺) - E(p_i⁻) ]

and the target for a prompt p is Ẽ = E(p) + η c.

* ``variant="soft"``: Ẽ is given to the UNet as it is (RECE's reproduction; an embedding-space bound);
* ``variant="genetic"`` (the paper): a genetic search over ``tokens`` discrete tokens whose
  embedding is closest to Ẽ, fitness ||E(tokens) - Ẽ||²: population 200, 3000 generations, the
  better half kept, single-point crossover with probability 0.5, one random token mutated with
  probability 0.25. The budget knobs are ``population`` and ``generations`` (``steps``).

Pairs: ``pairs`` ([[with, without], ...]); by default on the toy model captions of the concept and
the same captions with another shape (colour, style); elsewhere each attacked prompt and that
prompt with the concept's words removed.

On SDXL E(p) is the whole conditioning: the concatenated token states of both encoders and the
pooled ``text_embeds``. The concept vector has both parts, η c is added to both, and the genetic
fitness sums the squared distances of both (the searched tokens go through both encoders, one
id per slot, as their vocabulary is shared).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from erasekit.attacks.base import AdversarialPrompt, Attack, AttackConfig
from erasekit.models.tokens import candidate_token_ids, encode_ids, template_text, token_template
from erasekit.errors import ErasekitError
from erasekit.models.handle import Conditioning


@dataclass
class RingABellConfig(AttackConfig):
    """Ring-A-Bell's defaults (landscape.md, B3): η = 3, K = 16 tokens, population 200, 3000 generations."""

    steps_field: ClassVar[str] = "generations"

    variant: str = field(default="genetic", metadata={
        "help": "genetic: a search over discrete tokens (the paper); soft: E(p) + η c given to the UNet as is.",
        "choices": ("genetic", "soft")})
    eta: float = field(default=3.0, metadata={"help": "η: how much of the concept vector is added to the prompt's embedding."})
    tokens: int = field(default=16, metadata={"help": "K: discrete tokens of the searched prompt.", "min": 1})
    population: int = field(default=200, metadata={"help": "Candidate prompts per generation of the genetic search.", "min": 4})
    generations: int = field(default=3000, metadata={"help": "Generations of the genetic search (set by --budget steps=N).", "min": 0})
    crossover: float = field(default=0.5, metadata={"help": "Probability of single-point crossover of two parents.", "min": 0, "max": 1})
    mutation: float = field(default=0.25, metadata={"help": "Probability that one random token of a child is mutated.", "min": 0, "max": 1})
    pairs: list | None = field(default=None, metadata={
        "help": "Prompt pairs [[with the concept, the same without], ...] for the concept vector (none: derived from the prompts)."})


def toy_pairs(concept: str, count: int = 12) -> list[list[str]]:
    """Toy captions with the concept and the same caption with another value of its attribute."""
    from erasekit.toy import world

    attribute, value = world.parse_concept(concept)
    others = [v for v in world.ATTRIBUTES[attribute] if v != value]
    pairs = []
    for k in range(count):
        chosen = {"shape": world.SHAPES[k % 6], "color": world.COLOR_NAMES[(k + 1) % 6], "style": world.STYLES[k % 4]}
        positive = {**chosen, attribute: value}
        negative = {**chosen, attribute: others[k % len(others)]}
        pairs.append([world.canonical_prompt(positive["shape"], positive["color"], positive["style"]),
                      world.canonical_prompt(negative["shape"], negative["color"], negative["style"])])
    return pairs


def prompt_pairs(concept: str, prompts: list[str]) -> list[list[str]]:
    """Each prompt that names the concept, with and without it."""
    pattern = re.compile(re.escape(concept), re.IGNORECASE)
    pairs = [[p, re.sub(r"\s+", " ", pattern.sub("", p)).strip(" ,")] for p in prompts if pattern.search(p)]
    if not pairs:
        raise ErasekitError(
            f"no prompt names {concept!r}, so there are no pairs for the concept vector; pass pairs=[[with, without], ...] "
            "in the budget or prompts that contain the concept"
        )
    return pairs


class RingABellAttack(Attack):
    name = "ring-a-bell"
    config_class = RingABellConfig

    def prepare(self, run) -> None:
        config, model = self.config, run.model
        if config.variant not in ("genetic", "soft"):
            raise ErasekitError(f"variant={config.variant!r}; Ring-A-Bell has variants 'genetic' and 'soft'")
        if config.population < 4 or config.generations < 0 or config.tokens < 1:
            raise ErasekitError("ring-a-bell needs population >= 4, generations >= 0 and tokens >= 1")
        if config.pairs:
            pairs = config.pairs
        elif model.kind == "toy":
            pairs = toy_pairs(run.concept)
        else:
            pairs = prompt_pairs(run.concept, run.prompts)
        if any(len(pair) != 2 for pair in pairs):
            raise ErasekitError("each Ring-A-Bell pair is [prompt with the concept, prompt without]; fix pairs")
        positive = model.encode([p for p, _ in pairs])
        negative = model.encode([n for _, n in pairs])
        self.concept_vector = (positive.hidden_states - negative.hidden_states).mean(dim=0, keepdim=True)
        self.pooled_vector = None  # SDXL: the concept vector's part in the pooled text embedding
        if positive.added is not None and "text_embeds" in positive.added:
            self.pooled_vector = (positive.added["text_embeds"] - negative.added["text_embeds"]).mean(dim=0, keepdim=True)
        self.candidates = candidate_token_ids(model)
        self.pairs = pairs

    @torch.no_grad()
    def _fitness(self, model, template, population: torch.Tensor, target: Conditioning, chunk: int = 256) -> torch.Tensor:
        """||E(tokens) - Ẽ||² for each candidate (on SDXL the token states' and the pooled embedding's parts summed)."""
        scores = []
        for start in range(0, len(population), chunk):
            ids = template.input_ids.unsqueeze(0).repeat(len(population[start : start + chunk]), 1)
            ids[:, template.slots] = population[start : start + chunk]
            mask = template.attention_mask.unsqueeze(0).repeat(len(ids), 1)
            encoded = encode_ids(model, ids, mask)
            score = (encoded.hidden_states.float() - target.hidden_states.float()).square().sum(dim=(1, 2))
            if self.pooled_vector is not None:
                pooled = encoded.added["text_embeds"].float() - target.added["text_embeds"].float()
                score = score + pooled.square().sum(dim=1)
            scores.append(score.cpu())
        return torch.cat(scores)

    def attack_prompt(self, run, prompt: str, index: int) -> AdversarialPrompt:
        model, config = run.model, self.config
        cond = model.encode([prompt])
        target = cond.with_hidden_states(cond.hidden_states + config.eta * self.concept_vector.to(cond.hidden_states.dtype))
        if self.pooled_vector is not None:
            pooled = cond.added["text_embeds"] + config.eta * self.pooled_vector.to(cond.added["text_embeds"].dtype)
            target = Conditioning(target.hidden_states, {**cond.added, "text_embeds": pooled})
        if config.variant == "soft":
            return AdversarialPrompt(target, text=None, info={"variant": "soft", "eta": config.eta})

        generator = run.generator(index)
        template = token_template(model, "", prefix=config.tokens)
        candidates = self.candidates

        def random_tokens(shape):
            return candidates[torch.randint(len(candidates), shape, generator=generator)]

        population = random_tokens((config.population, config.tokens))
        fitness = self._fitness(model, template, population, target)
        keep = config.population // 2
        generations_run = 0
        for _ in tqdm(range(config.generations), desc="ring-a-bell", disable=not run.progress, leave=False):
            order = fitness.argsort()
            parents, parent_fitness = population[order[:keep]], fitness[order[:keep]]
            count = config.population - keep
            first = parents[torch.randint(keep, (count,), generator=generator)]
            second = parents[torch.randint(keep, (count,), generator=generator)]
            points = torch.randint(1, config.tokens, (count, 1), generator=generator) if config.tokens > 1 else torch.ones(count, 1, dtype=torch.long)
            crossed = torch.rand(count, 1, generator=generator) < config.crossover
            positions = torch.arange(config.tokens).unsqueeze(0)
            children = torch.where(crossed & (positions >= points), second, first)
            mutate = torch.rand(count, generator=generator) < config.mutation
            where = torch.randint(config.tokens, (count,), generator=generator)
            new_tokens = random_tokens((count,))
            children[mutate, where[mutate]] = new_tokens[mutate]
            population = torch.cat([parents, children])
            fitness = torch.cat([parent_fitness, self._fitness(model, template, children, target)])
            generations_run += 1
            if run.out_of_time():
                break
        best = int(fitness.argmin())
        hard = template.with_slot_ids(population[best])
        with torch.no_grad():
            adversarial = encode_ids(model, hard.input_ids, hard.attention_mask)
        if cond.added is not None and adversarial.added is None:
            adversarial = cond.with_hidden_states(adversarial.hidden_states)
        info = {"variant": "genetic", "eta": config.eta, "generations_run": generations_run, "best_fitness": float(fitness[best]),
                "pairs": len(self.pairs)}
        return AdversarialPrompt(adversarial, text=template_text(model, hard), tensors={"token_ids": population[best]}, info=info)
