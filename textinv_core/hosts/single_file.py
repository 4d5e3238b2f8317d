"""Load an original-layout single-file checkpoint (SD1.x, SD2.x, SDXL base) as diffusers components.

Users have `.safetensors`/`.ckpt` files in the Stability/LDM layout, not diffusers folders. This
module reads such a file fully offline: the family comes from the key layout, every model config
is inferred from tensor shapes (so reduced-depth UNets load too), and the key renaming is done by
diffusers' own converters in `diffusers.loaders.single_file_utils`. Every model is loaded with a
strict key check, so no weight silently stays random.

It must never unpickle arbitrary objects (`.ckpt`/`.pt` go through `torch.load(weights_only=True)`
only), never reach a model hub, and never write to the checkpoint.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..host import HostError

logger = logging.getLogger(__name__)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_CLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_CLIP_G = "conditioner.embedders.1.model."
# Keys outside these prefixes (EMA copies, optimizer leftovers, ...) are never read.
_KEEP = (UNET, VAE, "cond_stage_model.", "conditioner.")
V_PRED_MARKER = "v_pred"  # an (empty) tensor some tools add to mark v-prediction files (ComfyUI reads it)
SD2_V_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
_SUFFIXES = (".safetensors", ".ckpt", ".pt")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the prefixes a SD model uses, plus the v-prediction marker."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise HostError(
            f"{path.name}: unsupported checkpoint type {suffix!r}. Give a .safetensors file (preferred) "
            "or a .ckpt/.pt file; convert other formats to .safetensors first."
        )
    if not path.is_file():
        raise HostError(f"checkpoint not found: {path}")
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            _require_full_checkpoint(f.keys())
            return {k: f.get_tensor(k) for k in f.keys() if k == V_PRED_MARKER or k.startswith(_KEEP)}
    try:
        # Tensors and plain containers only: a pickled object is refused, never constructed.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise HostError(
            f"{path.name} contains pickled objects beyond plain tensors, so it is refused unopened (loading "
            "it could run code). Convert it to .safetensors with a tool you trust, or use a .safetensors "
            f"release of the model. Detail: {str(e).splitlines()[0]}"
        ) from e
    if not isinstance(raw, dict):
        raise HostError(f"{path.name}: expected a dict of tensors, found {type(raw).__name__}")
    state = raw.get("state_dict", raw)
    if not isinstance(state, dict):
        raise HostError(f"{path.name}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    _require_full_checkpoint(state)
    if V_PRED_MARKER in raw and V_PRED_MARKER not in state:
        state = {**state, V_PRED_MARKER: raw[V_PRED_MARKER]}
    return {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and (k == V_PRED_MARKER or k.startswith(_KEEP))
    }


def _layout_summary(keys: Iterable[str]) -> str:
    """'prefix (count), ...' of the first two key components: what an error message should show."""
    counts: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2])
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{h}.* ({n})" for h, n in sorted(counts.items())[:12]) or "no tensors"


def _require_full_checkpoint(keys: Iterable[str]) -> None:
    """A UNet-only, VAE-only, LoRA or embedding file is refused before any tensor is read."""
    keys = list(keys)
    if not any(k.startswith(UNET) for k in keys) or not any(k.startswith(VAE) for k in keys):
        raise HostError(
            "not a full Stable Diffusion checkpoint: it needs the UNet (model.diffusion_model.*) and the VAE "
            f"(first_stage_model.*) in one file. Found: {_layout_summary(keys)}"
        )


def detect_family(sd: dict[str, torch.Tensor]) -> str:
    """'sd1', 'sd2' or 'sdxl' from which text encoder(s) the file carries."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    _require_full_checkpoint(sd)
    if has(SDXL_CLIP_L) and has(SDXL_CLIP_G):
        return "sdxl"
    if has(SD2_CLIP):
        return "sd2"
    if has(SD1_CLIP):
        return "sd1"
    raise HostError(
        "unknown checkpoint layout: expected SD1 (cond_stage_model.transformer.*), SD2 "
        "(cond_stage_model.model.*) or SDXL base (conditioner.embedders.0.transformer.* + "
        f"conditioner.embedders.1.model.*). Found: {_layout_summary(sd)}"
    )


