"""The toy world: procedurally drawn shapes on styled backgrounds, with captions.

Every image is one coloured shape on a grey background drawn in one of four
styles. Styles play the role of an artistic style, shapes the role of an object,
so erasing "triangle" or "striped" on the toy model is a small, measurable
analogue of erasing an object or an artist from Stable Diffusion.

Each shape has two names used in training captions (erasing one word while its
synonym still draws the shape is a real failure mode) and two held-out
paraphrases that never appear in training, for robustness tests.

Everything is deterministic given a seed (numpy ``Generator``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from erasekit.errors import ErasekitError

IMAGE_SIZE = 24
_SUPERSAMPLE = 4  # shapes are drawn at 4x resolution and box-filtered: clean edges

# canonical name -> names used in training captions
SHAPE_NAMES: dict[str, list[str]] = {
    "circle": ["circle", "disk"],
    "square": ["square", "box"],
    "triangle": ["triangle", "three-sided shape"],
    "star": ["star", "five-pointed star"],
    "cross": ["cross", "plus sign"],
    "heart": ["heart", "love symbol"],
}
# canonical name -> paraphrases that never appear in training captions
HELD_OUT_SHAPE_NAMES: dict[str, list[str]] = {
    "circle": ["round dot", "circular shape"],
    "square": ["four-sided shape", "cube"],
    "triangle": ["triangular shape", "pyramid"],
    "star": ["pentagram", "starry shape"],
    "cross": ["plus symbol", "crossed bars"],
    "heart": ["valentine", "love sign"],
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (150, 55, 205),
    "orange": (250, 135, 20),
}
# style -> (adjective, noun phrase) used in captions
STYLE_WORDS: dict[str, tuple[str, str]] = {
    "plain": ("plain", "nothing"),
    "stripes": ("striped", "stripes"),
    "dots": ("dotted", "dots"),
    "checkerboard": ("checkered", "a checkerboard"),
}

SHAPES = list(SHAPE_NAMES)
COLOR_NAMES = list(COLORS)
STYLES = list(STYLE_WORDS)
ATTRIBUTES = {"shape": SHAPES, "color": COLOR_NAMES, "style": STYLES}

# Templates. {s}=shape word, {c}=colour, {a}=style adjective, {n}=style noun.
TRAIN_TEMPLATES_FULL = [
    "a {c} {s} on a {a} background",
    "a {s}, {c}, with {n} behind it",
    "{c} {s}, {a} background",
    "a {c} {s} over {n}",
]
TRAIN_TEMPLATES_NO_STYLE = ["a {c} {s}", "a {s} in {c}", "{c} {s}"]
TRAIN_TEMPLATES_NO_COLOR = ["a {s} on a {a} background", "a {s} with {n} behind it"]
TRAIN_TEMPLATES_SHAPE_ONLY = ["a {s}", "{s}"]
HELD_OUT_TEMPLATE = "a picture of a {c} {s} on a {a} background"


@dataclass(frozen=True)
class Scene:
    """One drawn image's attributes; `None` in a caption means 'not mentioned'."""

    shape: str
    color: str
    style: str


def canonical_prompt(shape: str | None, color: str | None = None, style: str | None = None) -> str:
    """The evaluation prompt for an attribute combination, first training name of the shape."""
    s = SHAPE_NAMES[shape][0] if shape else "shape"
    if color and style:
        return f"a {color} {s} on a {STYLE_WORDS[style][0]} background"
    if color:
        return f"a {color} {s}"
    if style:
        return f"a {s} on a {STYLE_WORDS[style][0]} background"
    return f"a {s}"


