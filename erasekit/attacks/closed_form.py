"""The closed-form attack: RECE's adversarial embedding (Gong et al., ECCV 2024), used as an attack.

For the prompt's text states C, every token row c becomes (research notes, esd_uce_rece.md, 3.1)::

    c' = (λ I + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W⁰_l) c

with W' the erased model's and W⁰ the original model's cross-attention to_k/to_v: the embedding
for which the erased model emits the original model's keys and values of the prompt. The math
is RECE's own :func:`erasekit.methods.rece.closed_form_adversarial_embedding`, not a second copy.
It is an embedding-space (white-box) attack on erasures that edit to_k/to_v (UCE, RECE, ESD-x).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from erasekit.attacks.base import AdversarialPrompt, Attack, AttackConfig
from erasekit.errors import ErasekitError


@dataclass
class ClosedFormConfig(AttackConfig):
    """RECE's settings; λ is ``regular_scale`` (0.1 for nudity and easy objects, 1e-3 for artists)."""

    regular_scale: float = field(default=0.1, metadata={
        "help": "λ of the closed form: the pull of the adversarial embedding towards zero (smaller for artists).", "min": 0})
    edit_keys: bool = field(default=True, metadata={"help": "Derive the embedding through to_k as well as to_v."})


class ClosedFormAttack(Attack):
    name = "closed-form"
    config_class = ClosedFormConfig

    def prepare(self, run) -> None:
        from erasekit.methods.uce import key_value_weights

        names = set(key_value_weights(run.model, original=True, edit_keys=self.config.edit_keys))
        touched = {name for erasure in run.erasures for name in getattr(erasure, "deltas", {})}
        if run.erasures and not names & touched:
            raise ErasekitError(
                "the closed-form attack needs an erasure that edits cross-attention to_k/to_v weights (uce, rece, esd-x); "
                "use another attack (soft-prompt, p4d, textual-inversion) for this erasure"
            )

    def attack_prompt(self, run, prompt: str, index: int) -> AdversarialPrompt:
        from erasekit.methods.rece import closed_form_adversarial_embedding

        cond = run.model.encode([prompt])
        adversarial = closed_form_adversarial_embedding(
            run.model, cond, regular_scale=self.config.regular_scale, edit_keys=self.config.edit_keys
        )
        return AdversarialPrompt(adversarial, text=None, info={"regular_scale": self.config.regular_scale})
