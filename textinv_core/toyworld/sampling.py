"""Batched DDIM sampling with classifier-free guidance over a host's UNet, in pixel space.

No diffusers pipeline handles a pixel-space model with spliced pseudo-word vectors, so this is a
small loop: the host encodes the prompts (with any learned words) and runs the UNet; diffusers'
DDIMScheduler does the update. Deterministic: the initial noise comes from a seeded generator.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .scene import SIZE

# Measured on the committed model (docs/toyworld/README.md): caption fidelity peaks near 1.5 and
# falls fast above 2 (colours and shapes wash out), unlike the 7.5 that large latent models use.
DEFAULT_GUIDANCE = 1.5
DEFAULT_STEPS = 20


@torch.no_grad()
def sample_prompts(host, prompts: list[str], words: dict | None = None, seed: int = 0, steps: int = DEFAULT_STEPS,
                   guidance: float = DEFAULT_GUIDANCE, batch: int = 128) -> list[Image.Image]:
    """One image per prompt (DDIM, Song et al. 2021; classifier-free guidance, Ho & Salimans 2022)."""
    from diffusers import DDIMScheduler

    words = words or {}
    scheduler = DDIMScheduler.from_config(host.scheduler.config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), host.unet.config.in_channels, SIZE, SIZE, generator=generator)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        x = noise[start:start + batch].to(host.device)
        n = x.shape[0]
        cond = host.encode_text(list(chunk) + [""] * n, words)
        for t in scheduler.timesteps:
            out = host.predict(torch.cat([x, x]), t.repeat(2 * n), cond)
            guided = out[n:] + guidance * (out[:n] - out[n:])
            x = scheduler.step(guided, t, x).prev_sample
        images.extend(to_pil(x))
    return images


def sample(host, prompt: str, words: dict | None = None, count: int = 16, seed: int = 0, steps: int = DEFAULT_STEPS,
           guidance: float = DEFAULT_GUIDANCE) -> list[Image.Image]:
    """`count` images of one prompt."""
    return sample_prompts(host, [prompt] * count, words, seed=seed, steps=steps, guidance=guidance)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]
