"""Full-size SD1.5 and SDXL in the diffusers layout, with random weights, built in the precision and on
the device they are measured in (no fp32 copy on the way), for the memory and speed benchmarks.

The architectures are the released ones (SD1.5: UNet 860M, CLIP-L 123M, VAE 84M; SDXL: UNet 2.6B,
CLIP-L + OpenCLIP bigG 695M, VAE 84M); the weights are diffusers' and transformers' own initialisation.
"""

from __future__ import annotations

import contextlib

import torch

FAMILIES = {"sd15": 512, "sdxl": 1024}  # family -> the resolution users train it at


@contextlib.contextmanager
def building(dtype: torch.dtype, device: str):
    """Parameters are created in `dtype` on `device`, so a bf16 model never exists in fp32."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old_dtype)


def _clip(width: int, layers: int, heads: int, act: str, projection: bool, pad: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(scaling: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=scaling,
    ).eval()


def sd15_components(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from textinv_core.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    with building(dtype, device):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ).eval()
        vae = _vae(0.18215)
        text = _clip(768, 12, 12, "quick_gelu", projection=False, pad=49407)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return {"family": "sd1", "unet": unet, "vae": vae, "text_encoder": text, "tokenizer": clip_tokenizer(),
            "scheduler": scheduler}


def sdxl_components(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from textinv_core.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    with building(dtype, device):
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        ).eval()
        vae = _vae(0.13025)
        text = _clip(768, 12, 12, "quick_gelu", projection=False, pad=49407)
        text_2 = _clip(1280, 32, 20, "gelu", projection=True, pad=0)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return {"family": "sdxl", "unet": unet, "vae": vae, "text_encoder": text, "tokenizer": clip_tokenizer(),
            "text_encoder_2": text_2, "tokenizer_2": clip_tokenizer("!"), "scheduler": scheduler}


def components(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    build = {"sd15": sd15_components, "sdxl": sdxl_components}[family]
    return build(seed, dtype, device)


def images(count: int = 4, seed: int = 0, size: tuple[int, int] = (300, 280)):
    """Random photos of mixed size (the trainer crops and resizes them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]
