"""Red-teaming attacks on erased models: one file per attack, one entry point.

    from erasekit.attacks import ATTACKS, run_attack
    result = run_attack(model, [erasure], concept="triangle", attack="soft-prompt", out="runs/atk")
    result["success_rate"]

``model`` is the **unerased** base model; the attack applies the ``erasures`` itself and takes
them all off (``model.erasures_off()``) where it needs the unerased model (target images,
trajectories), and leaves the model as it found it. See :mod:`erasekit.attacks.base` for what every
attack shares (budget, judge, resume, result.json, grid).

=====================  ==========================================================  ============================
name                   what it does                                                 file
=====================  ==========================================================  ============================
``paraphrase``         reworded prompts, no optimisation (the baseline)             ``paraphrase.py``
``soft-prompt``        UnlearnDiffAtk's loss, prefix embeddings kept (soft)          ``soft_prompt.py``
``unlearndiff``        UnlearnDiffAtk: the same, projected to real tokens (hard)    ``soft_prompt.py``
``ring-a-bell``        concept vector; genetic token search (or ``variant=soft``)   ``ring_a_bell.py``
``p4d``                match the unerased model's noise, projected tokens           ``p4d.py``
``closed-form``        RECE's closed-form adversarial embedding                     ``closed_form.py``
``textual-inversion``  CCE: a new token learned on the erased model                 ``textual_inversion.py``
=====================  ==========================================================  ============================
"""

from __future__ import annotations

import dataclasses

from erasekit.attacks.base import (
    AdversarialPrompt, Attack, AttackConfig, AttackRun, build_attack_config, execute, load_adversarial,
)
from erasekit.attacks.closed_form import ClosedFormAttack, ClosedFormConfig
from erasekit.attacks.p4d import P4DAttack, P4DConfig
from erasekit.attacks.paraphrase import ParaphraseAttack, ParaphraseConfig
from erasekit.attacks.ring_a_bell import RingABellAttack, RingABellConfig
from erasekit.attacks.soft_prompt import SoftPromptAttack, SoftPromptConfig, UnlearnDiffAttack
from erasekit.attacks.textual_inversion import TextualInversionAttack, TextualInversionConfig
from erasekit.config import describe
from erasekit.errors import ErasekitError
from erasekit.eval.judges import NudeNetJudge, ToyJudge

# name -> attack class (its ``config_class`` holds the defaults; ``config_defaults`` a name's own overrides)
ATTACKS: dict[str, type[Attack]] = {
    "paraphrase": ParaphraseAttack,
    "soft-prompt": SoftPromptAttack,
    "unlearndiff": UnlearnDiffAttack,
    "ring-a-bell": RingABellAttack,
    "p4d": P4DAttack,
    "closed-form": ClosedFormAttack,
    "textual-inversion": TextualInversionAttack,
}


def make_attack(attack: str | Attack, budget: dict | None = None, source: str = "budget") -> Attack:
    """An attack instance by name, its config from the defaults and ``budget`` (an Attack instance is used as is).

    ``source`` names the budget's origin in error messages (``--budget`` on the command line).
    """
    if isinstance(attack, Attack):
        if budget:
            raise ErasekitError("pass budget= with an attack name, or set the config of the Attack instance you pass")
        return attack
    name = str(attack).strip().lower()
    if name not in ATTACKS:
        raise ErasekitError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
    cls = ATTACKS[name]
    return cls(build_attack_config(cls.config_class, budget, cls.config_defaults, source=source, name=name))


def describe_attack(attack: str) -> str:
    """The attack's budget keys (type, default, help), as ``--help`` shows them."""
    name = str(attack).strip().lower()
    if name not in ATTACKS:
        raise ErasekitError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
    cls = ATTACKS[name]
    text = describe(cls.config_class, {name: cls.config_defaults} if cls.config_defaults else None, flag="--budget",
                    presets_title=f"defaults {name} overrides")
    steps_field = getattr(cls.config_class, "steps_field", None)
    if steps_field:
        text += f"\n\n--budget steps=N sets {steps_field}."
    elif "steps" not in {f.name for f in dataclasses.fields(cls.config_class)}:
        text += f"\n\n{name} does not optimise: --budget steps=N is accepted and ignored."
    return text


def run_attack(model, erasures, concept: str, attack: str | Attack = "soft-prompt", out=None, prompts=None, judge=None,
               budget: dict | None = None, seed: int = 0, progress: bool = True, force: bool = False) -> dict:
    """Attack ``erasures`` of ``model`` (the unerased base) on ``concept``; returns the result dict.

    ``prompts``: a list or a file (default on the toy model: the concept's canonical prompts; held-out
    paraphrases for ``paraphrase``). ``judge(images, concept) -> list[bool]``, or a spec such as
    ``"classifier:PATH"`` or ``"clip:PATH"`` (:func:`erasekit.eval.judges.make_judge`; default: the toy
    classifier on the toy model, NudeNet for "nudity"). ``budget`` overrides the attack's config
    (``steps``, ``prompts``, ``samples``, ``time_s``, or any field of its config). With ``out`` the
    result is written to ``out/result.json`` with ``out/grid.png`` and per-prompt files, and a rerun
    skips prompts already finished. ``force`` applies erasures made for another base model.
    """
    return execute(make_attack(attack, budget), model, erasures, concept, prompts=prompts, judge=judge, seed=seed, out=out,
                   progress=progress, force=force)


__all__ = [
    "ATTACKS", "AdversarialPrompt", "Attack", "AttackConfig", "AttackRun", "ClosedFormAttack", "ClosedFormConfig",
    "NudeNetJudge", "P4DAttack", "P4DConfig", "ParaphraseAttack", "ParaphraseConfig", "RingABellAttack", "RingABellConfig",
    "SoftPromptAttack", "SoftPromptConfig", "TextualInversionAttack", "TextualInversionConfig", "ToyJudge",
    "UnlearnDiffAttack", "describe_attack", "load_adversarial", "make_attack", "run_attack",
]