def held_out_prompt(shape: str, color: str, style: str, variant: int = 0) -> str:
    """A paraphrase that never occurs in training captions (word and template both held out)."""
    word = HELD_OUT_SHAPE_NAMES[shape][variant % len(HELD_OUT_SHAPE_NAMES[shape])]
    return HELD_OUT_TEMPLATE.format(c=color, s=word, a=STYLE_WORDS[style][0])


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random training caption: random shape synonym; colour and style each left out 20% of the time."""
    word = SHAPE_NAMES[scene.shape][rng.integers(len(SHAPE_NAMES[scene.shape]))]
    adjective, noun = STYLE_WORDS[scene.style]
    with_color = rng.random() > 0.2
    with_style = rng.random() > 0.2
    if with_color and with_style:
        templates = TRAIN_TEMPLATES_FULL
    elif with_color:
        templates = TRAIN_TEMPLATES_NO_STYLE
    elif with_style:
        templates = TRAIN_TEMPLATES_NO_COLOR
    else:
        templates = TRAIN_TEMPLATES_SHAPE_ONLY
    template = templates[rng.integers(len(templates))]
    return template.format(s=word, c=scene.color, a=adjective, n=noun)


def parse_concept(text: str) -> tuple[str, str]:
    """(attribute, value) that a toy concept names, the one parser of toy concepts.

    Case and surrounding spaces are ignored. A shape by its key, a training name or a held-out
    paraphrase ("Three-sided shape", "pyramid" -> ("shape", "triangle")); a colour; a style by
    its key, adjective or noun ("striped", "stripes" -> ("style", "stripes")). Anything else is
    an ``ErasekitError`` that lists the choices.
    """
    name = " ".join(text.strip().lower().split())
    for shape in SHAPES:
        if name == shape or name in SHAPE_NAMES[shape] or name in HELD_OUT_SHAPE_NAMES[shape]:
            return "shape", shape
    if name in COLORS:
        return "color", name
    for style, words in STYLE_WORDS.items():
        if name == style or (name in words and name != "nothing"):
            return "style", style
    raise ErasekitError(f"{text!r} is not a toy-world concept; choose a shape ({', '.join(SHAPES)}), "
                        f"a colour ({', '.join(COLOR_NAMES)}) or a style ({', '.join(STYLES)})")


def concept_word(attribute: str, value: str) -> str:
    """The word the toy's captions use for a value: a shape's first name, a style's adjective, the colour."""
    return SHAPE_NAMES[value][0] if attribute == "shape" else STYLE_WORDS[value][0] if attribute == "style" else value


def replace_words(caption: str, old: str, new: str) -> str:
    """``caption`` with every whole-word occurrence of ``old`` replaced by ``new``: "red" in "a red
    box" but not in "checkered"."""
    return re.sub(rf"\b{re.escape(old)}\b", new, caption)


def restyle(caption: str, style: str, new_style: str) -> str:
    """The caption with ``style``'s adjective and noun replaced by ``new_style``'s: "a red box over
    stripes" -> "a red box over nothing" (stripes -> plain). Only the style words change."""
    for old, new in zip(STYLE_WORDS[style], STYLE_WORDS[new_style]):
        caption = replace_words(caption, old, new)
    return caption


def training_captions(attribute: str, value: str, shape_name: str | None = None) -> list[str]:
    """Every distinct training caption form that names ``value`` of ``attribute``, in a fixed order.

    Shapes are written with ``shape_name`` (default: every training name of the shape), and
    the other attributes run over all their values; templates that leave the attribute out
    are skipped. This is the set of text contexts in which the toy model learned the value,
    which a closed-form edit needs under a bidirectional text encoder (see ``methods/uce.py``).
    """
    if attribute not in ATTRIBUTES or value not in ATTRIBUTES[attribute]:
        raise KeyError(f"{attribute}={value}")
    shape_values = [value] if attribute == "shape" else SHAPES
    color_values = [value] if attribute == "color" else COLOR_NAMES
    style_values = [value] if attribute == "style" else STYLES
    groups = [(TRAIN_TEMPLATES_FULL, True, True), (TRAIN_TEMPLATES_NO_STYLE, True, False),
              (TRAIN_TEMPLATES_NO_COLOR, False, True), (TRAIN_TEMPLATES_SHAPE_ONLY, False, False)]
    captions: list[str] = []
    for templates, with_color, with_style in groups:
        if (attribute == "color" and not with_color) or (attribute == "style" and not with_style):
            continue
        for template in templates:
            for shape in shape_values:
                names = [shape_name] if (shape_name and attribute == "shape") else SHAPE_NAMES[shape]
                for word in names:
                    for color in color_values if with_color else [None]:
                        for style in style_values if with_style else [None]:
                            adjective, noun = STYLE_WORDS[style] if style else ("", "")
                            captions.append(template.format(s=word, c=color or "", a=adjective, n=noun))
    return list(dict.fromkeys(captions))


