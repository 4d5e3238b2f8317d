"""What the trainer needs from a host (diffusers, ComfyUI, ...): the whole contract in one place.

A host wraps models that are already loaded; it never copies them and never changes a weight. The
trainer sees only this protocol, so the same training loop runs inside ComfyUI and from the CLI.

Words and slots: a prompt names a pseudo-word by its placeholder string (e.g. `<my-cat>`).
`encode_text` is handed, per placeholder, one tensor per text encoder of shape [k, width]; the
host splices those k vectors into the token-embedding output where the placeholder stands, so the
conditioning is differentiable in them while the token table itself is never written.

Timesteps are integer indices into the host's discrete training schedule, 0..num_timesteps-1.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from .errors import UserError

# Encoder keys used across hosts and files (textinv_core/families.py): SD1 'clip_l' (768),
# SD2 'clip_h' (1024), SDXL 'clip_l' (768) + 'clip_g' (1280).
WordVectors = dict[str, torch.Tensor]


class HostError(UserError):
    """A user-fixable problem detected by a host (bad prompt, unknown word, models that do not match)."""


@runtime_checkable
class Host(Protocol):
    family: str
    """'sd1', 'sd2' or 'sdxl': decides the file layout of the learned word."""

    encoders: dict[str, int]
    """Encoder key -> token-embedding width, e.g. {'clip_l': 768, 'clip_g': 1280}."""

    prediction_type: str
    """'epsilon' or 'v_prediction': what `predict` returns and `target` computes."""

    num_timesteps: int
    device: torch.device
    pixel_multiple: int
    """Training resolutions must be a multiple of this (VAE factor x UNet downsampling)."""

    def word_vectors(self, text: str) -> WordVectors:
        """Frozen embeddings of `text`'s tokens (no BOS/EOS), fp32, [n_tokens, width] per encoder.

        n_tokens is 0 when `text` tokenizes to nothing.
        """

    def token_table_stats(self) -> dict[str, float]:
        """Mean L2 norm of the real vocabulary rows per encoder (how `textinv info` judges a norm)."""

    def token_table(self, key: str) -> torch.Tensor:
        """The frozen token-embedding table of encoder `key`, [vocabulary, width]: read, never written
        (the engine searches it for a start word when none is given)."""

    def token_strings(self) -> list[str]:
        """The text of every token id (shared by the encoders), without end-of-word marks; '' for special
        tokens."""

    def encode_text(self, prompts: list[str], words: dict[str, WordVectors]) -> Any:
        """Conditioning for a batch of prompts with pseudo-word vectors spliced in.

        `words` maps each placeholder string that may appear in the prompts to its vectors.
        Differentiable in those vectors. The result is opaque to the trainer: it is only passed
        back to `predict`.
        """

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latents in the space the denoiser trains in (scaled)."""

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion: x_t for the given integer timesteps."""

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target of the denoiser: eps, or v for v-prediction models."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """The frozen denoiser's output in the same space as `target`."""

    def autocast(self) -> Any:
        """A context manager for the forward passes (mixed precision where the host runs it)."""

    def sample(self, prompts: list[str], words: dict[str, WordVectors], seed: int, steps: int, guidance: float,
               size: int) -> list:
        """One PIL image per prompt, sampled with classifier-free guidance and the given word vectors.

        Used by previews, the demo and the toy world alike. Deterministic for a seed: the initial
        noise of all prompts is drawn at once from `seed`, so a prompt's image does not depend on how
        the host batches them. `size` is in pixels.
        """

    def recompute_blocks(self) -> list[torch.nn.Module]:
        """The denoiser's blocks whose activations may be recomputed in the backward pass
        (gradient checkpointing, textinv_core/recompute.py): the largest modules whose forward
        takes tensors and returns tensors, e.g. the UNet's input/middle/output blocks."""

    def free_memory(self) -> int | None:
        """Bytes the next training step may still allocate on the host's device, asked of the host's
        own memory management where it has one; None when unknown."""
