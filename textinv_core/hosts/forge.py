"""The Host protocol on the model Forge (lllyasviel/stable-diffusion-webui-forge, its own `backend/`)
already loaded: `shared.sd_model` is a ForgeDiffusionEngine (SD1.x, SD2.x, SDXL) whose
`forge_objects` hold the UnetPatcher (a KModel), the CLIP and the VAE. Nothing is loaded twice and
no weight is written.

Differences from A1111 that shape this host (see shared WEBUI_NOTES.md):
- Each text encoder has its own ClassicTextProcessingEngine with its own EmbeddingDatabase, and
  its token embedding is a CLIPEmbeddingForTextualInversion that splices an embedding's vectors with
  torch.cat (differentiable). For one encode this host gives each engine (and its token-embedding
  module) a private database that knows only the words being trained, then puts the web UI's back.
- `get_learned_conditioning` runs under torch.inference_mode(), so this host calls the engines
  itself and builds SDXL's crossattn/vector exactly as backend/diffusion_engine/sdxl.py does.
- The models are built under inference mode: their weights are inference tensors, which autograd
  cannot save. While training, the UNet's and text encoders' weights are plain copies with the same
  values (`plain_weights`, webui_common.py); Forge's own tensors are put back afterwards.
- Forge's UNet adds in place and its CPU attention exponentiates in place; on the word's gradient
  path both are done out of place while training (`autograd_friendly`, `_differentiable_attention`).
- The engines print a line per used embedding and append its name to the infotext of the next
  image; both are kept quiet/undone while training.
- Latents are the VAE posterior's mean through Forge's own process_in; `predict` calls the UNet
  with the VP input and the integer timestep (what KModel.apply_model passes after its k-diffusion
  scaling) and returns its raw output (eps or v).

Forge is imported only inside functions: importing this module imports no web UI.
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
    autograd_friendly,
    call_comfy_unet,
    euler_sample,
    frozen_parameters,
    plain_weights,
    posterior_mean,
    reset_cond_cache,
    set_attributes,
)


def text_engines(model) -> dict[str, Any]:
    """Encoder key -> Forge's ClassicTextProcessingEngine for that text encoder."""
    engines = {}
    for attr in ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g"):
        engine = getattr(model, attr, None)
        if engine is not None and hasattr(engine, "embeddings"):
            engines[engine.embedding_key] = engine
    return engines


@contextlib.contextmanager
def _quiet_engines():
    """No '[Textual Inversion] Used Embedding' line per training step, and no word names left in
    the infotext of the user's next image."""
    from backend.text_processing import classic_engine

    saved = dict(classic_engine.last_extra_generation_params)
    own_print = vars(classic_engine).get("print")
    classic_engine.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own_print is None:
            del classic_engine.print
        else:
            classic_engine.print = own_print
        classic_engine.last_extra_generation_params.clear()
        classic_engine.last_extra_generation_params.update(saved)


@contextlib.contextmanager
def _differentiable_attention():
    """The UNet's attention through PyTorch's scaled_dot_product_attention while training: Forge's
    CPU default (sub-quadratic attention) exponentiates in place with `out=`, which autograd refuses.
    The same attention, computed another way; the web UI's choice comes back afterwards."""
    from backend import attention
    from backend.nn import unet

    with set_attributes([(unet, "attention_function", attention.attention_pytorch)]):
        yield