def _background(style: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey background in float [0, 1], shape (size, size)."""
    base = rng.uniform(0.72, 0.88)
    ink = base - rng.uniform(0.3, 0.4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if style == "plain":
        return np.full((size, size), base, np.float32)
    if style == "stripes":
        period = rng.integers(4, 7)
        orientation = rng.integers(3)
        coord = [yy, xx, yy + xx][orientation] + rng.integers(period)
        on = (coord % period) < period / 2
    elif style == "dots":
        period = rng.integers(5, 7)
        oy, ox = rng.integers(period, size=2)
        dy = (yy + oy) % period - (period - 1) / 2
        dx = (xx + ox) % period - (period - 1) / 2
        on = dy**2 + dx**2 <= 2.0
    elif style == "checkerboard":
        cell = rng.integers(3, 5)
        oy, ox = rng.integers(cell, size=2)
        on = (((yy + oy) // cell + (xx + ox) // cell) % 2) == 1
    else:
        raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
    return np.where(on, ink, base).astype(np.float32)


def _shape_mask(shape: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a randomly placed, sized and rotated shape."""
    big = size * _SUPERSAMPLE
    radius = rng.uniform(0.26, 0.36) * size
    margin = radius + 1
    cy, cx = rng.uniform(margin, size - margin, size=2)
    angle = 0.0 if shape == "circle" else rng.uniform(-math.pi, math.pi)
    if shape == "heart":
        angle = rng.uniform(-0.35, 0.35)  # a heart upside down is not a heart
    coords = (np.arange(big, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    # rotate into the shape's frame, unit radius
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    if shape == "circle":
        inside = u**2 + v**2 <= 1.0
    elif shape == "square":
        inside = (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    elif shape == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # equilateral: three half-planes at distance 0.5 from the centre
            theta = math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * math.cos(theta) + v * math.sin(theta) <= 0.5
    elif shape == "star":
        r = np.sqrt(u**2 + v**2)
        theta = np.arctan2(v, u)
        sector = 2 * math.pi / 5
        phase = np.abs(((theta + math.pi / 2) % sector) - sector / 2) / (sector / 2)  # 0 at tip, 1 between
        inner = 0.45
        boundary = 1.0 / (1.0 + (1.0 / inner - 1.0) * phase)  # straight-ish edges from tip to notch
        inside = r <= boundary
    elif shape == "cross":
        inside = ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    elif shape == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.25  # the implicit heart curve, point down
        inside = (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    coverage = inside.astype(np.float32).reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    return coverage


def draw(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one scene as float32 RGB in [0, 1], shape (size, size, 3)."""
    background = _background(scene.style, rng, size)[..., None].repeat(3, axis=2)
    coverage = _shape_mask(scene.shape, rng, size)[..., None]
    jitter = rng.uniform(-12, 12, size=3)
    color = np.clip(np.array(COLORS[scene.color], np.float32) + jitter, 0, 255) / 255.0
    return background * (1 - coverage) + color * coverage


def random_scene(rng: np.random.Generator, exclude=()) -> Scene:
    """A uniformly drawn scene; one holding an excluded (attribute, value) is drawn again."""
    while True:
        scene = Scene(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
            style=STYLES[rng.integers(len(STYLES))],
        )
        if not any(getattr(scene, attribute) == value for attribute, value in exclude):
            return scene


def sample_batch(n: int, rng: np.random.Generator, size: int = IMAGE_SIZE, exclude=()):
    """n random scenes (none holding an ``exclude`` pair): images float32 (n, 3, size, size) in [-1, 1], the scenes, training captions."""
    scenes = [random_scene(rng, exclude) for _ in range(n)]
    images = np.stack([draw(s, rng, size) for s in scenes]).transpose(0, 3, 1, 2)
    captions = [training_caption(s, rng) for s in scenes]
    return (images * 2 - 1).astype(np.float32), scenes, captions


def labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Integer class labels per attribute, in the order of ATTRIBUTES."""
    return {
        "shape": np.array([SHAPES.index(s.shape) for s in scenes]),
        "color": np.array([COLOR_NAMES.index(s.color) for s in scenes]),
        "style": np.array([STYLES.index(s.style) for s in scenes]),
    }
