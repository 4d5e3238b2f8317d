"""Reconstruction and editability read off generated images by the scorer (paper §5, toy version).

Reconstruction: how many of the concept's attributes (shape, colour, pattern) the samples of
"a photo of S*" show, averaged (graded) and all-at-once (strict). Editability: how often samples of
"S* <edit>" show the edited attribute, the analogue of the paper's image-text similarity to the
edit text; `preserved` adds that the concept survived the edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import CONCEPT_KEYS
from .scorer import score_images


@dataclass(frozen=True)
class Edit:
    """One edit prompt: `template` holds "{}" for the word; `attribute=value` is what it asks for."""

    template: str
    attribute: str
    value: str

    @property
    def label(self) -> str:
        return f"{self.attribute}={self.value}"


def reconstruction(images, concept: dict[str, str]) -> dict[str, float]:
    """Graded (mean share of concept attributes right) and strict (all right) reconstruction."""
    scores = score_images(images)
    hits = np.array([[s[k] == concept[k] for k in CONCEPT_KEYS] for s in scores], dtype=np.float64)
    return {"graded": float(hits.mean()), "strict": float(hits.all(1).mean()),
            **{k: float(hits[:, i].mean()) for i, k in enumerate(CONCEPT_KEYS)}}


def editability(images, edit: Edit, concept: dict[str, str]) -> dict[str, float]:
    """Share of samples showing the edit, and the graded concept among them (preserved)."""
    scores = score_images(images)
    edited = np.array([s[edit.attribute] == edit.value for s in scores], dtype=np.float64)
    keep = [k for k in CONCEPT_KEYS if k != edit.attribute]
    kept = np.array([np.mean([s[k] == concept[k] for k in keep]) for s in scores])
    return {"edit": float(edited.mean()), "preserved": float((edited * kept).mean())}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0
