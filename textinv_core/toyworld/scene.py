"""Scene generator: one object with attributes on a plain background, and its caption.

Deterministic from a seed, pure numpy/PIL. Every attribute value is an ordinary English word that
the CLIP tokenizer maps to one token. Some (shape, colour, pattern) triples are held out of every
training image and caption, so concepts exist that no single word names and the model never saw.
Must never depend on torch: the scorer and tests use it without a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..errors import UserError

SIZE = 16  # pixels per side

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230), "yellow": (235, 215, 30)}
PATTERNS = ("plain", "striped")
BACKGROUNDS = {"white": (240, 240, 240), "gray": (120, 120, 120), "pink": (250, 170, 200)}
SIZES = {"big": 6.0, "small": 4.0}  # half-extent in pixels
JITTER = (-1, 0, 1)  # object centre offsets; position is not captioned
STRIPE_SHADE = 0.3  # dark stripes are the colour times this

ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": tuple(BACKGROUNDS),
    "size": tuple(SIZES),
}
CONCEPT_KEYS = ("shape", "colour", "pattern")
BLEND_SHARE = 0.25    # training captions whose concept words share one token position (blend_concept_words)
BLEND_WORD = "blend"  # marks that position: one CLIP token the world never says; its own row is unused

# Never drawn for training: the benchmark's unseen concepts. Every pair inside them is still seen.
HELD_OUT = (
    ("circle", "red", "striped"),
    ("square", "blue", "plain"),
    ("triangle", "green", "striped"),
    ("cross", "yellow", "plain"),
    ("circle", "yellow", "striped"),
    ("triangle", "blue", "plain"),
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    pattern: str
    background: str
    size: str
    dx: int = 0
    dy: int = 0

    def attributes(self) -> dict[str, str]:
        out = asdict(self)
        out.pop("dx")
        out.pop("dy")
        return out

    def caption(self) -> str:
        """The full human caption: every captioned attribute, one word each."""
        return (f"a photo of a {self.size} {self.colour} {self.pattern} {self.shape} "
                f"on a {self.background} background")


def is_held_out(shape: str, colour: str, pattern: str) -> bool:
    return (shape, colour, pattern) in HELD_OUT


def shape_mask(shape: str, half: float, dx: int = 0, dy: int = 0, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of a shape sampled at pixel centres (hard edges)."""
    c = size / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    px, py = x - c - dx, y - c - dy
    if shape == "circle":
        return px ** 2 + py ** 2 < half ** 2
    if shape == "square":
        return (np.abs(px) < half) & (np.abs(py) < half)
    if shape == "triangle":  # apex up, base 2*half wide
        return (py > -half) & (py < half) & (np.abs(px) < (py + half) / 2)
    if shape == "cross":
        arm = half / 3
        return ((np.abs(px) < half) & (np.abs(py) < arm)) | ((np.abs(py) < half) & (np.abs(px) < arm))
    raise UserError(f"Unknown shape {shape!r}: choose one of {', '.join(SHAPES)}.")


def stripe_mask(half: float, dy: int = 0, size: int = SIZE) -> np.ndarray:
    """Rows of the dark stripes: 2-pixel bands counted from the object's top edge."""
    y = np.mgrid[0:size, 0:size][0].astype(np.float64) + 0.5
    band = np.floor((y - size / 2 - dy + half) / 2).astype(int)
    return band % 2 == 1


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image."""
    half = SIZES[scene.size]
    image = np.empty((SIZE, SIZE, 3), dtype=np.float64)
    image[:] = BACKGROUNDS[scene.background]
    mask = shape_mask(scene.shape, half, scene.dx, scene.dy)
    colour = np.array(COLOURS[scene.colour], dtype=np.float64)
    image[mask] = colour
    if scene.pattern == "striped":
        image[mask & stripe_mask(half, scene.dy)] = colour * STRIPE_SHADE
    return Image.fromarray(image.round().astype(np.uint8), mode="RGB")


def random_scene(rng: np.random.Generator, allow_held_out: bool = False, **fixed: str) -> Scene:
    """A uniformly drawn scene; `fixed` pins attributes; held-out triples are redrawn unless allowed."""
    for key, value in fixed.items():
        if key not in ATTRIBUTES or value not in ATTRIBUTES[key]:
            raise UserError(f"Unknown attribute {key}={value!r}.")
    while True:
        values = {k: fixed.get(k) or str(options[rng.integers(len(options))]) for k, options in ATTRIBUTES.items()}
        dx, dy = (int(JITTER[i]) for i in rng.integers(len(JITTER), size=2))
        scene = Scene(**values, dx=dx, dy=dy)
        if allow_held_out or not is_held_out(scene.shape, scene.colour, scene.pattern):
            return scene


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption with attribute dropout, so every word is learned alone and CFG has an empty prompt."""
    if rng.random() < 0.1:
        return ""
    words = []
    if rng.random() > 0.3:
        words.append(scene.size)
    if rng.random() > 0.15:
        words.append(scene.colour)
    if rng.random() > 0.3:
        words.append(scene.pattern)
    words.append(scene.shape if rng.random() > 0.15 else "object")
    text = " ".join(words)
    if rng.random() > 0.3:
        text += f" on a {scene.background} background"
    return ("a photo of a " if rng.random() > 0.3 else "a ") + text


def blend_concept_words(caption: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    """Sometimes put the caption's concept words (colour, pattern, shape) in one token position.

    That position holds the sum of their rows (scaled by 1/sqrt(n)), so the encoder learns that one
    token can carry several attributes, as a real CLIP's names of things do ("lemon": yellow, round).
    Without it, one learned vector held at most two of a concept's three attributes on this world.
    Returns the caption with the blend mark in place of the words, and the words blended.
    """
    concept_words = set(SHAPES) | set(COLOURS) | set(PATTERNS) | {"object"}
    words = caption.split()
    run = [i for i, w in enumerate(words) if w in concept_words]
    if len(run) < 2 or rng.random() >= BLEND_SHARE:
        return caption, []
    blended = [words[i] for i in run]
    kept = words[:run[0]] + [BLEND_WORD] + words[run[-1] + 1:]
    return " ".join(kept), blended


def training_batch(seed: int, count: int) -> tuple[list[Scene], list[str]]:
    """`count` training scenes and dropout captions, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    return scenes, [training_caption(s, rng) for s in scenes]


def parse_concept(text: str) -> dict[str, str]:
    """'shape=circle,colour=red,pattern=striped' -> dict; every concept key is required."""
    concept: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key, value = key.strip().replace("color", "colour"), value.strip()
        if key not in CONCEPT_KEYS:
            raise UserError(f"Unknown concept key {key!r}: use {', '.join(CONCEPT_KEYS)}.")
        if value not in ATTRIBUTES[key]:
            raise UserError(f"Unknown {key} {value!r}: choose one of {', '.join(ATTRIBUTES[key])}.")
        concept[key] = value
    missing = [k for k in CONCEPT_KEYS if k not in concept]
    if missing:
        raise UserError(f"The concept needs {', '.join(missing)}: e.g. shape=circle,colour=red,pattern=striped.")
    return concept


def concept_images(concept: dict[str, str], count: int = 5, seed: int = 0) -> list[Scene]:
    """`count` scenes of one concept; background, size and position vary so only the concept is shared."""
    rng = np.random.default_rng(seed)
    backgrounds = list(BACKGROUNDS)
    scenes = []
    for i in range(count):
        scene = random_scene(rng, allow_held_out=True, **concept, background=backgrounds[i % len(backgrounds)])
        scenes.append(scene)
    return scenes
