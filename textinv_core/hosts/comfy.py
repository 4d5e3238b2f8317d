"""The Host protocol on the MODEL / CLIP / VAE objects a ComfyUI graph already loaded.

Nothing is loaded twice and nothing the graph shares is changed:
- the MODEL and CLIP are cloned (ModelPatcher clones share the weights) and the clones are given
  identity weight wrappers. ComfyUI then casts a fresh copy of each weight in every forward
  (comfy/ops.py cast_bias_weight, copy=True when a wrapper exists), made outside inference mode,
  so autograd can save it. ComfyUI loads weights under torch.inference_mode(), and inference tensors
  cannot be saved for backward; the same route is used by ComfyUI's own TrainLoraNode.
- the tokenizer is copied, never taught words in place: `CLIP.clone()` shares it, so a word taught
  in place would leak into every branch of the graph (see `tokenizer_with_words`).
- comfy/clip_model.py CLIPLayer adds in place (`x += ...`); backward through it fails, so its
  forward is swapped for an out-of-place one only while this host encodes text.
- devices and VRAM modes are ComfyUI's: `load_models_gpu` places the models.

Pseudo-words reach the text encoder the way ComfyUI's own `embedding:name` does: the copied
tokenizers rewrite `<my-cat>` to ` embedding:<id> `, resolved from memory to the word's vectors,
which SDClipModel.process_tokens splices into the token embeddings with torch.cat. Prompt weights
such as `(<my-cat>:1.2)`, multi-vector words and 77-token chunking therefore behave exactly as
with an embedding file.

`predict` calls the UNet the way BaseModel._apply_model does and returns its raw output (eps or
v); it does not run model_options patches (FreeU, hooks): the word is trained against the plain
checkpoint, which is what an embedding file is later used with.

ComfyUI is imported only inside functions: importing this module never imports ComfyUI.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..host import HostError, WordVectors

MARK = "textinv-word-"
FAMILY_BY_KEYS = {("clip_l",): "sd1", ("clip_h",): "sd2", ("clip_g", "clip_l"): "sdxl"}


# -- tokenizers that know pseudo-words -----------------------------------------------------------
def inner_tokenizers(tokenizer) -> dict[str, Any]:
    """The per-encoder SDTokenizers inside a ComfyUI tokenizer, by encoder key ('clip_l', ...)."""
    from comfy.sd1_clip import SDTokenizer

    found = {}
    for attr, value in vars(tokenizer).items():
        if isinstance(value, SDTokenizer):
            found[value.embedding_key] = (attr, value)
    return found


def _rewrite(text: str, placeholders: dict[str, str]) -> str:
    if not placeholders:
        return text
    pattern = "|".join(re.escape(p) for p in sorted(placeholders, key=len, reverse=True))
    return re.sub(pattern, lambda m: f" embedding:{placeholders[m.group(0)]} ", text)


_WORD_CLASSES: dict[type, type] = {}


def _word_class(base: type) -> type:
    """A subclass of one SDTokenizer class that resolves in-memory words before files."""
    if getattr(base, "_textinv_words_class", False):
        return base
    if base not in _WORD_CLASSES:

        class WordTokenizer(base):
            _textinv_words_class = True

            def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
                ids = {p: ident for p, (ident, _) in self._textinv_words.items()}
                return super().tokenize_with_weights(_rewrite(text, ids), return_word_ids, **kwargs)

            def _try_get_embedding(self, embedding_name):
                parts = embedding_name.split()
                if parts and parts[0].startswith(MARK):
                    for ident, vectors in self._textinv_words.values():
                        if ident == parts[0]:
                            return vectors, " ".join(parts[1:])
                return super()._try_get_embedding(embedding_name)

        WordTokenizer.__name__ = WordTokenizer.__qualname__ = f"Textinv{base.__name__}"
        _WORD_CLASSES[base] = WordTokenizer
    return _WORD_CLASSES[base]


def tokenizer_with_words(tokenizer, words: dict[str, WordVectors]):
    """A copy of a ComfyUI tokenizer in which each placeholder of `words` types its vectors.

    The original tokenizer (shared by every clone of the CLIP) is not modified. Words already
    known to `tokenizer` (from an earlier Load Pseudo-word) are kept; a placeholder given again
    is replaced.
    """
    inner = inner_tokenizers(tokenizer)
    if not inner:
        raise HostError("This CLIP has no CLIP-style tokenizer: pseudo-words work with SD1.x, SD2.x and SDXL.")
    outer = copy.copy(tokenizer)
    for key, (attr, tok) in inner.items():
        new = copy.copy(tok)
        new.__class__ = _word_class(type(tok))
        known = dict(getattr(tok, "_textinv_words", {}))
        for placeholder, vectors in words.items():
            if key not in vectors:
                raise HostError(f"The word {placeholder} has no vectors for this model's text encoder '{key}'.")
            ident = known[placeholder][0] if placeholder in known else f"{MARK}{len(known)}"
            known[placeholder] = (ident, vectors[key])
        new._textinv_words = known
        if new.embedding_directory is None:
            new.embedding_directory = []  # `embedding:` is only parsed when a directory is set
        setattr(outer, attr, new)
    return outer


def known_words(tokenizer) -> list[str]:
    """Placeholders a (copied) tokenizer resolves from memory."""
    words: set[str] = set()
    for _, tok in inner_tokenizers(tokenizer).values():
        words.update(getattr(tok, "_textinv_words", {}))
    return sorted(words)


def clip_encoders(clip) -> dict[str, int]:
    """Encoder key -> token-embedding width, from a ComfyUI CLIP object."""
    return {key: int(tok.embedding_size) for key, (_, tok) in sorted(inner_tokenizers(clip.tokenizer).items())}


def clip_family(clip) -> str:
    keys = tuple(sorted(clip_encoders(clip)))
    family = FAMILY_BY_KEYS.get(keys)
    if family is None:
        raise HostError(
            f"This CLIP has text encoders {', '.join(keys) or 'none'}: textinv supports SD1.x (clip_l), "
            "SD2.x (clip_h) and SDXL (clip_l + clip_g)."
        )
    return family


def with_words(clip, words: dict[str, WordVectors]):
    """A clone of a ComfyUI CLIP whose tokenizer types `words`; the given CLIP is unchanged."""
    out = clip.clone()
    out.tokenizer = tokenizer_with_words(clip.tokenizer, words)
    return out


# -- training ------------------------------------------------------------------------------------
def _out_of_place_clip_layer(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextlib.contextmanager
def _differentiable_clip():
    import comfy.clip_model

    layer = comfy.clip_model.CLIPLayer
    original = layer.forward
    layer.forward = _out_of_place_clip_layer
    try:
        yield
    finally:
        layer.forward = original


def _identity(weight):
    return weight


def _wrap_weights(patcher) -> None:
    """Identity wrappers on every weight/bias, so each forward uses a fresh autograd-safe copy."""
    for name, module in patcher.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                patcher.add_weight_wrapper(f"{name}.{attr}" if name else attr, _identity)


@dataclass
class ComfyConditioning:
    cross: torch.Tensor                 # [B, tokens, width]
    pooled: torch.Tensor | None = None  # [B, width] (SDXL)
    extra: dict = field(default_factory=dict)


class ComfyHost:
    """A ComfyUI MODEL/CLIP/VAE as seen by the trainer. Use as a context manager (or call close)."""

    def __init__(self, model, clip, vae):
        import comfy.model_management as mm
        import comfy.model_sampling

        if model is None or clip is None or vae is None:
            raise HostError("Train Embedding needs the MODEL, CLIP and VAE of one checkpoint.")
        self.family = clip_family(clip)
        self.encoders = clip_encoders(clip)
        base = model.model
        model_family = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl"}.get(type(base.model_config).__name__)
        if model_family is not None and model_family != self.family:
            raise HostError(f"The MODEL is {model_family} but the CLIP is {self.family}: "
                            "wire the outputs of one checkpoint.")
        self.sampling = model.get_model_object("model_sampling")
        if isinstance(self.sampling, comfy.model_sampling.V_PREDICTION):
            self.prediction_type = "v_prediction"
        elif isinstance(self.sampling, comfy.model_sampling.EPS):
            self.prediction_type = "epsilon"
        else:
            raise HostError(f"Model sampling {type(self.sampling).__name__} is not supported: use an eps or v model.")
        self.sigma_table = self.sampling.sigmas.detach().float().cpu().clone()
        self.num_timesteps = int(self.sigma_table.shape[0])
        self.device = mm.get_torch_device()
        levels = len(base.model_config.unet_config.get("channel_mult", [1, 2, 4, 4]))
        self.pixel_multiple = 8 * 2 ** (levels - 1)  # VAE factor x UNet downsampling
        self.patcher = model.clone()
        _wrap_weights(self.patcher)
        self.clip = clip.clone()
        _wrap_weights(self.clip.patcher)
        self.vae = vae
        self.base = base
        self._tables: dict[str, torch.Tensor] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Unload this host's clones, so the wrappers leave the shared modules now."""
        import comfy.model_management as mm

        mine = {id(self.patcher), id(self.clip.patcher)}
        for i in reversed(range(len(mm.current_loaded_models))):
            loaded = mm.current_loaded_models[i]
            if id(loaded.model) in mine:
                loaded.model_unload()
                mm.current_loaded_models.pop(i)

    # -- text ---------------------------------------------------------------------------------
    def _table(self, key: str) -> torch.Tensor:
        if key not in self._tables:
            encoder = getattr(self.clip.cond_stage_model, key, None)
            if encoder is None:
                raise HostError(f"This CLIP has no text encoder '{key}'.")
            weight = encoder.transformer.get_input_embeddings().weight
            with torch.inference_mode(False):
                self._tables[key] = weight.detach().float().cpu().clone()
        return self._tables[key]

    def word_vectors(self, text: str) -> WordVectors:
        out = {}
        for key, (_, tok) in inner_tokenizers(self.clip.tokenizer).items():
            ids = tok.tokenizer(text)["input_ids"]
            ids = ids[tok.tokens_start:-1] if tok.tokenizer_adds_end_token else ids[tok.tokens_start:]
            out[key] = self._table(key)[torch.tensor(ids, dtype=torch.long)].clone()
        return out

    def token_table_stats(self) -> dict[str, float]:
        return {key: float(self._table(key).norm(dim=1).mean()) for key in self.encoders}

    def encode_text(self, prompts: list[str], words: dict[str, WordVectors]) -> ComfyConditioning:
        tokenizer = tokenizer_with_words(self.clip.tokenizer, words) if words else self.clip.tokenizer
        encoded: dict[str, tuple] = {}  # each distinct prompt once (evaluation repeats one prompt)
        with _differentiable_clip():
            for prompt in dict.fromkeys(prompts):
                tokens = tokenizer.tokenize_with_weights(prompt)
                out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
                encoded[prompt] = (out["cond"], out.get("pooled_output"))
        cross = [encoded[p][0] for p in prompts]
        pooled = [encoded[p][1] for p in prompts]
        lengths = {c.shape[1] for c in cross}
        if len(lengths) != 1:
            raise HostError("Training prompts of different lengths (over 75 tokens): shorten the captions.")
        pooled_t = torch.cat(pooled) if all(p is not None for p in pooled) else None
        return ComfyConditioning(torch.cat(cross), pooled_t)

    # -- images and diffusion -----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
        latents = self.vae.encode(images)
        return self.base.process_latent_in(latents).float().cpu().clone()

    def _sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma_table[timesteps.long().cpu()].to(like.device, torch.float32)
        return sigma.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, latents, noise, timesteps):
        return latents + noise * self._sigmas(timesteps, latents)  # EPS.noise_scaling (k-diffusion x)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "v_prediction":
            sigma = self._sigmas(timesteps, latents)
            scale = (sigma ** 2 + 1.0).rsqrt()  # VP: x_t = a x0 + s eps, a = 1/sqrt(1+sigma^2), s = sigma a
            return scale * noise - sigma * scale * latents
        return noise

    def _extra(self, cond: ComfyConditioning, noisy: torch.Tensor) -> dict:
        if self.family != "sdxl":
            return {}
        height, width = noisy.shape[-2] * 8, noisy.shape[-1] * 8
        conds = self.base.extra_conds(cross_attn=cond.cross, pooled_output=cond.pooled, width=width,
                                      height=height, target_width=width, target_height=height,
                                      crop_w=0, crop_h=0, device=noisy.device)
        return {"y": conds["y"].cond} if "y" in conds else {}

    def predict(self, noisy, timesteps, cond: ComfyConditioning):
        """The UNet's raw output (eps or v), as BaseModel._apply_model computes it before denoising."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher])
        base = self.base
        device = mm.get_torch_device()
        noisy = noisy.to(device)
        sigma = self._sigmas(timesteps, noisy).to(device)
        dtype = base.manual_cast_dtype or base.get_dtype()
        xc = self.sampling.calculate_input(sigma.view(-1), noisy).to(dtype)
        t = self.sampling.timestep(sigma.view(-1)).float()
        extra = {k: v.to(device, dtype) for k, v in self._extra(cond, noisy).items()}
        context = cond.cross.to(device, dtype)
        out = base.diffusion_model(xc, t, context=context, control=None, transformer_options={}, **extra)
        return out.float()

    def autocast(self):
        return contextlib.nullcontext()  # ComfyUI's ops already cast weights to the compute dtype

    # -- previews -----------------------------------------------------------------------------
    @torch.no_grad()
    def preview(self, prompt: str, words: dict[str, WordVectors], seed: int = 0, steps: int = 20,
                size: int = 512, cfg: float = 5.0):
        """A PIL image of `prompt` sampled by ComfyUI's own sampler with the given word vectors."""
        import comfy.sample
        from PIL import Image

        clip = with_words(self.clip, words)
        conds = []
        for text in (prompt, ""):
            out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
            cond = out.pop("cond")
            conds.append([[cond, out]])
        side = size // 8
        latent = torch.zeros(1, 4, side, side)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(self.patcher, noise, steps, cfg, "euler", "normal", conds[0], conds[1],
                                      latent, seed=seed, disable_pbar=True)
        pixels = self.vae.decode(samples)[0]
        array = (pixels.float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
        return Image.fromarray(array.reshape(array.shape[-3], array.shape[-2], array.shape[-1]))
