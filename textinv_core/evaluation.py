"""Did the word learn? The objective's loss on one fixed set of draws, and what to keep and when to stop.

The training loss is noisy (a new image, noise and timestep every step); the loss on fixed
(image, noise, timestep) draws is not, so it decides which vectors are kept (the best ones) and when
training stops early (`stopped_improving`; DVAR, Voronov et al. 2023, stops on the same loss). The
draws are stratified over the timesteps and seeded apart from training, so any two sets of vectors
can be compared on them without building a trainer (the benchmark's restarts do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .host import Host, WordVectors
from .objective import Draws, diffusion_loss, timestep_bounds
from .templates import EVAL_TEMPLATE, fill_caption

EVAL_SEED_OFFSET = 7919  # the evaluation draws' generator is seeded apart from training's


def evaluation_prompts(templates: str, placeholder: str, name: str, captions: list[str] | None,
                       index: torch.Tensor) -> list[str]:
    """The prompt of each draw: the image's caption, else the one neutral template of the set."""
    if templates == "captions":
        return [fill_caption(captions[int(i)], placeholder, name) for i in index]
    return [EVAL_TEMPLATE.get(templates, "a photo of a {}").format(placeholder)] * len(index)


def evaluation_draws(count: int, image_count: int, latent_shape: torch.Size, timesteps: tuple[int, int],
                     prompts_for, seed: int) -> Draws:
    """`count` fixed draws: images cycled, no flip, timesteps stratified over [first, last), fixed noise.

    `prompts_for(index)` gives the prompt of each draw's image.
    """
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    index = torch.arange(count) % image_count
    first, last = timesteps
    strata = (torch.arange(count) + torch.rand(count, generator=generator)) * (last - first) / count
    steps = (first + strata).long().clamp(first, last - 1)
    noise = torch.randn((count, *latent_shape), generator=generator)
    return Draws(index, torch.zeros_like(index), steps, noise, prompts_for(index))


def draws_for_run(config, image_count: int, latent_shape: torch.Size, num_timesteps: int,
                  count: int | None = None) -> Draws:
    """The evaluation draws of a run with this TrainConfig: the same for every run with its seed
    (`count` of them, by default the config's `eval_draws`)."""
    return evaluation_draws(
        count or config.eval_draws, image_count, latent_shape, timestep_bounds(num_timesteps, config.timestep_range),
        prompts_for=lambda index: evaluation_prompts(config.templates, config.placeholder, config.name,
                                                     config.captions, index),
        seed=config.seed)


@torch.no_grad()
def evaluate(host: Host, latents: torch.Tensor, draws: Draws, words: dict[str, WordVectors],
             weights: torch.Tensor | None = None, batch_size: int = 4) -> float:
    """The mean objective over the fixed draws for the given word vectors."""
    total = 0.0
    for start in range(0, len(draws), batch_size):
        part = draws[start:start + batch_size]
        total += float(diffusion_loss(host, latents, part, words, weights)) * len(part)
    return total / len(draws)


def stopped_improving(losses: list[float], window: int, tolerance: float = 0.002) -> bool:
    """Has the word stopped improving? Over the last `window` evaluation losses, the drop that the
    least-squares trend makes across the window is not significant: within two standard errors of
    zero given the losses' scatter around the trend (or below `tolerance` of the loss). What is left
    is noise, not learning.

    DVAR (Voronov et al. 2023) stops when the fixed-draw loss's recent variance is small against its
    variance over the run; that also stops a loss that is still falling steadily once the run is long.
    Testing the recent trend against the recent scatter stops a flat loss and lets a falling one go on.
    """
    if window < 3 or len(losses) < window:
        return False
    recent = np.asarray(losses[-window:], dtype=np.float64)
    steps = np.arange(window, dtype=np.float64)
    slope, intercept = np.polyfit(steps, recent, 1)
    scatter = float(np.std(recent - (slope * steps + intercept), ddof=2)) if window > 3 else 0.0
    drop = -slope * (window - 1)
    standard_error = scatter * (window - 1) / float(np.sqrt(((steps - steps.mean()) ** 2).sum()))
    return drop <= max(2.0 * standard_error, tolerance * float(np.abs(recent).mean()))


@dataclass
class BestSoFar:
    """The best evaluation loss seen, its step and vectors: the vectors a run returns."""

    loss: float = math.inf
    step: int = 0
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, step: int, loss: float, vectors: WordVectors) -> None:
        if loss < self.loss:
            self.loss, self.step = loss, step
            self.vectors = {k: v.detach().clone() for k, v in vectors.items()}
