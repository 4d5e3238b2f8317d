"""Caption fidelity of a toy model: how often a sample of a full caption shows every attribute.

The model-quality number recorded in docs/toyworld/README.md, measured with the scorer on
scenes drawn like training scenes (seen concepts) and on the held-out concepts (unseen).
"""

from __future__ import annotations

import numpy as np

from . import scene as world
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample_prompts
from .scorer import score_images


def caption_fidelity(host, count: int = 128, seed: int = 0, held_out: bool = False,
                     steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> dict[str, float]:
    """Per-attribute accuracy and 'all' over `count` full captions (one sample each)."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < count:
        candidate = world.random_scene(rng, allow_held_out=held_out)
        if not held_out or world.is_held_out(candidate.shape, candidate.colour, candidate.pattern):
            scenes.append(candidate)
    images = sample_prompts(host, [s.caption() for s in scenes], seed=seed, steps=steps, guidance=guidance)
    scores = score_images(images)
    keys = list(world.ATTRIBUTES)
    out = {k: float(np.mean([sc[k] == getattr(s, k) for sc, s in zip(scores, scenes)])) for k in keys}
    out["all"] = float(np.mean([all(sc[k] == getattr(s, k) for k in keys) for sc, s in zip(scores, scenes)]))
    out["concept"] = float(np.mean([all(sc[k] == getattr(s, k) for k in world.CONCEPT_KEYS)
                                    for sc, s in zip(scores, scenes)]))
    return out
