"""Test support: write diffusers/transformers SD components as an original-layout single file.

This is the inverse of `textinv_core.hosts.single_file`: diffusers names -> Stability/LDM names,
OpenCLIP q/k/v packed into `in_proj_*`, VAE mid-attention linears stored as 1x1 convs. Tests use it
to make small checkpoints in every family's real layout without downloading anything.

SD2 files carry one more OpenCLIP block and a text projection than diffusers' SD2 text encoder
has (SD2 conditions on the penultimate block); the exporter fills those with seeded random values
so the file looks like a real one. It must never be used to publish checkpoints: it is test code.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _rename(state: dict[str, torch.Tensor], prefixes: dict[str, str], inner: dict[str, dict[str, str]]):
    """Map each key by its (unique) module prefix, then rename the rest by the prefix's inner table."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"no LDM name for {key}")
        rest = key[len(prefix) :]
        for old, new in inner.get(prefix, {}).items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        out[prefixes[prefix] + rest] = value
    return out


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state -> `model.diffusion_model.*` names (input/middle/output blocks)."""
    config = unet.config
    per = config.layers_per_block
    n = len(config.block_out_channels)
    names = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for i in range(n):
        for j in range(per):
            names[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.0."
            names[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.1."
        names[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{1 + i * (per + 1) + per}.0.op."
    for b in range(n):
        for j in range(per + 1):
            names[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{b * (per + 1) + j}.0."
            names[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{b * (per + 1) + j}.1."
        slot = 2 if "CrossAttn" in config.up_block_types[b] else 1
        names[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{b * (per + 1) + per}.{slot}.conv."
    inner = {p: _UNET_RESNET for p in names if ".resnets." in p}
    return _rename(unet.state_dict(), names, inner)


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL state -> `first_stage_model.*` names; attention linears become 1x1 convs."""
    n = len(vae.config.block_out_channels)
    names = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for side in ("encoder", "decoder"):
        names |= {
            f"{side}.conv_in.": f"{side}.conv_in.",
            f"{side}.conv_out.": f"{side}.conv_out.",
            f"{side}.conv_norm_out.": f"{side}.norm_out.",
            f"{side}.mid_block.resnets.0.": f"{side}.mid.block_1.",
            f"{side}.mid_block.resnets.1.": f"{side}.mid.block_2.",
            f"{side}.mid_block.attentions.0.": f"{side}.mid.attn_1.",
        }
    for i in range(n):
        for j in range(vae.config.layers_per_block + 1):
            names[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            names[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{n - 1 - i}.upsample.conv."
    inner = {p: {"conv_shortcut.": "nin_shortcut."} for p in names if ".resnets." in p}
    inner |= {p: _VAE_ATTENTION for p in names if p.endswith("attentions.0.")}
    out = _rename(vae.state_dict(), names, inner)
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def _text_state(model) -> dict[str, torch.Tensor]:
    """HF CLIP text state with `text_model.` names whether or not transformers flattened the class."""
    keep = ("text_model.", "text_projection")
    return {(k if k.startswith(keep) else "text_model." + k): v for k, v in model.state_dict().items()}


def clip_l_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """OpenAI CLIP-L: LDM keeps the HF names; old files also carry `position_ids`, so this does too."""
    state = {k: v for k, v in _text_state(text_encoder).items() if not k.endswith("position_ids")}
    positions = text_encoder.config.max_position_embeddings
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return state


def _open_clip_block(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    src = f"text_model.encoder.layers.{i}."
    dst = f"transformer.resblocks.{i}."
    out = {}
    for kind in ("weight", "bias"):
        out[dst + f"attn.in_proj_{kind}"] = torch.cat(
            [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
        )
        for old, new in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            out[dst + f"{new}.{kind}"] = state[src + f"{old}.{kind}"]
    return out


def open_clip_to_ldm(text_encoder, *, penultimate: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP names. `penultimate` (SD2): append the unused last block and a text projection."""
    state = _text_state(text_encoder)
    layers = text_encoder.config.num_hidden_layers
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "logit_scale": torch.tensor(math.log(100.0)),
    }
    for i in range(layers):
        out |= _open_clip_block(state, i)
    if penultimate:
        gen = torch.Generator().manual_seed(layers)
        extra = _open_clip_block(state, layers - 1)
        for key, value in extra.items():
            out[key.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}.")] = (
                torch.randn(value.shape, generator=gen) * 0.02
            ).to(value.dtype)
        width = text_encoder.config.hidden_size
        out["text_projection"] = torch.randn(width, width, generator=gen) * width**-0.5
    else:
        out["text_projection"] = state["text_projection.weight"].T
    return out


def to_ldm_state_dict(
    components: dict, family: str, *, v_pred_marker: bool = False
) -> dict[str, torch.Tensor]:
    """The whole checkpoint's tensors, contiguous and unshared, keyed as in the original files."""
    state = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(components["unet"]).items()}
    state |= {"first_stage_model." + k: v for k, v in vae_to_ldm(components["vae"]).items()}
    if family == "sd1":
        te = clip_l_to_ldm(components["text_encoder"])
        state |= {"cond_stage_model.transformer." + k: v for k, v in te.items()}
    elif family == "sd2":
        te = open_clip_to_ldm(components["text_encoder"], penultimate=True)
        state |= {"cond_stage_model.model." + k: v for k, v in te.items()}
    elif family == "sdxl":
        te = clip_l_to_ldm(components["text_encoder"])
        state |= {"conditioner.embedders.0.transformer." + k: v for k, v in te.items()}
        te2 = open_clip_to_ldm(components["text_encoder_2"], penultimate=False)
        state |= {"conditioner.embedders.1.model." + k: v for k, v in te2.items()}
    else:
        raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl', got {family!r}")
    if v_pred_marker:
        state["v_pred"] = torch.tensor([])
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def export_single_file(components: dict, family: str, path, *, v_pred_marker: bool = False) -> Path:
    """Write `components` as `path`: .safetensors, or .ckpt/.pt as {"state_dict": tensors}."""
    path = Path(path)
    state = to_ldm_state_dict(components, family, v_pred_marker=v_pred_marker)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif path.suffix in (".ckpt", ".pt"):
        torch.save({"state_dict": state}, path)
    else:
        raise ValueError(f"{path.name}: use .safetensors, .ckpt or .pt")
    return path
