"""Diffusers model configs inferred from the tensor shapes of an original-layout (LDM) checkpoint.

A single-file SD1.x / SD2.x / SDXL checkpoint carries no config; every UNet, VAE and text-encoder
setting is read off the shapes of its tensors here, so reduced-depth UNets (ComfyUI-style layouts)
load as exactly as the released ones. Reading the file and filling the models is single_file.py's job;
this module only looks at shapes and never touches a file.
"""

from __future__ import annotations

import logging
import re
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
