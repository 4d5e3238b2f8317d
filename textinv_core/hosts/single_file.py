"""Load an original-layout single-file checkpoint (SD1.x, SD2.x, SDXL base) as diffusers components.

Users have `.safetensors`/`.ckpt` files in the Stability/LDM layout, not diffusers folders. This
module reads such a file fully offline: the family comes from the key layout, every model config
is inferred from tensor shapes by ldm_config.py (so reduced-depth UNets load too), and the key
renaming is done by diffusers' own converters in `diffusers.loaders.single_file_utils`. A file that
is truncated, damaged or not a checkpoint is one `HostError` naming it. Every model is loaded with a
strict key check, so no weight silently stays random.

It must never unpickle arbitrary objects (`.ckpt`/`.pt` go through `torch.load(weights_only=True)`
only), never reach a model hub, and never write to the checkpoint.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..host import HostError
from ..model_files import layout_summary, read_safetensors_header
from .ldm_config import (
    SD1_CLIP,
    SD2_CLIP,
    SDXL_CLIP_G,
    SDXL_CLIP_L,
    UNET,
    VAE,
    _clip_config,
    _fit_attention,
    _indices,
    _sub,
    unet_config,
    vae_config,
)

logger = logging.getLogger(__name__)

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

        _require_full_checkpoint(k for k in read_safetensors_header(path) if k != "__metadata__")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k == V_PRED_MARKER or k.startswith(_KEEP)}
        except Exception as e:  # safetensors raises its own error type for a damaged file
            _raise_unreadable(path, e)
    try:
        # Tensors and plain containers only: a pickled object is refused, never constructed.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise HostError(
            f"{path.name} contains pickled objects beyond plain tensors, so it is refused unopened (loading "
            "it could run code). Convert it to .safetensors with a tool you trust, or use a .safetensors "
            f"release of the model. Detail: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # a truncated or damaged archive: torch reports it as RuntimeError, EOFError, ...
        _raise_unreadable(path, e)
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


def _raise_unreadable(path: Path, error: Exception) -> None:
    """A checkpoint that cannot be read is the user's to replace; running out of memory is not."""
    text = str(error)
    if isinstance(error, MemoryError) or "allocate" in text:
        raise error
    first = text.splitlines()[0] if text else type(error).__name__
    raise HostError(f"{path} cannot be read as a checkpoint ({first}): it is truncated or damaged; download it "
                    "again.") from error


def _require_full_checkpoint(keys: Iterable[str]) -> None:
    """A UNet-only, VAE-only, LoRA or embedding file is refused before any tensor is read."""
    keys = list(keys)
    if not any(k.startswith(UNET) for k in keys) or not any(k.startswith(VAE) for k in keys):
        raise HostError(
            "not a full Stable Diffusion checkpoint: it needs the UNet (model.diffusion_model.*) and the VAE "
            f"(first_stage_model.*) in one file. Found: {layout_summary(keys)}"
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
        f"conditioner.embedders.1.model.*). Found: {layout_summary(sd)}"
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


def _empty_weights():
    """Build modules without random init (parameters on meta, buffers real): every weight comes from the
    file, and a random init first costs time and memory (full-size SDXL: about a minute of CPU and a
    second copy of the model). accelerate's helper when it is installed, else the same in a few lines
    (accelerate is not a dependency of the pack)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return _parameters_on_meta()
    return init_empty_weights()


@contextmanager
def _parameters_on_meta():
    """Every parameter a module registers goes to the meta device (its init then costs nothing); buffers
    stay real, as some are not in any file (CLIP's position ids)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kept = module._parameters[name]
            module._parameters[name] = type(kept)(kept.to("meta"), requires_grad=kept.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


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
