"""Sampling the toy world through the host protocol: batched prompts, the toy model's own guidance.

The host does the sampling (`Host.sample`: DDIM with classifier-free guidance for the diffusers
host); this module only fixes the toy world's image size and its measured guidance and step count.
Deterministic: the initial noise of all prompts comes from one seeded generator.
"""

from __future__ import annotations

from PIL import Image

from .scene import SIZE

# Measured on the committed model (docs/toyworld/README.md): caption fidelity peaks near 1.5 and
# falls fast above 2 (colours and shapes wash out), unlike the 7.5 that large latent models use.
DEFAULT_GUIDANCE = 1.5
DEFAULT_STEPS = 20


def sample_prompts(host, prompts: list[str], words: dict | None = None, seed: int = 0, steps: int = DEFAULT_STEPS,
                   guidance: float = DEFAULT_GUIDANCE) -> list[Image.Image]:
    """One toy-world image per prompt."""
    return host.sample(list(prompts), words or {}, seed=seed, steps=steps, guidance=guidance, size=SIZE)


def sample(host, prompt: str, words: dict | None = None, count: int = 16, seed: int = 0, steps: int = DEFAULT_STEPS,
           guidance: float = DEFAULT_GUIDANCE) -> list[Image.Image]:
    """`count` images of one prompt."""
    return sample_prompts(host, [prompt] * count, words, seed=seed, steps=steps, guidance=guidance)
