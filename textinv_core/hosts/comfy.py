"""The Host protocol on the MODEL / CLIP / VAE objects a ComfyUI graph already loaded.

Nothing is loaded twice and nothing the graph shares is changed:
- the MODEL and CLIP are cloned (ModelPatcher clones share the weights) and the clones are given
  identity weight wrappers. ComfyUI then casts a fresh copy of each weight in every forward
  (comfy/ops.py cast_bias_weight, copy=True when a wrapper exists), made outside inference mode,
  so autograd accepts it. ComfyUI loads weights under torch.inference_mode(), and inference tensors
  cannot be saved for backward (the check runs before any saved-tensor hook); ComfyUI's own
  TrainLoraNode takes the same route.
- no copy of a weight outlives its op (`_WeightsByReference`): during a training forward, saved-tensor
  hooks replace each weight copy autograd would keep by a note of where it came from, and the
  backward pass reads the module's own weight again (no copy when it already has the dtype and
  device of the op, else one transient cast). So a step holds the weights once, not twice, in every
  VRAM mode, a partly loaded model included.
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
import weakref
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


def _attention_with_backward(func, *args, **kwargs):
    """ComfyUI's `optimized_attention_override` for the training forward. Its sub-quadratic attention
    (its default without PyTorch attention: on CPU, and with --use-quad-cross-attention) splits the keys
    when free memory is short and then exponentiates in place (`torch.exp(out=)`), which autograd
    refuses; those calls go to PyTorch's scaled_dot_product_attention, which has a backward and needs no
    more memory. Every other attention runs as ComfyUI chose it."""
    from comfy.ldm.modules import attention

    sub_quad = getattr(attention.attention_sub_quad, "__wrapped__", attention.attention_sub_quad)
    if torch.is_grad_enabled() and func in (sub_quad, attention.attention_sub_quad):
        return attention.attention_pytorch(*args, **kwargs)
    return func(*args, **kwargs)


class _WeightNote:
    """A ComfyUI weight wrapper (`ModelPatcher.add_weight_wrapper`) that returns the weight unchanged.

    Its presence makes ComfyUI cast a fresh, autograd-safe copy of the weight for each op. While a
    training forward runs (`_WeightsByReference.active`), it also notes which module's weight that
    copy is, so the saved-tensor hooks can keep a note instead of the copy. With grad on, it detaches
    the copy: a word needs no weight gradient.
    """

    def __init__(self, owner: _WeightsByReference, patcher, module: torch.nn.Module, attr: str):
        self.owner, self.patcher, self.module, self.attr = owner, patcher, module, attr

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            # Detached: ComfyUI's UNet parameters require grad, so without this every backward pass
            # would also compute each weight's gradient into the shared model's .grad. Always, not
            # only in `active`: a recomputed block must save the same tensors as its first forward.
            weight = weight.detach()
        table = self.owner.table
        if table is not None and weight.layout == torch.strided:
            table[weight.untyped_storage().data_ptr()] = (weakref.ref(weight), _WeightSource(self, weight))
        return weight

    def chain_before(self) -> list | None:
        """The module's weight functions that ComfyUI applies before this note (e.g. a LoRA patch on a
        partly loaded model); None when the note is no longer on the module."""
        chain = getattr(self.module, f"{self.attr}_function", None) or []
        for i, function in enumerate(chain):
            if function is self:
                return list(chain[:i])
        return None


class _WeightSource:
    """How to make again, in the backward pass, the weight copy one op of the forward pass used."""

    __slots__ = ("note", "dtype", "device", "shape", "stride", "offset", "patches_uuid")

    def __init__(self, note: _WeightNote, copy: torch.Tensor):
        self.note = note
        self.dtype, self.device, self.shape = copy.dtype, copy.device, copy.shape
        self.stride, self.offset = copy.stride(), copy.storage_offset()
        self.patches_uuid = getattr(note.patcher.model, "current_weight_patches_uuid", None)

    def derive(self) -> torch.Tensor:
        """A tensor laid out like the forward's copy with the same values: the module's own weight when
        it already has the op's dtype and device (no copy), else a fresh cast the way ComfyUI casts."""
        import comfy.model_management as mm

        note = self.note
        if getattr(note.patcher, "patches", None) and \
                getattr(note.patcher.model, "current_weight_patches_uuid", None) != self.patches_uuid:
            raise HostError("ComfyUI unloaded or re-patched the model in the middle of a training step, so "
                            "the patched weights of the forward pass are gone: free memory for training, or "
                            "start ComfyUI with --highvram.")
        weight = getattr(note.module, note.attr)
        before = note.chain_before() or []
        if not before and weight.dtype == self.dtype and weight.device == self.device \
                and weight.shape == self.shape and weight.stride() == self.stride:
            note.owner.reads["in_place"] += 1
            return weight
        note.owner.reads["cast"] += 1
        weight = mm.cast_to(weight, self.dtype, self.device, copy=True)
        for function in before:
            weight = function(weight)
        if weight.stride() != self.stride:
            weight = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device).copy_(weight)
        return weight


