"""Build tiny random SD1.5 and SDXL single-file checkpoints that all three web UIs load.

Run as a script with a web UI's own Python (the harness does):
    python build_checkpoints.py REPOSITORIES OUT FAMILY
where REPOSITORIES is a web UI's `repositories/` folder holding `stable-diffusion-stability-ai`
(ldm) and `generative-models` (sgm): the UNets and the VAE are built by those codebases' own
classes, so the keys are exactly a downloaded checkpoint's. Each checkpoint gets a side-car
`<file>.yaml` (A1111 reads it instead of guessing the full-size architecture; Forge and reForge
detect the architecture from the weights, as ComfyUI does).

Only the UNet is cut down, in a way each stack can express: SD1.5 one level with one res block;
SDXL channel_mult [1, 1, 1] with SDXL's transformer depths [0, 2, 10] (what Forge's and reForge's
detection match on, and what sgm's UNet can express: the ComfyUI tier's tiny SDXL has output
depths sgm cannot build). Text encoders and the VAE keep their real sizes: the web UIs build them
from fixed configs. Weights are random, seeded, with the ComfyUI tier's scaling rules
(tests/comfy/build_checkpoints.py `randomize`), so a word measurably moves the loss.

Never imported by pytest itself (it needs a web UI's packages); never shipped.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = 1  # part of the cached file name: bump when the weights or the layout change

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[1],
                 num_res_blocks=1, channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
                 context_dim=768, use_checkpoint=True, legacy=False)
SDXL_UNET = dict(adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4, out_channels=4,
                 model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 1, 1],
                 num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                 transformer_depth=[0, 2, 10], context_dim=2048, spatial_transformer_attn_type="softmax", legacy=False)
VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
           num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def comfy_randomize():
    path = HERE.parent / "comfy" / "build_checkpoints.py"
    spec = importlib.util.spec_from_file_location("textinv_comfy_builder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.randomize


def clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return CLIPTextModel(config)


def open_clip_text(width=1280, layers=32, heads=20, vocab=49408, context=77):
    """The text tower of open_clip's ViT-bigG-14 with open_clip's parameter names (no vision tower)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads)
            self.ln_2 = nn.LayerNorm(width)
            self.mlp = nn.Sequential(collections.OrderedDict(
                c_fc=nn.Linear(width, width * 4), gelu=nn.GELU(), c_proj=nn.Linear(width * 4, width)))

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = nn.Embedding(vocab, width)
            self.positional_embedding = nn.Parameter(torch.empty(context, width))
            self.transformer = nn.Module()
            self.transformer.resblocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_final = nn.LayerNorm(width)
            self.text_projection = nn.Parameter(torch.empty(width, width))
            self.logit_scale = nn.Parameter(torch.ones([]))

    return Text()


def vae():
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from torch import nn

    module = nn.Module()
    module.encoder, module.decoder = Encoder(**VAE), Decoder(**VAE)
    module.quant_conv, module.post_quant_conv = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)
    return module


def with_prefix(prefix: str, state: dict) -> dict:
    return {prefix + key: value for key, value in state.items()}


def write_yaml(source: Path, out: Path, family: str) -> None:
    from omegaconf import OmegaConf

    config = OmegaConf.load(source)
    if family == "sd15":
        config.model.params.unet_config.params = SD15_UNET
    else:
        config.model.params.network_config.params = SDXL_UNET
    OmegaConf.save(config, out)


def build(repositories: Path, out_path: str, family: str, seed: int = 0) -> None:
    sys.path[:0] = [str(repositories / "stable-diffusion-stability-ai"), str(repositories / "generative-models")]
    import safetensors.torch
    import torch

    randomize = comfy_randomize()
    generator = torch.Generator().manual_seed(seed)
    if family == "sd15":
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        params = dict(SD15_UNET, use_checkpoint=False)
        unet = UNetModel(**params)
        text = {"cond_stage_model.transformer.": clip_l()}
        yaml_source = repositories.parent / "configs" / "v1-inference.yaml"
    elif family == "sdxl":
        from sgm.modules.diffusionmodules.openaimodel import UNetModel

        unet = UNetModel(**dict(SDXL_UNET, use_checkpoint=False))
        text = {"conditioner.embedders.0.transformer.": clip_l(), "conditioner.embedders.1.model.": open_clip_text()}
        yaml_source = repositories / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml"
    else:
        raise SystemExit(f"unknown family {family!r}: sd15 or sdxl")
    state = {}
    randomize(unet, generator)
    state.update(with_prefix("model.diffusion_model.", unet.state_dict()))
    del unet
    for prefix, module in text.items():
        randomize(module, generator)
        state.update(with_prefix(prefix, module.state_dict()))
    del text
    first_stage = vae()
    randomize(first_stage, generator)
    state.update(with_prefix("first_stage_model.", first_stage.state_dict()))
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()
             if not k.endswith("position_ids")}
    tmp = out_path + ".tmp"
    safetensors.torch.save_file(state, tmp, metadata={"textinv.test": f"tiny random {family}, seed {seed}"})
    write_yaml(yaml_source, Path(out_path[: -len(".safetensors")] + ".yaml"), family)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    build(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
