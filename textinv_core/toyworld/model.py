"""The toy text-to-image model: definition, saving in the diffusers folder layout, and loading.

A pixel-space UNet2DConditionModel (no VAE: pixels in [-1, 1] are the latents) conditioned by a
small CLIPTextModel over the real 49408-token CLIP vocabulary and the real tokenizer, with a
v-prediction cosine DDPM schedule. Weights are stored in fp16 safetensors to stay small; loading
casts them back to fp32. Must never download anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MissingFileError
from .scene import SIZE

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights"  # package data, so a wheel install finds it too
TEXT_WIDTH = 128


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_WIDTH,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=32,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    # cosine schedule (Nichol & Dhariwal) suits small images; v-prediction (Salimans & Ho 2022) because
    # with eps the loss barely weighs the high-noise steps where text must decide colour and background
    # (an eps model of this world sampled colours at chance); clip_sample keeps DDIM's x0 in [-1, 1]
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=True)


def save_model(folder: str | Path, unet, text_encoder, tokenizer, scheduler) -> None:
    """A diffusers folder: model_index.json, unet/, text_encoder/, tokenizer/, scheduler/ (fp16)."""
    import copy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(unet).half().save_pretrained(folder / "unet", safe_serialization=True)
    copy.deepcopy(text_encoder).half().save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "ToyWorldPixelPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_host(folder: str | Path | None = None):
    """The committed toy model (or `folder`) as a DiffusersHost, fp32 on CPU."""
    from ..hosts.diffusers_host import DiffusersHost

    folder = Path(folder) if folder else DEFAULT_MODEL_DIR
    if not (folder / "model_index.json").is_file():
        raise MissingFileError(f"No toy model at {folder}: run tools/train_toy_model.py to build it.")
    return DiffusersHost.from_pretrained(folder, dtype=torch.float32)
