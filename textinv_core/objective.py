"""The objective of Textual Inversion (Gal et al., ICLR 2023, §3), as the paper states it:

    v* = argmin_v  E_{z ~ E(x), y, eps ~ N(0, I), t}  || eps - eps_theta(z_t, t, c_theta(y)) ||^2

where y is a neutral template ("a photo of a S*") whose placeholder S* is embedded as v, and only v
is trained: the denoiser eps_theta, the text encoder c_theta and the encoder E stay frozen. For a
v-prediction model the regression target is v instead of eps (Salimans & Ho 2022).

Three functions, one per part of a step: `draw_batch` (the expectation's samples), `diffusion_loss`
(the squared error with v spliced in), `project` (what the vectors must satisfy after the update).
Must never touch a model weight: the host splices v into the token embeddings for one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .host import Host, WordVectors


@dataclass
class Draws:
    """Samples of the expectation: which image (and flip), the template, the noise and the timestep."""

    index: torch.Tensor       # [B] image indices
    flips: torch.Tensor       # [B] 0 = as is, 1 = horizontally flipped
    timesteps: torch.Tensor   # [B] integer timesteps of the host's schedule
    noise: torch.Tensor       # [B, C, h, w] eps
    prompts: list[str]        # [B] y, with the placeholder where S* stands

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, part: slice) -> Draws:
        return Draws(self.index[part], self.flips[part], self.timesteps[part], self.noise[part], self.prompts[part])


def encode_latents(host: Host, pixels: torch.Tensor, chunk: int = 1) -> torch.Tensor:
    """z = E(x) once per image and per flip, [2, N, C, h, w] (the paper re-encodes every step).
    One image at a time: at 1024 px four at once were the whole run's peak (SDXL, bf16: 12.0 GiB against
    a training step's 7.9), and encoding happens once, so batching it saves nothing that matters."""
    sides = []
    for flipped in (pixels, pixels.flip(-1)):
        encoded = [host.encode_images(flipped[i:i + chunk]) for i in range(0, flipped.shape[0], chunk)]
        sides.append(torch.cat(encoded))
    return torch.stack(sides).to(host.device)


def timestep_bounds(num_timesteps: int, share: tuple[float, float]) -> tuple[int, int]:
    """[first, last) of the timesteps drawn: the given share of the host's schedule."""
    low, high = share
    first = min(int(low * num_timesteps), num_timesteps - 1)
    return first, max(first + 1, min(num_timesteps, round(high * num_timesteps)))


def draw_batch(generator: torch.Generator, batch_size: int, image_count: int, latent_shape: torch.Size,
               timesteps: tuple[int, int], prompt_for: Callable[[int, int], str], flip: bool = True) -> Draws:
    """One batch of (x, y, eps, t): images uniformly, a random flip, a template, eps ~ N(0, I), t uniformly."""
    index = torch.randint(0, image_count, (batch_size,), generator=generator)
    flips = torch.randint(0, 2, (batch_size,), generator=generator) if flip else torch.zeros_like(index)
    templates = torch.randint(0, 1 << 30, (batch_size,), generator=generator)
    steps = torch.randint(timesteps[0], timesteps[1], (batch_size,), generator=generator)
    noise = torch.randn((batch_size, *latent_shape), generator=generator)
    prompts = [prompt_for(int(i), int(t)) for i, t in zip(index, templates)]
    return Draws(index, flips, steps, noise, prompts)


def diffusion_loss(host: Host, latents: torch.Tensor, draws: Draws, words: dict[str, WordVectors],
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """|| target - prediction(z_t, t, c(y with S* = v)) ||^2, averaged; differentiable in `words`' vectors.

    `latents` is `encode_latents`' [2, N, C, h, w]; the target is eps, or v for v-prediction hosts.
    `weights` (a mask per image and flip, [2, N, 1, h, w]) turns the mean into a weighted mean, so pixels
    outside a mask's white area do not count.
    """
    z0 = latents[draws.flips, draws.index]
    noise = draws.noise.to(host.device)
    timesteps = draws.timesteps.to(host.device)
    with host.autocast():
        cond = host.encode_text(draws.prompts, words)
        prediction = host.predict(host.add_noise(z0, noise, timesteps), timesteps, cond)
    target = host.target(z0, noise, timesteps)
    error = (prediction.float() - target.float()) ** 2
    if weights is None:
        return error.mean()
    w = weights[draws.flips, draws.index]
    return (error * w).sum() / (w.sum() * error.shape[1]).clamp_min(1e-8)


def backward_in_parts(host: Host, latents: torch.Tensor, draws: Draws, words: dict[str, WordVectors],
                      weights: torch.Tensor | None, part_size: int) -> float:
    """`diffusion_loss(...).backward()` for a batch too large for one pass: each part's loss, weighted by
    its share of the batch's mean (images, or mask weight), is backpropagated on its own, so the
    gradients add up to the whole batch's. Returns the batch's loss."""
    if weights is None:
        shares = [len(draws[i:i + part_size]) / len(draws) for i in range(0, len(draws), part_size)]
    else:
        w = weights[draws.flips, draws.index].flatten(1).sum(1)
        shares = [float(w[i:i + part_size].sum() / w.sum().clamp_min(1e-8)) for i in range(0, len(draws), part_size)]
    total = 0.0
    for share, start in zip(shares, range(0, len(draws), part_size)):
        loss = diffusion_loss(host, latents, draws[start:start + part_size], words, weights) * share
        loss.backward()
        total += float(loss.detach())
    return total


def init_pull(vectors: WordVectors, init: WordVectors) -> torch.Tensor:
    """The LDM code's optional L2 pull of v toward its initial embedding (weight 0 in the paper)."""
    return sum(((v - init[key]) ** 2).sum(-1).mean() for key, v in vectors.items())


@torch.no_grad()
def project(vectors: WordVectors, init: WordVectors, active: int, max_norm: dict[str, float]) -> None:
    """After the optimiser's step: vectors that have not joined yet (progressive extension) stay at
    their initial embedding, and each vector's norm is capped where a cap is set, in place."""
    for key, v in vectors.items():
        if active < v.shape[0]:
            v[active:] = init[key][active:]
        if key in max_norm:
            norms = v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            v.mul_(torch.clamp(max_norm[key] / norms, max=1.0))