class _SavedWeight:
    """What autograd keeps instead of a weight copy: the source and the saved view's layout."""

    __slots__ = ("source", "size", "stride", "offset")

    def __init__(self, source: _WeightSource, saved: torch.Tensor):
        self.source, self.size, self.stride = source, saved.size(), saved.stride()
        self.offset = saved.storage_offset() - source.offset

    def unpack(self) -> torch.Tensor:
        base = self.source.derive()
        return base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)


class _Outer:
    """A tensor packed by saved-tensor hooks that were active outside ours (e.g. a memory probe)."""

    __slots__ = ("unpack_hook", "packed")

    def __init__(self, unpack_hook, packed):
        self.unpack_hook, self.packed = unpack_hook, packed


def _outer_hooks():
    """The saved-tensor hooks active before ours (None when none): ours pass every other tensor on."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class _WeightsByReference:
    """Saved-tensor hooks that keep no copy of a weight for the backward pass.

    ComfyUI's ops cast each weight for each op (see `_WeightNote`); autograd would keep every one of
    those copies until the backward pass, a second copy of the UNet and text encoders per step. The
    pack hook replaces a tensor that shares storage with a noted copy by a `_SavedWeight`, and the
    unpack hook makes it again from the module's weight. Inside blocks that the engine recomputes
    (non-reentrant checkpointing) checkpointing's own hooks are innermost and keep nothing anyway.
    """

    def __init__(self):
        self.table: dict[int, tuple] | None = None  # storage address -> (weakref to copy, source)
        self.notes: list[tuple[Any, _WeightNote]] = []
        self.reads = {"in_place": 0, "cast": 0}  # how the backward passes got their weights (for tests)

    def wrap(self, patcher) -> None:
        """Give every weight and bias of `patcher`'s model a `_WeightNote` wrapper."""
        for name, module in patcher.model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            for attr in ("weight", "bias"):
                if getattr(module, attr, None) is not None:
                    note = _WeightNote(self, patcher, module, attr)
                    patcher.add_weight_wrapper(f"{name}.{attr}" if name else attr, note)
                    self.notes.append((module, note))

    def unwrap(self) -> None:
        """Take the wrappers off the shared modules now (ComfyUI would only on the next load)."""
        for module, note in self.notes:
            chain = getattr(module, f"{note.attr}_function", None)
            if chain and any(f is note for f in chain):
                setattr(module, f"{note.attr}_function", [f for f in chain if f is not note])
        self.notes.clear()

    def _pack(self, tensor: torch.Tensor, outer):
        entry = None
        if self.table and tensor.layout == torch.strided:
            try:
                entry = self.table.get(tensor.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # a tensor without storage (subclasses)
                entry = None
        if entry is not None:
            copy = entry[0]()
            if copy is not None and copy.dtype == tensor.dtype:
                return _SavedWeight(entry[1], tensor)
        return _Outer(outer[1], outer[0](tensor)) if outer is not None else tensor

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, _SavedWeight):
            return packed.unpack()
        if isinstance(packed, _Outer):
            return packed.unpack_hook(packed.packed)
        return packed

    @contextlib.contextmanager
    def active(self):
        """Within the block, autograd saves notes instead of weight copies (only when grad is on)."""
        if self.table is not None or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            yield
            return
        outer = _outer_hooks()
        self.table = {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, outer), self._unpack):
                yield
        finally:
            self.table = None


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
        self.by_reference = _WeightsByReference()
        self.patcher = model.clone()
        self.by_reference.wrap(self.patcher)
        self.clip = clip.clone()
        self.by_reference.wrap(self.clip.patcher)
        self.vae = vae
        self.base = base
        self._tables: dict[str, torch.Tensor] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Unload this host's clones and take its wrappers off the shared modules now."""
        import comfy.model_management as mm

        mine = {id(self.patcher), id(self.clip.patcher)}
        for i in reversed(range(len(mm.current_loaded_models))):
            loaded = mm.current_loaded_models[i]
            if id(loaded.model) in mine:
                loaded.model_unload()
                mm.current_loaded_models.pop(i)
        self.by_reference.unwrap()

    # -- memory -------------------------------------------------------------------------------
    def load(self) -> None:
        """Let ComfyUI place both clones on its device, in its VRAM mode (no-op when they are)."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher, self.clip.patcher])

    def free_memory(self) -> int | None:
        """Bytes ComfyUI's model management reports free on its device once both clones are loaded."""
        import comfy.model_management as mm

        self.load()
        return int(mm.get_free_memory(self.device))

    def recompute_blocks(self) -> list[torch.nn.Module]:
        """Every res block and transformer block of the UNet (as the diffusers host recomputes them).

        Not the input/middle/output blocks themselves: ComfyUI's UNet runs those through
        `forward_timestep_embed(block, ...)`, never `block(...)`, so a patched block forward would never
        be called; their res and transformer blocks are called as modules.
        """
        from comfy.ldm.modules.attention import BasicTransformerBlock
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        unet = self.base.diffusion_model
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        return [m for block in blocks for m in block.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]

    @property
    def vram_state(self) -> str:
        """ComfyUI's VRAM mode: 'HIGH_VRAM', 'NORMAL_VRAM', 'LOW_VRAM', 'NO_VRAM', 'DISABLED' (CPU), 'SHARED'."""
        import comfy.model_management as mm

        return mm.vram_state.name

    def lower_vram_flag(self) -> str | None:
        """The ComfyUI start flag that uses less device memory than the mode it runs in; None when none."""
        return {"HIGH_VRAM": "--normalvram", "NORMAL_VRAM": "--lowvram", "LOW_VRAM": "--novram"}.get(self.vram_state)

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

    def token_table(self, key: str) -> torch.Tensor:
        """The frozen token-embedding table of encoder `key` (an fp32 CPU copy: the model's is never written)."""
        return self._table(key)

    def token_strings(self) -> list[str]:
        """Each token id's text ('</w>' dropped, special tokens ''), from the tokenizer the encoders share."""
        from ..tokenizer import vocabulary_strings

        key = sorted(self.encoders)[0]
        tokenizer = inner_tokenizers(self.clip.tokenizer)[key][1].tokenizer  # transformers' CLIPTokenizer
        return vocabulary_strings(tokenizer, self._table(key).shape[0])

    def encode_text(self, prompts: list[str], words: dict[str, WordVectors]) -> ComfyConditioning:
        tokenizer = tokenizer_with_words(self.clip.tokenizer, words) if words else self.clip.tokenizer
        encoded: dict[str, tuple] = {}  # each distinct prompt once (evaluation repeats one prompt)
        with _differentiable_clip(), self.by_reference.active():
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

        self.load()
        base = self.base
        device = mm.get_torch_device()
        noisy = noisy.to(device)
        sigma = self._sigmas(timesteps, noisy).to(device)
        dtype = base.manual_cast_dtype or base.get_dtype()
        xc = self.sampling.calculate_input(sigma.view(-1), noisy).to(dtype)
        t = self.sampling.timestep(sigma.view(-1)).float()
        extra = {k: v.to(device, dtype) for k, v in self._extra(cond, noisy).items()}
        context = cond.cross.to(device, dtype)
        with self.by_reference.active():
            options = {"optimized_attention_override": _attention_with_backward}
            out = base.diffusion_model(xc, t, context=context, control=None, transformer_options=options, **extra)
        return out.float()

    def autocast(self):
        return contextlib.nullcontext()  # ComfyUI's ops already cast weights to the compute dtype

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], words: dict[str, WordVectors], seed: int = 0, steps: int = 20,
               guidance: float = 5.0, size: int = 512) -> list:
        """One PIL image per prompt from ComfyUI's own sampler (euler, normal schedule) with the given words.

        The initial noise of all prompts is drawn at once from `seed` (comfy.sample.prepare_noise on the
        whole batch); each prompt is then sampled on its slice, so its image does not depend on the
        other prompts. SDXL gets the image size as its size conditioning, as CLIPTextEncodeSDXL does.
        """
        import comfy.sample

        clip = with_words(self.clip, words)
        extra = {"width": size, "height": size, "target_width": size, "target_height": size} \
            if self.family == "sdxl" else {}

        def conditioning(text: str) -> list:
            out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
            return [[out.pop("cond"), dict(out, **extra)]]

        side = size // 8
        latent_channels = getattr(self.base.latent_format, "latent_channels", 4)
        noise = comfy.sample.prepare_noise(torch.zeros(len(prompts), latent_channels, side, side), seed)
        negative = conditioning("")
        images = []
        for i, prompt in enumerate(prompts):
            latent = torch.zeros(1, latent_channels, side, side)
            samples = comfy.sample.sample(self.patcher, noise[i:i + 1], steps, guidance, "euler", "normal",
                                          conditioning(prompt), negative, latent, seed=seed, disable_pbar=True)
            images.append(self._to_pil(self.vae.decode(samples)[0]))
        return images

    @staticmethod
    def _to_pil(pixels: torch.Tensor):
        from PIL import Image

        array = (pixels.float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
        return Image.fromarray(array.reshape(array.shape[-3], array.shape[-2], array.shape[-1]))
