"""Deterministic scorer: reads shape, colour, pattern, background and size back from an image.

A fixed rule, no learning: the background is the nearest background colour to the border's median;
object pixels are those far from it; colour and pattern come from each object pixel's nearest
prototype (a colour or its dark stripe shade); shape and size from the rendered template (at every
jitter) nearest to each pixel's coverage by the object colour, so soft edges count by how much
object they hold. Works on blurry model samples as well as on clean renders.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .scene import BACKGROUNDS, COLOURS, JITTER, SHAPES, SIZE, SIZES, STRIPE_SHADE, shape_mask

OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the object
STRIPED_FRACTION = 0.2  # share of dark-shade object pixels above which the object reads as striped


@lru_cache(maxsize=1)
def _templates() -> tuple[list[tuple[str, str]], np.ndarray]:
    labels, masks = [], []
    for shape in SHAPES:
        for size, half in SIZES.items():
            for dx in JITTER:
                for dy in JITTER:
                    labels.append((shape, size))
                    masks.append(shape_mask(shape, half, dx, dy).ravel())
    return labels, np.stack(masks).astype(np.float64)


def _coverage(pixels: np.ndarray, bg: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """How much of each pixel is `colour` over `bg` (alpha of a blend), in [0, 1]."""
    axis = colour - bg
    alpha = ((pixels - bg) @ axis) / max(float(axis @ axis), 1e-6)
    residual = np.sqrt((((pixels - bg) - alpha[..., None] * axis) ** 2).sum(-1))
    return np.clip(alpha, 0.0, 1.0) * (residual < OBJECT_DISTANCE)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64)


def score_image(image) -> dict[str, str]:
    """The attributes read from one image (PIL or uint8 array [SIZE, SIZE, 3])."""
    pixels = _as_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    median = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    bg_protos = np.array([BACKGROUNDS[n] for n in names], dtype=np.float64)
    background = names[int(np.argmin(((bg_protos - median) ** 2).sum(1)))]
    bg = bg_protos[names.index(background)]
    mask = np.sqrt(((pixels - bg) ** 2).sum(-1)) > OBJECT_DISTANCE
    out = {"background": background}
    colour_names = list(COLOURS)
    if not mask.any():
        return {**out, "shape": "none", "colour": "none", "pattern": "none", "size": "none"}
    bright = np.array([COLOURS[n] for n in colour_names], dtype=np.float64)
    protos = np.concatenate([bright, bright * STRIPE_SHADE])
    obj = pixels[mask]
    nearest = np.argmin(((obj[:, None, :] - protos[None]) ** 2).sum(-1), axis=1)
    votes = np.bincount(nearest % len(colour_names), minlength=len(colour_names))
    out["colour"] = colour_names[int(np.argmax(votes))]
    out["pattern"] = "striped" if (nearest >= len(colour_names)).mean() > STRIPED_FRACTION else "plain"
    colour = bright[colour_names.index(out["colour"])]
    alpha = np.maximum(_coverage(pixels, bg, colour), _coverage(pixels, bg, colour * STRIPE_SHADE))
    labels, masks = _templates()
    errors = ((masks - alpha.ravel()[None]) ** 2).sum(1)
    shape, size = labels[int(np.argmin(errors))]
    return {**out, "shape": shape, "size": size}


def score_images(images) -> list[dict[str, str]]:
    return [score_image(image) for image in images]


def attribute_accuracy(images, truths: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute fraction of images read back correctly, plus 'all' (every attribute right)."""
    scores = score_images(images)
    keys = list(truths[0])
    acc = {k: float(np.mean([s[k] == t[k] for s, t in zip(scores, truths)])) for k in keys}
    acc["all"] = float(np.mean([all(s[k] == t[k] for k in keys) for s, t in zip(scores, truths)]))
    return acc