class ForgeHost:
    """Forge's shared.sd_model as seen by the trainer. Use `training()` around a run."""

    def __init__(self, sd_model=None):
        from modules import shared

        model = sd_model if sd_model is not None else shared.sd_model
        if model is None or not hasattr(model, "forge_objects"):
            raise HostError("No checkpoint is loaded in Forge: load one, then train.")
        self.model = model
        self.engines = text_engines(model)
        keys = tuple(sorted(self.engines))
        self.family = {("clip_l",): "sd1", ("clip_h",): "sd2", ("clip_g", "clip_l"): "sdxl"}.get(keys)
        if self.family is None:
            raise HostError(f"The loaded model has text encoders {', '.join(keys) or 'none'}: textinv trains words "
                            "for SD1.x, SD2.x and SDXL (not Flux, SD3 or Chroma).")
        self.sdxl = self.family == "sdxl"
        self.encoders = {key: ENCODER_WIDTHS[key] for key in keys}
        for key, engine in self.engines.items():
            width = int(self._token_embedding(engine).wrapped.weight.shape[1])
            if width != self.encoders[key]:
                raise HostError(f"Text encoder {key} is {width} wide, not {self.encoders[key]}.")
        self.unet_patcher = model.forge_objects.unet
        self.kmodel = self.unet_patcher.model
        self.unet = self.kmodel.diffusion_model
        if int(getattr(self.unet, "in_channels", 4)) != 4:
            raise HostError("The loaded model is an inpainting or edit model: train words on a base checkpoint.")
        predictor = self.kmodel.predictor
        if predictor.prediction_type not in ("epsilon", "v_prediction"):
            raise HostError(f"Prediction type {predictor.prediction_type!r} is not supported: use an eps or v model.")
        self.prediction_type = predictor.prediction_type
        sigmas = predictor.sigmas.detach().float().cpu().clone()
        self.schedule = DiscreteSchedule(1.0 / (1.0 + sigmas ** 2), self.prediction_type)
        self.num_timesteps = self.schedule.num_timesteps
        from backend import memory_management

        self.device = memory_management.get_torch_device()
        config = getattr(self.unet, "config", None) or {}
        levels = len(getattr(self.unet, "channel_mult", None) or config.get("channel_mult", (1, 2, 4, 4)))
        self.pixel_multiple = 8 * 2 ** (levels - 1)
        self.size = (1024, 1024) if self.sdxl else (512, 512)

    @staticmethod
    def _token_embedding(engine):
        return engine.text_encoder.transformer.text_model.embeddings.token_embedding

    # -- lifecycle ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self):
        text = [engine.text_encoder for engine in self.engines.values()]
        with frozen_parameters(self.unet, *text), plain_weights(self.unet, *text), _quiet_engines(), \
                _differentiable_attention(), autograd_friendly():
            yield self

    def register_word(self, path: Path) -> None:
        """Forge's own loading: every engine re-reads the embeddings folder."""
        for engine in self.engines.values():
            engine.embeddings.load_textual_inversion_embeddings()
        reset_cond_cache()

    # -- text ---------------------------------------------------------------------------------
    def word_vectors(self, text: str) -> WordVectors:
        out = {}
        for key, engine in self.engines.items():
            ids = engine.tokenize([text])[0]
            table = self._token_embedding(engine).wrapped.weight
            with torch.no_grad():
                out[key] = table[torch.tensor(ids, dtype=torch.long, device=table.device)].float().cpu().clone()
        return out

    def token_table_stats(self) -> dict[str, float]:
        with torch.no_grad():
            return {key: float(self._token_embedding(e).wrapped.weight.float().norm(dim=1).mean())
                    for key, e in self.engines.items()}

    def token_table(self, key: str) -> torch.Tensor:
        return self._token_embedding(self.engines[key]).wrapped.weight.detach()

    def token_strings(self) -> list[str]:
        from ..tokenizer import clip_vocabulary_strings  # every SD text encoder shares the CLIP BPE vocabulary

        return clip_vocabulary_strings(self.token_table(next(iter(self.engines))).shape[0])

    def _databases(self, words: dict[str, WordVectors]) -> list[tuple[object, str, object]]:
        from backend.text_processing.textual_inversion import Embedding, EmbeddingDatabase

        changes = []
        for key, engine in self.engines.items():
            database = EmbeddingDatabase(engine.tokenizer, engine.embeddings.expected_shape)
            for placeholder, vectors in words.items():
                if key not in vectors:
                    raise HostError(f"The word {placeholder} has no vectors for this model's text encoder {key}.")
                vec = {k: vectors[k] for k in self.encoders} if self.sdxl else vectors[key]
                embedding = Embedding(vec, placeholder)
                embedding.vectors = int(vectors[key].shape[0])
                embedding.shape = sum(self.encoders.values())
                database.register_embedding_by_name(embedding, placeholder)
            changes += [(engine, "embeddings", database), (self._token_embedding(engine), "embeddings", database)]
        return changes

    def encode_text(self, prompts: list[str], words: dict[str, WordVectors]) -> Any:
        from backend import memory_management

        memory_management.load_model_gpu(self.model.forge_objects.clip.patcher)
        prompts = list(prompts)
        with set_attributes(self._databases(words)):
            if not self.sdxl:
                return self.engines[next(iter(self.encoders))](prompts)
            cond_l = self.engines["clip_l"](prompts)
            cond_g, pooled = self.engines["clip_g"](prompts)
        vector = torch.cat([pooled, self._size_vector(pooled)], dim=1)
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": vector}

    def _size_vector(self, pooled: torch.Tensor) -> torch.Tensor:
        """SDXL's size/crop conditioning, as backend/diffusion_engine/sdxl.py builds it."""
        from modules.shared import opts

        height, width = self.size
        embed = self.model.embedder
        values = [height, width, opts.sdxl_crop_top, opts.sdxl_crop_left, height, width]
        with torch.no_grad():
            flat = torch.flatten(torch.cat([embed(torch.Tensor([v])) for v in values]))
        return flat.unsqueeze(0).repeat(pooled.shape[0], 1).to(pooled)

    # -- images and diffusion -----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        from backend import memory_management

        self.size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        vae = self.model.forge_objects.vae
        memory_management.load_models_gpu([vae.patcher])
        stage = vae.first_stage_model
        mean = posterior_mean(stage, pixels.to(vae.device, vae.vae_dtype))
        with torch.inference_mode(False):
            return stage.process_in(mean.float()).cpu().clone()

    def add_noise(self, latents, noise, timesteps):
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        return self.schedule.target(latents, noise, timesteps)

    def predict(self, noisy, timesteps, cond):
        from backend import memory_management

        memory_management.load_model_gpu(self.unet_patcher)
        return call_comfy_unet(self.unet, noisy, timesteps, cond, self.device, self.kmodel.computation_dtype)

    def autocast(self):
        return contextlib.nullcontext()  # Forge's operations cast weights to the computation dtype

    # -- previews, memory -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode_first_stage(latents.to(self.device)).float()

    def sample(self, prompts: list[str], words: dict[str, WordVectors], seed: int, steps: int, guidance: float,
               size: int) -> list:
        saved = self.size
        self.size = (size, size)
        try:
            with _quiet_engines():
                return euler_sample(self, prompts, words, seed, steps, guidance, size, self.schedule, self.decode)
        finally:
            self.size = saved

    def recompute_blocks(self) -> list[torch.nn.Module]:
        return [*self.unet.input_blocks, self.unet.middle_block, *self.unet.output_blocks]

    def free_memory(self) -> int | None:
        from backend import memory_management

        return int(memory_management.get_free_memory(self.device))
