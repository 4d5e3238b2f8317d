"""The Host protocol on the model Automatic1111 (1.8+) already loaded: `shared.sd_model`, an ldm
LatentDiffusion (SD1.x, SD2.x) or an sgm DiffusionEngine (SDXL). Nothing is loaded twice and no
weight is written.

How a word reaches the text encoders: the way A1111's own embeddings do. A1111 wraps each text
encoder's token embedding in `EmbeddingsWithFixes`, which splices an embedding's vectors into the
token-embedding output with torch.cat (differentiable). For one encode, this host swaps in a private
`EmbeddingDatabase` that knows only the words being trained (their vectors are the trainer's
tensors), so the user's own embeddings are untouched and nothing is left registered afterwards.
SDXL: A1111's wrappers are built with `is_trainable=False`, so sgm's GeneralConditioner runs them
under no_grad; this host sets the flag on both text wrappers for the duration of the encode, so the
gradient reaches the word through CLIP-L and OpenCLIP-bigG alike (A1111's own trainer never did).

While training (`training()`): every parameter's requires_grad is off (no weight gradient is ever
formed), and the UNet blocks' own LDM/SGM checkpoint flags are off (their CheckpointFunction asks for
the gradient of frozen parameters; the engine recomputes blocks itself). Both are restored.

Latents are the VAE posterior's mean (deterministic), scaled by the model's scale_factor; the noise
schedule is the model's own alphas_cumprod; `predict` is `sd_model.apply_model`, the raw UNet
output (eps or v) that A1111's samplers wrap.

A1111 is imported only inside functions: importing this module imports no web UI.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ..families import ENCODER_WIDTHS
from ..host import HostError, WordVectors
from .webui_common import (
    DiscreteSchedule,
    euler_sample,
    frozen_parameters,
    no_checkpoint_flags,
    posterior_mean,
    reset_cond_cache,
    set_attributes,
)


def text_wrappers(model) -> list:
    """A1111's prompt wrappers (FrozenCLIPEmbedderWithCustomWordsBase) around each text encoder."""
    from modules import sd_hijack_clip

    base = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase
    if hasattr(model, "conditioner"):
        return [e for e in model.conditioner.embedders if isinstance(e, base)]
    return [model.cond_stage_model] if isinstance(model.cond_stage_model, base) else []


def _fixes_module(wrapper):
    from modules import sd_hijack

    found = [m for m in wrapper.modules() if isinstance(m, sd_hijack.EmbeddingsWithFixes)]
    if len(found) != 1:
        raise HostError("The loaded model's text encoder is not hijacked by A1111 (no EmbeddingsWithFixes): "
                        "reload the checkpoint.")
    return found[0]


