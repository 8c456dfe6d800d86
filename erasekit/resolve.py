"""The edge where concepts become targets: ``erasekit.erase(model, method, concepts, kind=...)``.

:func:`resolve_targets` picks the resolver for the model's world (the toy world's on the toy
model, the Stable Diffusion kinds otherwise), resolves every concept once and checks that every
prompt fits the text encoder, before any work is done. :func:`erase` then runs the method.
"""

from __future__ import annotations

from erasekit.errors import ErasekitError
from erasekit.methods import build_config, get_method, run_method
from erasekit.targets import EraseTarget, guide_prompts, resolve_sd_targets

TOY_KINDS = ("shape", "color", "style")


def clean_concepts(concepts) -> list[str]:
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    concepts = [c.strip() for c in concepts if c.strip()]
    if not concepts:
        raise ErasekitError("no concept to erase; pass at least one --concept")
    return concepts


def resolve_targets(model, concepts, kind: str | None = None, preserve=(), guide: str | None = None) -> list[EraseTarget]:
    """The targets of ``concepts`` on ``model``: its world's resolver, every prompt checked to fit."""
    concepts = clean_concepts(concepts)
    preserve = [p for p in preserve if p is not None]
    for text in [*concepts, *preserve]:  # before any resolver looks at them
        model.check_prompt_fits(text)
    if getattr(model, "kind", None) == "toy":
        from erasekit.toy import world
        from erasekit.toy.targets import resolve_toy_targets

        if kind is not None and kind not in TOY_KINDS:
            raise ErasekitError(f"--kind {kind!r} is not a toy-world kind; on the toy model use {', '.join(TOY_KINDS)} or leave it out")
        if kind is not None:
            wrong = [c for c in concepts if world.parse_concept(c)[0] != kind]
            if wrong:
                raise ErasekitError(f"{wrong[0]!r} is a toy {world.parse_concept(wrong[0])[0]}, not a {kind}; fix --kind or the concept")
        targets = resolve_toy_targets(concepts, preserve=preserve, guide=guide)
    else:
        targets = resolve_sd_targets(concepts, kind=kind, preserve=preserve, guide=guide)
    for target in targets:
        for prompt in dict.fromkeys([*target.prompts, *target.preserve, *(
                p for g in target.guides or [] for p in guide_prompts(g))]):
            model.check_prompt_fits(prompt)
    return targets


def erase(model, method: str, concepts, preserve=(), kind: str | None = None, guide: str | None = None, config=None,
          preset: str | None = None, overrides=None, progress: bool = True):
    """Erase ``concepts`` from ``model`` with ``method``; returns an :class:`~erasekit.Erasure`.

    ``kind`` (object, artist, person, nudity; on the toy model shape, color, style) says what the
    concepts are, where the model's resolver cannot tell; ``guide`` replaces the kind's guide
    prompt. ``config`` is the method's config dataclass; or give ``preset`` (with its layer for
    the concepts' kind, if it has one: :func:`~erasekit.methods.build_config`) and/or ``overrides``.
    Under ``torchrun`` / ``accelerate launch``, see :func:`erasekit.methods.run_method` (ESD and Receler
    train data parallel; the other methods run on process 0, and the other processes get None).
    """
    get_method(method)
    targets = resolve_targets(model, concepts, kind=kind, preserve=preserve, guide=guide)
    if config is None:
        kinds = {target.kind for target in targets}  # a per-kind preset layer applies when the concepts share a kind
        config = build_config(method, preset, overrides, kind=kinds.pop() if len(kinds) == 1 else None)
    return run_method(model, method, targets, config=config, progress=progress)