def detect_prediction_type(sd: dict[str, torch.Tensor], family: str) -> str:
    """'v_prediction' if the file says so (marker key, or SD2's norm-bias heuristic), else 'epsilon'."""
    if V_PRED_MARKER in sd:
        return "v_prediction"
    if family != "sd2":
        return "epsilon"
    probe = sd.get(SD2_V_PROBE)
    if probe is None:
        logger.info("%s is absent (reduced UNet?): assuming an epsilon-prediction SD2 model", SD2_V_PROBE)
        return "epsilon"
    conv_in = sd.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        return "epsilon"  # SD2 inpainting models are epsilon
    # Heuristic from ComfyUI's supported_models.SD20.model_type: v-models have a wider norm bias.
    return "v_prediction" if torch.std(probe.float(), unbiased=False) > 0.09 else "epsilon"


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over `keys`."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _attention(u: dict[str, torch.Tensor], block: str) -> int:
    """Transformer depth of the SpatialTransformer at `block` ('input_blocks.4.1'), 0 if none."""
    return len(_indices(u, re.escape(block) + r"\.transformer_blocks\.(\d+)\."))


def unet_config(sd: dict[str, torch.Tensor], family: str, prediction_type: str) -> dict[str, Any]:
    """A UNet2DConditionModel config inferred from the LDM UNet's tensor shapes."""
    u = _sub(sd, UNET)
    conv_in = u["input_blocks.0.0.weight"]
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (out channels, transformer depth) per resnet
    for i in _indices(u, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in u:
            levels.append([])
            continue
        width = u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]
        levels[-1].append((width, _attention(u, f"input_blocks.{i}.1")))
    per_level = {len(level) for level in levels}
    if len(per_level) != 1 or any(len({w for w, _ in level}) != 1 for level in levels):
        raise HostError(f"unsupported UNet: res blocks or widths differ within/between levels ({levels})")
    layers = per_level.pop()
    channels = [level[0][0] for level in levels]
    # A level's depth is its deepest block's; blocks that differ are fitted after building (_fit_attention).
    depths = [max(d for _, d in level) for level in levels]
    n = len(levels)
    outputs = _indices(u, r"output_blocks\.(\d+)\.")
    if len(outputs) != n * (layers + 1):
        raise HostError(
            f"unsupported UNet: {len(outputs)} output blocks for {n} levels x {layers} res blocks"
        )
    up_depths = [
        max(_attention(u, f"output_blocks.{b * (layers + 1) + j}.1") for j in range(layers + 1))
        for b in range(n)
    ]
    mid_depth = _attention(u, "middle_block.1")
    if mid_depth == 0:
        raise HostError("unsupported UNet: its middle block has no attention")
    # diffusers' mid block takes the last level's depth; a last level without attention ignores it.
    layers_per_level = [d or 1 for d in depths]
    if not depths[-1]:
        layers_per_level[-1] = mid_depth
    proj_in = next(v for k, v in u.items() if k.endswith(".proj_in.weight"))
    context = next(v for k, v in u.items() if k.endswith(".attn2.to_k.weight")).shape[1]
    # diffusers' `attention_head_dim` holds the head COUNT: 8 for SD1, channels/64 for SD2/SDXL.
    heads = 8 if family == "sd1" else [max(1, c // 64) for c in channels]
    v_model = prediction_type == "v_prediction"
    config: dict[str, Any] = {
        "sample_size": {"sd1": 64, "sd2": 96 if v_model else 64, "sdxl": 128}[family],
        "in_channels": conv_in.shape[1],
        "out_channels": u["out.2.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": proj_in.ndim == 2,
        # One int when uniform, as in the released SD1/SD2 configs; a list per level as in SDXL's.
        "transformer_layers_per_block": (
            layers_per_level[0] if len(set(layers_per_level)) == 1 else layers_per_level
        ),
        # diffusers' SD2.1 config, which its from_single_file uses for every SD2 file, upcasts attention.
        "upcast_attention": family == "sd2",
    }
    reverse = [d or 1 for d in up_depths]
    if reverse != list(reversed(layers_per_level)):
        config["reverse_transformer_layers_per_block"] = reverse
    time_dim = u["time_embed.0.weight"].shape[0]
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    if "label_emb.0.0.weight" in u:
        if family != "sdxl":
            raise HostError(f"unsupported {family} UNet: it has a label embedding (unCLIP or upscaler?)")
        adm = u["label_emb.0.0.weight"].shape[1]
        pooled = sd[SDXL_CLIP_G + "text_projection"].shape[1]
        if (adm - pooled) % 6:
            raise HostError(f"unsupported SDXL UNet: label embedding input {adm} is not {pooled} + 6 * k")
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": (adm - pooled) // 6,
            "projection_class_embeddings_input_dim": adm,
        }
    return config


class _NoAttention(torch.nn.Module):
    """Stands in a diffusers attention slot where the reduced LDM UNet has no SpatialTransformer."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=hidden_states)
        return (hidden_states,)


def _fit_attention(unet: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Make every attention slot as deep as the file's, where no diffusers config can say so.

    ComfyUI-style reduced UNets may give blocks of one level different transformer depths (0 included)
    or the mid block another depth than the last level; the config then describes the deepest block
    and the slots that differ are rebuilt here. Such a model runs as the file says, but its config
    does not describe it, so it must not be saved with save_pretrained.
    """
    u = _sub(sd, UNET)
    per = unet.config.layers_per_block
    slots = [(unet.mid_block, 0, "middle_block.1")]
    for b, block in enumerate(unet.down_blocks):
        slots += [(block, j, f"input_blocks.{1 + b * (per + 1) + j}.1") for j in range(per)]
    for b, block in enumerate(unet.up_blocks):
        slots += [(block, j, f"output_blocks.{b * (per + 1) + j}.1") for j in range(per + 1)]
    fitted = []
    for block, j, name in slots:
        if not hasattr(block, "attentions"):
            continue
        built, depth = block.attentions[j], _attention(u, name)
        if depth == 0:
            block.attentions[j] = _NoAttention()
        elif depth != len(built.transformer_blocks):
            # Its config lacks the two positional arguments diffusers' blocks pass: read them off the module.
            heads = {
                "num_attention_heads": built.num_attention_heads,
                "attention_head_dim": built.attention_head_dim,
            }
            config = {k: v for k, v in built.config.items() if not k.startswith("_")}
            block.attentions[j] = type(built)(**{**config, **heads, "num_layers": depth})
        else:
            continue
        fitted.append(f"{name}: depth {depth}")
    if fitted:
        logger.warning(
            "this UNet's layout has no exact diffusers config; fitted %d attention slots (%s). "
            "Do not save it with save_pretrained.",
            len(fitted),
            ", ".join(fitted[:6]),
        )
    unet.ldm_fitted_attention = fitted
    return unet


def vae_config(sd: dict[str, torch.Tensor], family: str) -> dict[str, Any]:
    """An AutoencoderKL config inferred from the LDM VAE's tensor shapes."""
    v = _sub(sd, VAE)
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    latent = v["decoder.conv_in.weight"].shape[1]
    if v["encoder.conv_out.weight"].shape[0] != 2 * latent:
        raise HostError("unsupported VAE: the encoder does not output mean and log-variance")
    return {
        "in_channels": v["encoder.conv_in.weight"].shape[1],
        "out_channels": v["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels],
        "layers_per_block": len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": latent,
        "sample_size": {"sd1": 512, "sd2": 768, "sdxl": 1024}[family],
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
        "use_quant_conv": "quant_conv.weight" in v,
        "use_post_quant_conv": "post_quant_conv.weight" in v,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in v,
    }


def _clip_config(
    hidden: int, vocab: int, positions: int, layers: int, intermediate: int, act: str, projection: int
):
    from transformers import CLIPTextConfig

    # bos/eos/pad ids as in the released SD text-encoder configs (eos 2 selects argmax pooling).
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=positions,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _empty_weights():
    """Build modules without random init (parameters on meta, buffers real) when accelerate is there."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return nullcontext()
    return init_empty_weights()


def _load(
    build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], what: str, dtype: torch.dtype
) -> torch.nn.Module:
    """Instantiate and fill a model; every parameter and persistent buffer must come from the file."""
    with _empty_weights():
        model = build()
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    # Cast here rather than with model.to(dtype): the weights are the file's tensors, copied at most once.
    state = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in state.items()
        if not k.endswith("embeddings.position_ids")
    }
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise HostError(f"the checkpoint's {what} does not match the config read from its shapes: {e}") from e
    return model.eval()


def _load_clip_l(sd: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype):
    """OpenAI CLIP-L (SD1, SDXL's first encoder): HF layout already, quick_gelu."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    t = _sub(sd, prefix + "text_model.")
    tok = t["embeddings.token_embedding.weight"]
    config = _clip_config(
        hidden=tok.shape[1],
        vocab=tok.shape[0],
        positions=t["embeddings.position_embedding.weight"].shape[0],
        layers=len(_indices(t, r"encoder\.layers\.(\d+)\.")),
        intermediate=t["encoder.layers.0.mlp.fc1.weight"].shape[0],
        act="quick_gelu",
        projection=tok.shape[1],
    )
    # Only what CLIPTextModel has: stray `text_projection`/`logit_scale` copies some tools add are unused.
    parts = tuple(prefix + "text_model." + p for p in ("embeddings.", "encoder.", "final_layer_norm."))
    state = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(parts)}, prefix)
    return _load(lambda: CLIPTextModel(config), state, "CLIP-L text encoder", dtype)


def _load_open_clip(sd: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype, *, penultimate: bool):
    """OpenCLIP H/bigG. `penultimate`: SD2 conditions on the second-to-last block, so (as diffusers
    does for the released SD2 files) the last block and the projection are dropped."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    o = _sub(sd, prefix)
    blocks = _indices(o, r"transformer\.resblocks\.(\d+)\.")
    layers = len(blocks) - 1 if penultimate else len(blocks)
    if layers < 1:
        raise HostError(f"the OpenCLIP text encoder at {prefix}* has {len(blocks)} blocks; SD2 needs 2+")
    tok = o["token_embedding.weight"]
    projection = o["text_projection"].shape[1] if "text_projection" in o else tok.shape[1]
    config = _clip_config(
        hidden=tok.shape[1],
        vocab=tok.shape[0],
        positions=o["positional_embedding"].shape[0],
        layers=layers,
        intermediate=o["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        act="gelu",
        projection=projection,
    )
    dropped = (prefix + f"transformer.resblocks.{blocks[-1]}.", prefix + "text_projection")
    keep = [k for k in sd if k.startswith(prefix) and not (penultimate and k.startswith(dropped))]
    subset = {k: sd[k] for k in keep}
    cls = CLIPTextModel if penultimate else CLIPTextModelWithProjection
    with _empty_weights():
        shell = cls(config)  # the converter only reads the config's hidden size from it
    state = convert_open_clip_checkpoint(shell, subset, prefix=prefix)
    return _load(lambda: cls(config), state, "OpenCLIP text encoder", dtype)


def _normalize_variants(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key variants real files carry: early SD1 files name CLIP-L without `text_model.` (ComfyUI's
    SD15.process_clip_state_dict fixes the same); some SDXL files store bigG's projection as a Linear."""
    out = {}
    for key, value in sd.items():
        for prefix in (SD1_CLIP, SDXL_CLIP_L):
            if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
                key = prefix + "text_model." + key[len(prefix) :]
        if key == SDXL_CLIP_G + "text_projection.weight" and SDXL_CLIP_G + "text_projection" not in sd:
            key, value = SDXL_CLIP_G + "text_projection", value.T
        out[key] = value
    return out


def scheduler_for(prediction_type: str):
    """The DDPM training schedule every SD1/SD2/SDXL model was trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )


def load_single_file(
    path: str | Path,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """diffusers components of an original-layout SD1/SD2/SDXL checkpoint file, built offline.

    `family` (optional) must agree with the layout found; `prediction_type` overrides detection.
    """
    _check_choices(family, prediction_type)
    sd = read_state_dict(path)
    found = detect_family(sd)
    if family is not None and family != found:
        raise HostError(f"{Path(path).name} has the {found} layout, but family={family!r} was asked for")
    components = components_from_state_dict(sd, prediction_type=prediction_type, dtype=dtype)
    logger.info("%s: %s, %s", Path(path).name, components["family"], components["prediction_type"])
    return components


def _check_choices(family: str | None, prediction_type: str | None) -> None:
    if family is not None and family not in FAMILIES:
        raise HostError(f"family must be one of {FAMILIES}, got {family!r}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise HostError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def components_from_state_dict(
    sd: dict[str, torch.Tensor], *, prediction_type: str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """`load_single_file` on tensors already in memory (LDM key names), e.g. from another loader."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from ..tokenizer import clip_tokenizer

    _check_choices(None, prediction_type)
    sd = _normalize_variants(sd)
    family = detect_family(sd)
    prediction_type = prediction_type or detect_prediction_type(sd, family)

    u_config = unet_config(sd, family, prediction_type)
    unet_state = convert_ldm_unet_checkpoint(sd, u_config)
    unet = _load(lambda: _fit_attention(UNet2DConditionModel(**u_config), sd), unet_state, "UNet", dtype)
    v_config = vae_config(sd, family)
    vae_state = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith(VAE)}, v_config)
    vae = _load(lambda: AutoencoderKL(**v_config), vae_state, "VAE", dtype)

    if family == "sd1":
        text_encoder, text_encoder_2 = _load_clip_l(sd, SD1_CLIP, dtype), None
        tokenizer, tokenizer_2 = clip_tokenizer(), None
    elif family == "sd2":
        text_encoder, text_encoder_2 = _load_open_clip(sd, SD2_CLIP, dtype, penultimate=True), None
        tokenizer, tokenizer_2 = clip_tokenizer("!"), None
    else:
        text_encoder = _load_clip_l(sd, SDXL_CLIP_L, dtype)
        text_encoder_2 = _load_open_clip(sd, SDXL_CLIP_G, dtype, penultimate=False)
        tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer("!")
    return {
        "family": family,
        "prediction_type": prediction_type,
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler_for(prediction_type),
    }