class A1111Host:
    """shared.sd_model as seen by the trainer. Use `training()` around a run."""

    def __init__(self, sd_model=None):
        from modules import devices, shared

        model = sd_model if sd_model is not None else shared.sd_model
        if model is None:
            raise HostError("No checkpoint is loaded in the web UI: load one, then train.")
        self.model = model
        self.sdxl = hasattr(model, "conditioner")
        self.wrappers = text_wrappers(model)
        self.tables: dict[str, torch.nn.Module] = {}
        self.wrapper_of: dict[str, Any] = {}
        for wrapper in self.wrappers:
            fixes = _fixes_module(wrapper)
            width = int(fixes.wrapped.weight.shape[1])
            if self.sdxl:
                key = fixes.textual_inversion_key
            else:
                key = {768: "clip_l", 1024: "clip_h"}.get(width, "")
            if ENCODER_WIDTHS.get(key) != width:
                raise HostError(f"A text encoder {width} wide is not one textinv knows (SD1.x, SD2.x, SDXL).")
            self.tables[key] = fixes.wrapped
            self.wrapper_of[key] = wrapper
        keys = tuple(sorted(self.tables))
        self.family = {("clip_l",): "sd1", ("clip_h",): "sd2", ("clip_g", "clip_l"): "sdxl"}.get(keys)
        if self.family is None:
            raise HostError(f"The loaded model has text encoders {', '.join(keys) or 'none'}: textinv trains words "
                            "for SD1.x, SD2.x and SDXL base models (not the SDXL refiner).")
        self.encoders = {key: ENCODER_WIDTHS[key] for key in keys}
        self.unet = model.model.diffusion_model
        if int(getattr(self.unet, "in_channels", 4)) != 4:
            raise HostError("The loaded model is an inpainting or edit model: train words on a base checkpoint.")
        self.prediction_type = "v_prediction" if getattr(model, "parameterization", "eps") == "v" else "epsilon"
        self.schedule = DiscreteSchedule(model.alphas_cumprod, self.prediction_type)
        self.num_timesteps = self.schedule.num_timesteps
        self.device = devices.device
        levels = len(getattr(self.unet, "channel_mult", (1, 2, 4, 4)))
        self.pixel_multiple = 8 * 2 ** (levels - 1)
        self.size = (1024, 1024) if self.sdxl else (512, 512)  # SDXL's size conditioning; set by encode_images

    # -- lifecycle ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self):
        """Frozen parameters and plain UNet blocks for one run; grad on, inference mode off."""
        with torch.inference_mode(False), torch.enable_grad(), frozen_parameters(self.model), \
                no_checkpoint_flags(self.unet):
            yield self

    def register_word(self, path: Path) -> None:
        """Make a word file in the embeddings folder usable in the next prompt (A1111's own reload)."""
        from modules import sd_hijack

        sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
        reset_cond_cache()

    # -- text ---------------------------------------------------------------------------------
    def word_vectors(self, text: str) -> WordVectors:
        out = {}
        for key, wrapper in self.wrapper_of.items():
            ids = wrapper.tokenize([text])[0]
            table = self.tables[key].weight
            with torch.no_grad():
                out[key] = table[torch.tensor(ids, dtype=torch.long, device=table.device)].float().cpu().clone()
        return out

    def token_table_stats(self) -> dict[str, float]:
        with torch.no_grad():
            return {key: float(m.weight.float().norm(dim=1).mean()) for key, m in self.tables.items()}

    def token_table(self, key: str) -> torch.Tensor:
        return self.tables[key].weight.detach()

    def token_strings(self) -> list[str]:
        from ..tokenizer import clip_vocabulary_strings  # every SD text encoder shares the CLIP BPE vocabulary

        return clip_vocabulary_strings(next(iter(self.tables.values())).weight.shape[0])

    def _database(self, words: dict[str, WordVectors]):
        from modules.textual_inversion.textual_inversion import Embedding, EmbeddingDatabase

        database = EmbeddingDatabase()
        for placeholder, vectors in words.items():
            missing = [key for key in self.encoders if key not in vectors]
            if missing:
                raise HostError(f"The word {placeholder} has no vectors for this model's text encoder {missing[0]}.")
            vec = {key: vectors[key] for key in self.encoders} if self.sdxl else vectors[next(iter(self.encoders))]
            embedding = Embedding(vec, placeholder)
            embedding.vectors = int(next(iter(vectors.values())).shape[0])
            embedding.shape = sum(self.encoders.values())
            database.register_embedding_by_name(embedding, self.model, placeholder)
        return database

    def encode_text(self, prompts: list[str], words: dict[str, WordVectors]) -> Any:
        from modules import sd_hijack

        changes = [(sd_hijack.model_hijack, "embedding_db", self._database(words))]
        if self.sdxl:
            changes += [(wrapper, "is_trainable", True) for wrapper in self.wrappers]
        with set_attributes(changes):
            if self.sdxl:
                from modules.prompt_parser import SdConditioning

                height, width = self.size
                return self.model.get_learned_conditioning(SdConditioning(list(prompts), width=width, height=height))
            return self.model.cond_stage_model(list(prompts))

    # -- images and diffusion -----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        from modules import devices

        self.size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        mean = posterior_mean(self.model.first_stage_model, pixels.to(devices.device, devices.dtype_vae))
        return (mean.float() * float(self.model.scale_factor)).cpu()

    def add_noise(self, latents, noise, timesteps):
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        return self.schedule.target(latents, noise, timesteps)

    def predict(self, noisy, timesteps, cond):
        from modules import devices

        noisy = noisy.to(devices.device, devices.dtype_unet)
        t = timesteps.to(devices.device)
        if isinstance(cond, dict):
            cond = {k: v.to(devices.device, devices.dtype_unet) if torch.is_tensor(v) else v for k, v in cond.items()}
        else:
            cond = cond.to(devices.device, devices.dtype_unet)
        return self.model.apply_model(noisy, t, cond).float()

    def autocast(self):
        from modules import devices

        return devices.autocast()

    # -- previews, memory -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from modules import devices

        return self.model.decode_first_stage(latents.to(devices.device, devices.dtype_vae)).float()

    def sample(self, prompts: list[str], words: dict[str, WordVectors], seed: int, steps: int, guidance: float,
               size: int) -> list:
        saved = self.size
        self.size = (size, size)
        try:
            return euler_sample(self, prompts, words, seed, steps, guidance, size, self.schedule, self.decode)
        finally:
            self.size = saved

    def recompute_blocks(self) -> list[torch.nn.Module]:
        return [*self.unet.input_blocks, self.unet.middle_block, *self.unet.output_blocks]

    def free_memory(self) -> int | None:
        from ..memory import device_free_bytes

        return device_free_bytes(self.device)
