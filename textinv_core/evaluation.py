"""Did the word learn? The objective's loss on one fixed set of draws, and what to keep and when to stop.

The training loss is noisy (a new image, noise and timestep every step); the loss on fixed
(image, noise, timestep) draws is not, so it decides which vectors are kept (the best ones) and when
training stops early (DVAR, Voronov et al. 2023, stops on the same kind of fixed-draw loss). The
draws are stratified over the timesteps and seeded apart from training, so any two sets of vectors
can be compared on them without building a trainer (the benchmark's restarts do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


def draws_for_run(config, image_count: int, latent_shape: torch.Size, num_timesteps: int) -> Draws:
    """The evaluation draws of a run with this TrainConfig: the same for every run with its seed."""
    return evaluation_draws(
        config.eval_draws, image_count, latent_shape, timestep_bounds(num_timesteps, config.timestep_range),
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


@dataclass
class BestSoFar:
    """The best evaluation loss seen, its step and vectors, and how many evaluations since it improved
    by the relative margin `min_delta` (early stopping's patience counter)."""

    min_delta: float = 0.01
    loss: float = math.inf
    step: int = 0
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    stale: int = 0

    def update(self, step: int, loss: float, vectors: WordVectors) -> None:
        self.stale = 0 if loss < self.loss * (1 - self.min_delta) else self.stale + 1
        if loss < self.loss:
            self.loss, self.step = loss, step
            self.vectors = {k: v.detach().clone() for k, v in vectors.items()}

    def patience_spent(self, patience: int) -> bool:
        return bool(patience) and self.stale >= patience
