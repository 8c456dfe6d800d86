"""What to erase: a concept resolved once, at the edge, into the prompts a method works on.

A method never parses a concept. The entry points (``erasekit.erase``, the CLI, the bench)
resolve each concept into an :class:`EraseTarget` with a resolver for the model's world:
:func:`resolve_sd_targets` here for Stable Diffusion, driven by bundled lists per *kind*
(object, artist, person, nudity), and ``erasekit.toy.targets`` for the toy world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from erasekit.errors import ErasekitError

DATA_DIR = Path(__file__).resolve().parent / "data"

Guide = str | tuple[str, ...]  # a guide prompt, or prompts whose text states are averaged (a generic value)


def guide_prompts(guide: Guide) -> tuple[str, ...]:
    """The prompts of a guide: itself, or the prompts of a generic guide."""
    return (guide,) if isinstance(guide, str) else tuple(guide)


@dataclass
class EraseTarget:
    """One concept to erase, as a method sees it.

    ``prompts`` name the concept (``prompts[0]`` is the concept itself, the rest are its
    contexts, e.g. the toy's training captions) and ``guides`` say what each maps to;
    ``preserve`` are the user's prompts to keep and ``kept`` the ones the resolver adds for
    locality. ``word``, ``neutral``, ``templates`` and the anchors are the text side of CPE-like
    methods: ``word`` (default: the concept) is what fills the templates' "{}". ``kind`` is None
    when the user gave none and it could not be told: fields that depend on it are then None, and
    a method that needs them calls :func:`require`.
    """

    concept: str
    kind: str | None
    prompts: list[str]
    guides: list[Guide] | None
    preserve: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    neutral: str | None = None
    templates: list[str] | None = None
    anchors: list[str] = field(default_factory=list)  # anchor names always kept (put in the templates)
    anchor_candidates: list[str] = field(default_factory=list)  # anchor names a method picks the most similar from
    anchor_prompts: list[str] = field(default_factory=list)  # anchor prompts used as written
    anchors_in_templates: bool = True
    word: str = ""  # what fills the templates in the concept's place ("": the concept)

    def __post_init__(self):
        self.word = self.word or self.concept

    def describe(self) -> dict:
        """A short record for an erasure's info."""
        guide = self.guides[0] if self.guides else None
        return {"concept": self.concept, "kind": self.kind, "prompts": len(self.prompts), "kept": len(self.kept),
                "guide": guide if isinstance(guide, str) or guide is None else "generic"}


def require(targets: list[EraseTarget], name: str, method: str, alternative: str = "") -> None:
    """A one-line error when a method needs a target field that depends on the concept's kind and none was given."""
    for target in targets:
        if getattr(target, name) is None:
            raise ErasekitError(
                f"{method} needs to know what kind of concept {target.concept!r} is; pass --kind "
                f"({', '.join(SD_KINDS)}){' ' + alternative if alternative else ''}"
            )


def read_list(name: str, kind: str) -> list[str]:
    """A bundled list (``data/<kind>_<name>.txt``) or a text file: one entry a line, # starts a comment."""
    if not name:
        return []
    path = Path(name).expanduser()
    if not path.is_file():
        path = DATA_DIR / f"{kind}_{name}.txt"
        if not path.is_file():
            bundled = sorted(p.stem[len(kind) + 1:] for p in DATA_DIR.glob(f"{kind}_*.txt"))
            raise ErasekitError(f"{name!r} is neither a file nor a bundled {kind} list ({', '.join(bundled)})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ErasekitError(f"cannot read the {kind} list {path} ({error}); pass a UTF-8 text file, one entry a line") from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def prompt_targets(concepts: list[str], guide: Guide = " ", preserve=()) -> list[EraseTarget]:
    """Targets given as bare prompts: each concept maps to ``guide``, ``preserve`` is kept; no kind."""
    return [EraseTarget(concept, None, [concept], [guide], list(preserve)) for concept in concepts]


# ------------------------------------------------------------------------------------ Stable Diffusion
# The text side of each kind (research notes: UCE 2.2a for the guides, CPE B2 for neutrals, templates, anchors).
SD_KINDS = {
    "object": dict(guide=" ", neutral="object", templates="object", anchors="object_words", candidates="objects",
                   in_templates=True),
    "artist": dict(guide="art", neutral="real photograph", templates="art", anchors="art_words", candidates="artists",
                   in_templates=True),
    "person": dict(guide=" ", neutral="a person", templates="person", anchors="person_words", candidates="people",
                   in_templates=True),
    "nudity": dict(guide=" ", neutral="a person in modest clothing", templates="explicit", anchors="",
                   candidates="sentences", in_templates=False),
}
KIND_ALIASES = {"style": "artist", "art": "artist", "celebrity": "person", "explicit": "nudity", "nsfw": "nudity"}
NUDITY_WORDS = {"nudity", "nude", "naked", "nsfw", "explicit", "sexual", "porn", "nude person"}


def sd_kind(concept: str, kind: str | None) -> str | None:
    """The kind of an SD concept: the one given (aliases allowed), else what the bundled lists tell, else None."""
    if kind:
        name = KIND_ALIASES.get(kind.strip().lower(), kind.strip().lower())
        if name not in SD_KINDS:
            raise ErasekitError(f"unknown --kind {kind!r}; choose one of: {', '.join(SD_KINDS)}")
        return name
    lowered = concept.strip().lower()
    if lowered in NUDITY_WORDS:
        return "nudity"
    for name, list_name in (("artist", "artists"), ("person", "people")):
        if lowered in {entry.lower() for entry in read_list(list_name, "anchors")}:
            return name
    return None


def resolve_sd_targets(concepts: list[str], kind: str | None = None, preserve=(), guide: str | None = None) -> list[EraseTarget]:
    """SD targets: each concept with its kind's guide, neutral word, templates and anchors (``guide`` overrides)."""
    targets = []
    for concept in concepts:
        name = sd_kind(concept, kind)
        if name is None:
            targets.append(EraseTarget(concept, None, [concept], None if guide is None else [guide], list(preserve)))
            continue
        settings = SD_KINDS[name]
        targets.append(EraseTarget(
            concept=concept, kind=name, prompts=[concept], guides=[settings["guide"] if guide is None else guide],
            preserve=list(preserve), neutral=settings["neutral"], templates=read_list(settings["templates"], "templates"),
            anchors=read_list(settings["anchors"], "anchors"), anchor_candidates=read_list(settings["candidates"], "anchors"),
            anchors_in_templates=settings["in_templates"],
        ))
    return targets
