"""The Host protocol on the model reForge (Panchovix/stable-diffusion-webui-reForge) already loaded.

reForge keeps A1111's shell around its own backend (`ldm_patched`, an early ComfyUI): `shared.sd_model`
is A1111's ldm LatentDiffusion (SD1.x, SD2.x) or sgm DiffusionEngine (SDXL) whose UNet, text
encoders and VAE are ldm_patched models, also held as `forge_objects` (a ModelPatcher, a CLIP, a VAE).
The prompt path is A1111's (EmbeddingsWithFixes and an EmbeddingDatabase; the SDXL conditioner), so
words reach the text encoders exactly as in `A1111Host`, which this host extends. What differs:
- The noise schedule and the prediction type are the ldm_patched model's own (`model_sampling`,
  `model_type`): the shell's config can disagree with them (zero-terminal-SNR and v checkpoints).
- The UNet is called directly (the raw eps or v output, after loading it the backend's way); its
  ops cast weights themselves, so no autocast.
- Latents: the VAE posterior's mean through the model's own latent format (scale and shift).
- ldm_patched's UNet adds in place, and on CPU its default attention exponentiates in place: while
  training, in-place adds on the word's gradient path run out of place (`autograd_friendly`) and the
  cross-attention runs through PyTorch's SDPA (`_differentiable_attention`); sampling is untouched
  afterwards. A backend that built its weights under inference mode gets plain copies while training.

reForge is imported only inside functions: importing this module imports no web UI.
"""

from __future__ import annotations

import contextlib

import torch

from ..host import HostError
from .a1111 import A1111Host
from .webui_common import (
    DiscreteSchedule,
    autograd_friendly,
    call_comfy_unet,
    plain_weights,
    posterior_mean,
    set_attributes,
)


@contextlib.contextmanager
def _differentiable_attention():
    """ldm_patched picks its attention once, at import (sub-quadratic on CPU, which uses `out=`);
    CrossAttention reads the module-level choice at each call, so it is swapped for the run."""
    from ldm_patched.ldm.modules import attention

    sdpa = attention.attention_pytorch
    with set_attributes([(attention, "optimized_attention", sdpa), (attention, "optimized_attention_masked", sdpa)]):
        yield


class ReForgeHost(A1111Host):
    """reForge's shared.sd_model as seen by the trainer. Use `training()` around a run."""

    def __init__(self, sd_model=None):
        super().__init__(sd_model)
        objects = self.model.forge_objects
        self.unet_patcher = objects.unet
        base = self.unet_patcher.model
        if base.diffusion_model is not self.unet:
            raise HostError("reForge's UNet and the loaded model's disagree: reload the checkpoint, then train.")
        kind = getattr(getattr(base, "model_type", None), "name", "EPS")
        if kind not in ("EPS", "V_PREDICTION"):
            raise HostError(f"Model type {kind} is not supported: use an eps or v checkpoint.")
        self.prediction_type = "v_prediction" if kind == "V_PREDICTION" else "epsilon"
        sigmas = base.model_sampling.sigmas.detach().float().cpu().clone()
        self.schedule = DiscreteSchedule(1.0 / (1.0 + sigmas ** 2), self.prediction_type)
        self.num_timesteps = self.schedule.num_timesteps
        self.latent_format = base.latent_format
        from ldm_patched.modules import model_management

        self.device = model_management.get_torch_device()

    # -- lifecycle ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self):
        with super().training(), plain_weights(self.model), _differentiable_attention(), autograd_friendly():
            yield self

    # -- images and diffusion -----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        from ldm_patched.modules import model_management

        self.size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        vae = self.model.forge_objects.vae
        model_management.load_models_gpu([vae.patcher])
        mean = posterior_mean(vae.first_stage_model, pixels.to(vae.device, vae.vae_dtype))
        return self.latent_format.process_in(mean.float()).cpu()

    def predict(self, noisy, timesteps, cond):
        from ldm_patched.modules import model_management

        model_management.load_models_gpu([self.unet_patcher])
        return call_comfy_unet(self.unet, noisy, timesteps, cond, self.device, self.unet.dtype)

    def autocast(self):
        return contextlib.nullcontext()  # ldm_patched's operations cast weights to the computation dtype

    def free_memory(self) -> int | None:
        from ldm_patched.modules import model_management

        return int(model_management.get_free_memory(self.device))
