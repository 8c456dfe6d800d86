"""The toy world's resolver: a toy concept into the prompts, guides, kept prompts and anchors a method erases with.

The toy model's MiniLM text encoder is bidirectional, so every token of a caption carries the
shape: a concept is erased in every training caption that names it (``prompts``), and the
other values of its attribute are kept in theirs (``kept``). The guides keep the rest of the
caption with a *sibling* value in the concept's place: a shape or colour the kept value just
before it in the attribute's order (cyclic: triangle -> square, circle -> heart, red -> orange),
a style plain (plain itself the style before it). The toy world has no "no shape": towards ""
the unconditional model draws a random shape, the erased one too, and the mean of the caption
over every kept value (the earlier generic guide) is drawn as a square (docs/toy-sweep.md).
``word``, ``neutral``, ``templates`` and anchors are CPE's text side; ``word`` is the word the captions
use (a style's adjective: "checkered", not "checkerboard", which no template has in that place).
"""

from __future__ import annotations

from erasekit.targets import EraseTarget, Guide
from erasekit.toy import world

# CPE's neutral words: not "shape" (the model draws triangles for it). A colour's is its sibling while one is kept
# (no caption has a colourless word: with "colored" CPE left 39% of purple drawn), and so is plain's.
NEUTRALS = {"shape": "object", "color": "colored", "style": "plain"}


def caption_word(concept: str, attribute: str, value: str) -> str:
    """The word that stands for the concept in its captions: a shape's training name as given (else its
    first name), the colour, the style's adjective."""
    name = " ".join(concept.strip().lower().split())
    if attribute == "shape":
        return name if name in world.SHAPE_NAMES[value] else world.SHAPE_NAMES[value][0]
    return world.concept_word(attribute, value)


def concept_captions(concept: str, attribute: str, value: str) -> list[str]:
    """The training captions that name the concept (a shape: under the name it was given, if a training name)."""
    shape_name = caption_word(concept, attribute, value) if attribute == "shape" else None
    return world.training_captions(attribute, value, shape_name=shape_name)


def sibling(attribute: str, value: str, kept: list[str]) -> str | None:
    """The value an erased one is guided to: plain for a style, else the kept value just before it (cyclic); None if none is kept."""
    if attribute == "style" and value != "plain":
        return "plain"
    order = world.ATTRIBUTES[attribute]
    before = order[:order.index(value)][::-1] + order[order.index(value) + 1:][::-1]
    return next((v for v in before if v in kept), None)


def caption_guides(concepts: list[str], guide: str | None = None) -> tuple[dict[str, list[tuple[str, Guide]]], list[str]]:
    """Each concept's (caption, guide) pairs, one per training caption naming it, and the captions kept.

    A named ``guide`` replaces the concept's word in the caption (whole words only); without one
    the guide is the caption with the sibling value (see the module docstring); with every value
    of the attribute erased it is "".
    Kept: the other values of each concept's attribute in their captions, except erased values and
    captions erased for another concept.
    """
    named = {concept: world.parse_concept(concept) for concept in concepts}
    erased_values = set(named.values())
    by_concept: dict[str, list[tuple[str, Guide]]] = {}
    for concept, (attribute, value) in named.items():
        pairs = by_concept.setdefault(concept, [])
        word = caption_word(concept, attribute, value)
        words = world.STYLE_WORDS[value] if attribute == "style" else (word,)
        kept = [v for v in world.ATTRIBUTES[attribute] if (attribute, v) not in erased_values]
        other = sibling(attribute, value, kept)
        for caption in concept_captions(concept, attribute, value):
            if guide and guide.strip():
                guided = caption
                for word in words:
                    guided = world.replace_words(guided, word, guide)
                pairs.append((caption, guided))
            elif attribute == "style" and other:
                pairs.append((caption, world.restyle(caption, value, other)))
            elif other:
                pairs.append((caption, world.replace_words(caption, word, world.concept_word(attribute, other))))
            else:
                pairs.append((caption, guide or ""))
    erased_captions = {caption for pairs in by_concept.values() for caption, _ in pairs}
    preserved = []
    for attribute, value in dict.fromkeys(named.values()):
        for other in world.ATTRIBUTES[attribute]:
            if (attribute, other) not in erased_values:
                preserved += world.training_captions(attribute, other)
    return by_concept, [p for p in dict.fromkeys(preserved) if p not in erased_captions]


