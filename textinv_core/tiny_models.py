"""Small randomly initialised models in the real SD1.x / SD2.x-v / SDXL layouts.

Why: no weights can be downloaded here, yet tests, the demo and benchmarks must drive the real
loading and training code. The text encoders keep the real vocabulary (49408 rows) and the real
widths (CLIP-L 768, OpenCLIP-H 1024, bigG 1280) so files and errors look like the real thing;
depth and the UNet/VAE are cut down so a training step takes milliseconds. Never for real use.
"""

from __future__ import annotations

import torch

from .families import ENCODER_WIDTHS, FAMILY_ENCODERS
from .hosts.single_file import scheduler_for
from .tokenizer import clip_tokenizer

FAMILIES = tuple(FAMILY_ENCODERS)
_TEXT = {  # heads and activation of each released encoder (its width: families.ENCODER_WIDTHS)
    "clip_l": (12, "quick_gelu"),
    "clip_h": (16, "gelu"),
    "clip_g": (20, "gelu"),
}


def tiny_text_config(key: str, layers: int = 1):
    from transformers import CLIPTextConfig

    width, (heads, act) = ENCODER_WIDTHS[key], _TEXT[key]
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if key == "clip_l" else 0,
    )


def tiny_unet(family: str, cross_attention_dim: int, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    extra = {}
    if family == "sdxl":
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 1280,
        )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8 if family == "sd1" else (2, 4),
        use_linear_projection=family != "sd1",
        norm_num_groups=32,
        **extra,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )


def build_tiny_components(family: str, seed: int = 0) -> dict:
    """Components dict (unet, vae, text encoders, tokenizers, scheduler) of a tiny model."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}: choose one of {', '.join(FAMILIES)}.")
    torch.manual_seed(seed)
    if family == "sd1":
        encoders = [("clip_l", CLIPTextModel, clip_tokenizer())]
    elif family == "sd2":
        encoders = [("clip_h", CLIPTextModel, clip_tokenizer("!"))]
    else:
        encoders = [
            ("clip_l", CLIPTextModel, clip_tokenizer()),
            ("clip_g", CLIPTextModelWithProjection, clip_tokenizer("!")),
        ]
    components: dict = {"family": family}
    for index, (key, cls, tokenizer) in enumerate(encoders):
        suffix = "" if index == 0 else "_2"
        components[f"text_encoder{suffix}"] = cls(tiny_text_config(key)).eval()
        components[f"tokenizer{suffix}"] = tokenizer
    context = sum(ENCODER_WIDTHS[key] for key, _, _ in encoders)
    components["unet"] = tiny_unet(family, context).eval()
    components["vae"] = tiny_vae().eval()
    components["scheduler"] = scheduler_for("v_prediction" if family == "sd2" else "epsilon")
    return components


def save_tiny_pipeline(family: str, folder, seed: int = 0) -> None:
    """Write a tiny model as a diffusers folder (model_index.json + one subfolder per part)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = build_tiny_components(family, seed)
    parts.pop("family")
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
