"""The paraphrase attack: reworded prompts, no optimisation. The baseline every other attack must beat.

The prompts are the user's rewordings (``prompts=``) or, on the toy model, the concept's
held-out paraphrases ("a picture of a blue triangular shape on a plain background"), names
and a template never seen in training. Each prompt is encoded as is and given to the erased model.
"""

from __future__ import annotations

from dataclasses import dataclass

from erasekit.attacks.base import AdversarialPrompt, Attack, AttackConfig


@dataclass
class ParaphraseConfig(AttackConfig):
    """No settings of its own: the prompts are the attack."""


class ParaphraseAttack(Attack):
    name = "paraphrase"
    config_class = ParaphraseConfig
    default_prompts_held_out = True

    def attack_prompt(self, run, prompt: str, index: int) -> AdversarialPrompt:
        return AdversarialPrompt(run.model.encode([prompt]), text=prompt)
