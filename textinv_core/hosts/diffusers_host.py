"""The Host protocol on diffusers/transformers components: SD1.x, SD2.x (eps or v) and SDXL.

Pseudo-word vectors are spliced into the output of each text encoder's token-embedding layer by a
forward hook that lives only for one `encode_text` call: the token table is never written, so
every real word's row stays bit-identical, and gradients reach only the spliced vectors.
Must never download anything: configs and tokenizers come from the model folder or the pack.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..families import encoder_keys
from ..host import HostError, WordVectors
from ..memory import device_free_bytes
from ..model_files import check_model_path
from ..tokenizer import vocabulary_strings

log = logging.getLogger(__name__)
MAX_TOKENS = 77
SLOT_ID = 0  # any id but EOS: pooled outputs locate EOS with argmax(input_ids == eos)


def _part(folder: Path, name: str, from_pretrained):
    """One component of a diffusers folder; a file the loader cannot read is one error naming it."""
    try:
        return from_pretrained(folder, subfolder=name, local_files_only=True)
    except UserError:
        raise
    except Exception as error:  # the loaders raise OSError, ValueError, RuntimeError, their own errors...
        text = str(error)
        if isinstance(error, MemoryError) or "allocate" in text or "out of memory" in text.lower():
            raise
        first = text.splitlines()[0] if text else type(error).__name__
        raise HostError(f"The {name} in {folder / name} cannot be loaded ({type(error).__name__}: {first}): the "
                        "folder is incomplete or damaged; download the model again.") from error


@dataclass
class TextEncoder:
    key: str
    model: torch.nn.Module
    tokenizer: object

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]


@dataclass
class Conditioning:
    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


class DiffusersHost:
    """A loaded diffusers model as seen by the trainer; wraps the components, copies nothing."""

    def __init__(self, components: dict, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.unet = components["unet"]
        self.vae = components.get("vae")
        self.scheduler = components["scheduler"]
        second = ["_2"] if components.get("text_encoder_2") is not None else []
        models = [components[f"text_encoder{s}"] for s in ["", *second]]
        tokenizers = [components[f"tokenizer{s}"] for s in ["", *second]]
        self.family = components.get("family") or self._guess_family(models)
        keys = encoder_keys(self.family) if self.family in ("sd1", "sd2", "sdxl") else ("clip_l",)
        self.text_encoders = [TextEncoder(k, m, t) for k, m, t in zip(keys, models, tokenizers)]
        for module in self._modules():
            module.requires_grad_(False)
            module.eval()
            module.to(self.device)
            if next(module.parameters()).dtype != self.dtype:
                module.to(dtype=self.dtype)
        self.encoders = {enc.key: enc.width for enc in self.text_encoders}
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise HostError(f"Prediction type {self.prediction_type!r} is not supported: use an eps or v model.")
        self.num_timesteps = self.scheduler.config.num_train_timesteps
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.pixel_multiple = self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)
        self._table_stats: dict[str, float] | None = None

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def _guess_family(models: list) -> str:
        if len(models) == 2:
            return "sdxl"
        return "sd2" if models[0].get_input_embeddings().weight.shape[1] == 1024 else "sd1"

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, **single_file_options):
        """A diffusers folder or a single-file checkpoint (.safetensors/.ckpt), offline."""
        path = Path(path)
        if path.is_dir():
            return cls.from_pretrained(path, device=device, dtype=dtype)
        if path.is_file():
            from .single_file import load_single_file

            return cls(load_single_file(path, **single_file_options), device=device, dtype=dtype)
        raise HostError(f"No model at {path}: give a diffusers folder or a .safetensors/.ckpt checkpoint.")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
        """Load the parts of a diffusers folder that training needs (no safety checker, no hub)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from ..tokenizer import clip_tokenizer

        folder = Path(folder)
        check_model_path(folder)  # model_index.json, component folders, configs, complete weight files
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        parts: dict = {
            "unet": _part(folder, "unet", UNet2DConditionModel.from_pretrained),
            "scheduler": _part(folder, "scheduler", DDPMScheduler.from_pretrained),
        }
        if (folder / "vae").is_dir():
            parts["vae"] = _part(folder, "vae", AutoencoderKL.from_pretrained)
        for suffix, model_cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
            name = f"text_encoder{suffix}"
            if name not in index or not (folder / name).is_dir():
                continue
            parts[name] = _part(folder, name, model_cls.from_pretrained)
            tok_dir = folder / f"tokenizer{suffix}"
            parts[f"tokenizer{suffix}"] = (
                _part(folder, f"tokenizer{suffix}", CLIPTokenizer.from_pretrained)
                if tok_dir.is_dir() else clip_tokenizer("!" if suffix else "<|endoftext|>")
            )
        if "text_encoder" not in parts:
            raise HostError(f"{folder} has no text_encoder folder: textual inversion needs one.")
        return cls(parts, device=device, dtype=dtype)

    def _modules(self) -> list[torch.nn.Module]:
        mods = [self.unet] + [enc.model for enc in self.text_encoders]
        return mods + ([self.vae] if self.vae is not None else [])

    # -- text -----------------------------------------------------------------------------------
    def word_vectors(self, text: str) -> WordVectors:
        out = {}
        for enc in self.text_encoders:
            ids = enc.tokenizer(text, add_special_tokens=False).input_ids
            table = enc.model.get_input_embeddings().weight
            out[enc.key] = table[torch.tensor(ids, dtype=torch.long, device=table.device)].detach().float().cpu()
        return out

    def token_table_stats(self) -> dict[str, float]:
        if self._table_stats is None:
            self._table_stats = {
                enc.key: float(enc.model.get_input_embeddings().weight.float().norm(dim=1).mean())
                for enc in self.text_encoders
            }
        return self._table_stats

    def token_table(self, key: str) -> torch.Tensor:
        encoder = next(enc for enc in self.text_encoders if enc.key == key)
        return encoder.model.get_input_embeddings().weight.detach()

    def token_strings(self) -> list[str]:
        return vocabulary_strings(self.text_encoders[0].tokenizer, self.token_table(self.text_encoders[0].key).shape[0])

    def nearest_tokens(self, vectors: WordVectors, k: int = 5) -> list[list[str]]:
        """For each vector, the k real tokens with the highest cosine similarity (first encoder)."""
        enc = self.text_encoders[0]
        table = enc.model.get_input_embeddings().weight.float()
        query = vectors[enc.key].to(table.device).float()
        sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(table, dim=1).T
        ids = sims.topk(k, dim=1).indices.tolist()
        return [enc.tokenizer.convert_ids_to_tokens(row) for row in ids]

    def _tokenize(self, enc: TextEncoder, prompt: str, words: dict[str, WordVectors]):
        """Token ids with slots, and per slot (position, vector row) for splicing."""
        tok = enc.tokenizer
        ids = [tok.bos_token_id]
        slots: list[tuple[int, torch.Tensor]] = []
        pieces = re.split("(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + ")", prompt) \
            if words else [prompt]
        for piece in pieces:
            if piece in words:
                for row in words[piece][enc.key]:
                    slots.append((len(ids), row))
                    ids.append(SLOT_ID)
            elif piece.strip():
                ids.extend(tok(piece, add_special_tokens=False).input_ids)
        if len(ids) > MAX_TOKENS - 1:
            if any(pos >= MAX_TOKENS - 1 for pos, _ in slots):
                raise HostError(f"The prompt {prompt[:60]!r}... is longer than 75 tokens and cuts off a pseudo-word.")
            ids = ids[: MAX_TOKENS - 1]
        ids.append(tok.eos_token_id)
        ids += [tok.pad_token_id] * (MAX_TOKENS - len(ids))
        return ids, slots

    def _encode_one(self, enc: TextEncoder, prompts: list[str], words: dict[str, WordVectors]):
        batch_ids, rows, b_idx, p_idx = [], [], [], []
        for b, prompt in enumerate(prompts):
            ids, slots = self._tokenize(enc, prompt, words)
            batch_ids.append(ids)
            for pos, row in slots:
                b_idx.append(b)
                p_idx.append(pos)
                rows.append(row)
        input_ids = torch.tensor(batch_ids, dtype=torch.long, device=self.device)
        embedding = enc.model.get_input_embeddings()

        def splice(_module, _inputs, output):
            if not rows:
                return output
            values = torch.stack(rows).to(device=output.device, dtype=output.dtype)
            index = (torch.tensor(b_idx, device=output.device), torch.tensor(p_idx, device=output.device))
            return output.index_put(index, values)

        handle = embedding.register_forward_hook(splice)
        try:
            out = enc.model(input_ids, output_hidden_states=self.family == "sdxl")
        finally:
            handle.remove()
        if self.family == "sdxl":
            pooled = out.text_embeds if hasattr(out, "text_embeds") else None
            return out.hidden_states[-2], pooled
        return out.last_hidden_state, None

    def encode_text(self, prompts: list[str], words: dict[str, WordVectors]) -> Conditioning:
        hidden, pooled = [], None
        for enc in self.text_encoders:
            states, pool = self._encode_one(enc, prompts, words)
            hidden.append(states)
            pooled = pool if pool is not None else pooled
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    # -- images and diffusion -------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        if self.vae is None:  # pixel-space model
            return pixels.float()
        dist = self.vae.encode(pixels).latent_dist
        latents = dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def add_noise(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps.cpu()).to(latents.dtype)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps.cpu()).to(latents.dtype)
        return noise

    def _added_cond(self, cond: Conditioning, latents: torch.Tensor) -> dict | None:
        if self.family != "sdxl":
            return None
        h, w = latents.shape[-2] * self.vae_scale, latents.shape[-1] * self.vae_scale
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=cond.hidden.dtype)
        return {"text_embeds": cond.pooled, "time_ids": time_ids.repeat(latents.shape[0], 1)}

    def predict(self, noisy, timesteps, cond: Conditioning):
        hidden = cond.hidden.to(self.dtype)
        if hidden.shape[0] != noisy.shape[0]:
            raise HostError("The batch of prompts and the batch of latents differ in size.")
        pooled = None if cond.pooled is None else cond.pooled.to(self.dtype)
        added = self._added_cond(Conditioning(hidden, pooled), noisy)
        out = self.unet(noisy.to(self.dtype), timesteps.to(self.device), encoder_hidden_states=hidden,
                        added_cond_kwargs=added).sample
        return out.float()

    def autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    # -- memory ---------------------------------------------------------------------------------
    def recompute_blocks(self) -> list[torch.nn.Module]:
        """Every res block and transformer block of the UNet: recomputing each alone keeps one block's
        activations alive at a time during the backward pass."""
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        return [m for m in self.unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]

    def free_memory(self) -> int | None:
        return device_free_bytes(self.device)

    # -- sampling -------------------------------------------------------------------------------
    sample_batch = 128  # prompts per denoising batch (the toy world samples hundreds at a time)

    @torch.no_grad()
    def sample(self, prompts: list[str], words: dict[str, WordVectors], seed: int = 0, steps: int = 20,
               guidance: float = 5.0, size: int = 64) -> list:
        """One PIL image per prompt: DDIM (Song et al. 2021) with classifier-free guidance (Ho & Salimans
        2022); the initial noise of every prompt is drawn at once from `seed`."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        side = size // self.vae_scale
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(prompts), self.unet.config.in_channels, side, side, generator=generator)
        images = []
        for start in range(0, len(prompts), self.sample_batch):
            chunk = list(prompts[start:start + self.sample_batch])
            n = len(chunk)
            cond = self.encode_text(chunk + [""] * n, words)
            x = noise[start:start + n].to(self.device) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                out = self.predict(scheduler.scale_model_input(torch.cat([x, x]), t), t.repeat(2 * n), cond)
                guided = out[n:] + guidance * (out[:n] - out[n:])
                x = scheduler.step(guided, t, x).prev_sample
            images.extend(self._to_pil(x))
        return images

    def _to_pil(self, latents: torch.Tensor) -> list:
        from PIL import Image

        out = []
        for latent in latents.split(1):
            if self.vae is not None:
                shift = getattr(self.vae.config, "shift_factor", None) or 0.0
                latent = self.vae.decode((latent / self.vae.config.scaling_factor + shift).to(self.dtype)).sample
            pixels = ((latent[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            out.append(Image.fromarray(pixels))
        return out
