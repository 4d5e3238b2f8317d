"""Build tiny random checkpoints in the real SD1.5, SD2-v and SDXL single-file layouts.

Run as a script inside a ComfyUI checkout (the harness does: `python build_checkpoints.py OUT FAMILY`
with cwd = COMFYUI_PATH and the torchvision stand-in on PYTHONPATH). ComfyUI's own model classes
build the modules and its own `state_dict_for_saving` writes the checkpoint keys, so the files
have exactly the layout a downloaded checkpoint has and ComfyUI's detection picks the right model
class. Only the UNet is cut down (one level, few blocks) to keep files small; text encoders and the
VAE must keep their real sizes (ComfyUI infers them from fixed shapes). Weights are random (seeded,
fan-in scaled so fp16 activations stay finite; cross-attention sharpened, see CROSS_ATTENTION_GAIN).
SD2's v-prediction is decided by ComfyUI from the std of
`output_blocks.11.1.transformer_blocks.0.norm1.bias` (> 0.09), so that bias gets std 0.2.

Never imported by pytest itself (it imports ComfyUI); never shipped.
"""

from __future__ import annotations

import math
import os
import sys

COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

UNETS = {
    "sd15": dict(COMMON, adm_in_channels=None, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                 transformer_depth_output=[1, 1], transformer_depth_middle=1, use_linear_in_transformer=False,
                 context_dim=768, num_heads=8, num_head_channels=-1),
    # 12 output blocks so that output_blocks.11.1 (the v-prediction marker) exists.
    "sd2v": dict(COMMON, adm_in_channels=None, num_res_blocks=[11], channel_mult=[1],
                 transformer_depth=[0] * 10 + [1], transformer_depth_output=[0] * 10 + [1, 1],
                 transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=1024, num_heads=-1,
                 num_head_channels=64),
    # ComfyUI matches SDXL on input transformer depths [0, 0, 2, 2, 10, 10].
    "sdxl": dict(COMMON, adm_in_channels=2816, num_classes="sequential", num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
                 use_linear_in_transformer=True, context_dim=2048, num_heads=-1, num_head_channels=64),
}

VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

V_MARKER = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
# With plain fan-in weights, cross-attention averages the 77 tokens almost uniformly, so one word
# barely changes a random UNet's output and a few training steps cannot show a falling loss. Sharper
# keys and a louder output make the tiny models depend on single words, as trained models do.
CROSS_ATTENTION_GAIN = {"attn2.to_k.": 3.0, "attn2.to_out.0.": 4.0}
VERSION = 2  # part of the cached file name: bump when the weights change


def randomize(module, generator, v_marker: bool = False) -> None:
    """Seeded random weights: fan-in scaled matrices, unit norms, small biases and embeddings."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            lname = name.lower()
            if param.dim() == 0:
                value = torch.tensor(4.6 if "logit_scale" in lname else 0.0)
            elif "embedding" in lname and param.dim() == 2:
                value = torch.randn(param.shape, generator=generator) * (0.01 if "position" in lname else 0.02)
            elif param.dim() >= 2:
                fan_in = math.prod(param.shape[1:])
                value = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
                value *= next((gain for part, gain in CROSS_ATTENTION_GAIN.items() if part in name), 1.0)
            elif name.endswith("weight") and any(s in lname for s in ("norm", "ln_", "layer_norm")):
                value = torch.ones(param.shape)
            elif v_marker and name.endswith(V_MARKER):
                value = torch.randn(param.shape, generator=generator) * 0.2
            else:
                value = torch.randn(param.shape, generator=generator) * 0.02
            param.data = value.to(param.device, torch.float32)


def build(out_path: str, family: str, seed: int = 0) -> None:
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses its CLI at import
    sys.path.insert(0, os.getcwd())  # run with cwd = the ComfyUI checkout
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.ldm.models.autoencoder
    import comfy.model_management
    import comfy.sd
    import comfy.supported_models as supported
    import comfy.utils
    import torch

    config_class = {"sd15": supported.SD15, "sd2v": supported.SD20, "sdxl": supported.SDXL}[family]
    unet_config = dict(UNETS[family], dtype=torch.float32)
    model_config = config_class(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "model.diffusion_model.", device="cpu")
    generator = torch.Generator().manual_seed(seed)
    randomize(model.diffusion_model, generator, v_marker=family == "sd2v")

    clip = comfy.sd.CLIP(model_config.clip_target({}), model_options={"dtype": torch.float32})
    randomize(clip.cond_stage_model, generator)
    clip_sd = clip.get_sd()

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
    randomize(vae, generator)
    vae_sd = vae.state_dict()

    sd = model.state_dict_for_saving(clip_sd, vae_sd)
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = out_path + ".tmp"
    comfy.utils.save_torch_file(sd, tmp, metadata={"textinv.test": f"tiny random {family}, seed {seed}"})
    os.replace(tmp, out_path)


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2])