def templates(attribute: str) -> list[str]:
    """Every training caption with the attribute's slot left open ("{}") and the others filled in.

    For a shape: 124 templates covering each colour and style; for a colour 114, for a style 78
    (the captions that name the style by its adjective).
    """
    slot = {"shape": "s", "color": "c", "style": "a"}[attribute]
    captions = [*world.TRAIN_TEMPLATES_FULL, *world.TRAIN_TEMPLATES_NO_STYLE, *world.TRAIN_TEMPLATES_NO_COLOR,
                *world.TRAIN_TEMPLATES_SHAPE_ONLY]
    shapes = ["{}"] if slot == "s" else [words[0] for words in world.SHAPE_NAMES.values()]
    colours = ["{}"] if slot == "c" else world.COLOR_NAMES
    styles = [("{}", None)] if slot == "a" else list(world.STYLE_WORDS.values())
    result = []
    for caption in captions:
        if "{" + slot + "}" not in caption or (slot == "a" and "{n}" in caption):
            continue
        for shape in shapes if "{s}" in caption else [None]:
            for colour in colours if "{c}" in caption else [None]:
                for adjective, noun in styles if ("{a}" in caption or "{n}" in caption) else [(None, None)]:
                    result.append(caption.format(s=shape, c=colour, a=adjective, n=noun))
    return list(dict.fromkeys(result))


def anchors(concept: str, attribute: str, value: str) -> tuple[list[str], list[str]]:
    """(the other names of the concept's attribute, put in the templates; the other attributes' bare words)."""
    shapes = [n for key, words in world.SHAPE_NAMES.items() if key != value or attribute != "shape" for n in words]
    colours = [c for c in world.COLOR_NAMES if c != value]
    styles = [w for key, pair in world.STYLE_WORDS.items() if key != value for w in pair if w != "nothing"]
    adjectives = [pair[0] for key, pair in world.STYLE_WORDS.items() if key != value]
    if attribute == "shape":
        return shapes, colours + styles
    if attribute == "color":
        return colours, list(world.SHAPES) + styles
    return adjectives, list(world.SHAPES) + colours


def resolve_toy_targets(concepts: list[str], preserve=(), guide: str | None = None) -> list[EraseTarget]:
    """Toy targets for ``concepts`` (resolved together: a value erased for one is not kept for another)."""
    by_concept, kept = caption_guides(concepts, guide)
    erased = {world.parse_concept(concept) for concept in concepts}
    targets = []
    for concept in concepts:
        attribute, value = world.parse_concept(concept)
        guide_of = dict(by_concept[concept])
        neutral = NEUTRALS[attribute]
        if attribute == "color" or neutral == world.concept_word(attribute, value):  # a colour, or plain: its sibling
            other = sibling(attribute, value, [v for v in world.ATTRIBUTES[attribute] if (attribute, v) not in erased])
            neutral = world.concept_word(attribute, other) if other else neutral
        prompts = list(dict.fromkeys([concept, *guide_of]))
        names, words = anchors(concept, attribute, value)
        targets.append(EraseTarget(
            concept=concept, kind=attribute, prompts=prompts,
            guides=[guide_of.get(p, guide if guide is not None else "") for p in prompts],
            preserve=list(preserve), kept=list(kept), neutral=neutral, templates=templates(attribute),
            anchors=names, anchor_prompts=words, anchors_in_templates=True, word=caption_word(concept, attribute, value),
        ))
    return targets
