"""What the Automatic1111-family hosts (a1111.py, forge.py) share: the discrete VP noise schedule
on a model's own alphas_cumprod, a CFG preview sampler on top of the Host protocol, temporary
changes to module attributes that are always undone, and autograd through inference tensors.

Torch only: importing this module imports no web UI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode


class DiscreteSchedule:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps on a model's alphas_cumprod (LDM/SGM's training schedule)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        self.alphas = alphas_cumprod.detach().float().cpu().clone()
        self.prediction_type = prediction_type
        self.num_timesteps = int(self.alphas.shape[0])

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas[timesteps.long().cpu()].to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1.0 - a).sqrt()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * latents.float() + sigma * noise.float()

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            signal, sigma = self._coefficients(timesteps, latents)
            return signal * noise.float() - sigma * latents.float()  # v (Salimans & Ho 2022)
        return noise.float()

    def eps(self, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise estimate from the denoiser's raw output (eps itself, or v)."""
        if self.prediction_type == "v_prediction":
            signal, sigma = self._coefficients(timesteps, noisy)
            return signal * output + sigma * noisy
        return output


@torch.no_grad()
def euler_sample(host, prompts: list[str], words: dict, seed: int, steps: int, guidance: float, size: int,
                 schedule: DiscreteSchedule, decode) -> list:
    """Euler sampling (Karras et al. 2022, Alg. 2 without churn) with classifier-free guidance, on
    `host.encode_text`/`host.predict` and the model's own discrete schedule; `decode(latents)` gives
    pixels in [-1, 1]. The initial noise of all prompts is drawn at once from `seed`."""
    from PIL import Image

    count = len(prompts)
    side = size // 8
    generator = torch.Generator().manual_seed(seed)
    latent_channels = getattr(host, "latent_channels", 4)
    noise = torch.randn((count, latent_channels, side, side), generator=generator)
    total = schedule.num_timesteps
    timesteps = torch.linspace(total - 1, 0, max(1, steps)).round().long()
    alphas = schedule.alphas[timesteps]
    sigmas = torch.cat([((1 - alphas) / alphas).sqrt(), torch.zeros(1)])
    x = (noise * sigmas[0]).to(host.device)
    cond = host.encode_text(prompts, words)
    uncond = host.encode_text([""] * count, {})
    for i, t in enumerate(timesteps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        t_batch = t.repeat(count).to(host.device)
        x_t = x / (sigma ** 2 + 1) ** 0.5  # the VP input the denoiser was trained on
        with host.autocast():
            eps_c = schedule.eps(host.predict(x_t, t_batch, cond).float(), x_t, t_batch)
            eps_u = schedule.eps(host.predict(x_t, t_batch, uncond).float(), x_t, t_batch)
        eps = eps_u + guidance * (eps_c - eps_u)
        x = x + eps * (sigma_next - sigma)
    pixels = decode(x).float().clamp(-1, 1)
    arrays = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def posterior_mean(stage: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's mode, before the model's latent scaling: deterministic latents (an ldm or
    ldm_patched AutoencoderKL's encoder and, where it has one, its quant_conv)."""
    moments = stage.encoder(pixels)
    if getattr(stage, "quant_conv", None) is not None:
        moments = stage.quant_conv(moments)
    return moments.chunk(2, dim=1)[0]


def call_comfy_unet(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond, device,
                    dtype: torch.dtype) -> torch.Tensor:
    """A ComfyUI-lineage UNet (Forge's backend, reForge's ldm_patched) on the VP input and the integer
    timestep, as its model wrapper calls it after the k-diffusion scaling: the raw eps or v output.
    `cond` is SD1/SD2's context tensor or SDXL's {"crossattn", "vector"}."""
    x = noisy.to(device, dtype)
    t = timesteps.to(device).float()
    if isinstance(cond, dict):
        context, extra = cond["crossattn"], {"y": cond["vector"].to(device, dtype)}
    else:
        context, extra = cond, {}
    out = unet(x, t, context=context.to(device, dtype), control=None, transformer_options={}, **extra)
    return out.float()


def reset_cond_cache() -> None:
    """Forget the conditioning A1111/Forge cache for the last prompts, so a prompt typed before a
    word existed is encoded again, now with the word (web-UI import inside)."""
    from modules import processing

    cls = processing.StableDiffusionProcessing
    cls.cached_c = [None] * len(cls.cached_c)
    cls.cached_uc = [None] * len(cls.cached_uc)


@contextlib.contextmanager
def set_attributes(changes: list[tuple[object, str, object]]) -> Iterator[None]:
    """Set (object, attribute, value) for the duration of the block; the old values always come back."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def frozen_parameters(*modules: torch.nn.Module) -> Iterator[None]:
    """requires_grad off for every parameter while training a word (no weight gradient is ever
    computed or stored); the flags the web UI had come back afterwards."""
    params = {id(p): p for m in modules if m is not None for p in m.parameters() if p.requires_grad}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield
    finally:
        for p in params.values():
            if p.is_inference():  # Forge's weights: their flag may only be set back inside inference mode
                with torch.inference_mode():
                    p.requires_grad_(True)
            else:
                p.requires_grad_(True)


@contextlib.contextmanager
def no_checkpoint_flags(module: torch.nn.Module) -> Iterator[None]:
    """LDM/SGM blocks built with use_checkpoint=True run their own CheckpointFunction, which asks
    autograd for the gradient of every (frozen) parameter and fails; the engine recomputes blocks
    itself (Host.recompute_blocks), so the flags are off while training and restored afterwards."""
    changes = []
    for sub in module.modules():
        for name in ("checkpoint", "use_checkpoint"):
            if isinstance(getattr(sub, name, None), bool) and getattr(sub, name):
                changes.append((sub, name, False))
    with set_attributes(changes):
        yield


# `x += y` is `x = x.__iadd__(y)`, which reaches a mode as `add_`: answering with a new tensor keeps
# the statement's meaning and leaves the tensor autograd saved untouched. An explicit `x.add_(y)`
# whose result is dropped would lose its effect, so this mode is only for code without such calls on
# the gradient path (Forge's UNet and text encoders: checked in backend/nn and backend/attention.py,
# whose `sim.add_(mask)` runs only with an attention mask, which the UNet never passes).
_OUT_OF_PLACE = {torch.Tensor.add_: torch.Tensor.add, torch.Tensor.sub_: torch.Tensor.sub,
                 torch.Tensor.mul_: torch.Tensor.mul, torch.Tensor.div_: torch.Tensor.div}


class _OutOfPlaceOnGradientPath(TorchFunctionMode):
    """Augmented assignments (`x += y`) done out of place where the result needs a gradient."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OUT_OF_PLACE and torch.is_grad_enabled() and _any_requires_grad(args, kwargs):
            func = _OUT_OF_PLACE[func]
        return func(*args, **kwargs)


def _any_requires_grad(*values) -> bool:
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return True
        elif isinstance(value, (list, tuple)):
            if _any_requires_grad(*value):
                return True
        elif isinstance(value, dict):
            if _any_requires_grad(*value.values()):
                return True
    return False


@contextlib.contextmanager
def plain_weights(*modules: torch.nn.Module) -> Iterator[None]:
    """Forge builds its models under torch.inference_mode(), and autograd cannot save inference
    tensors for the backward pass. For the duration of a run, each inference-mode parameter and
    buffer of `modules` is replaced by a plain copy with the same values (frozen), and the web UI's
    own tensors are put back afterwards, unchanged. This costs one copy of those weights while
    training, as copying each weight on demand for autograd costs at the peak."""
    swapped, copies = [], {}
    try:
        with torch.inference_mode(False), torch.no_grad():
            for module in modules:
                if module is None:
                    continue
                for sub in module.modules():
                    for table in (sub._parameters, sub._buffers):
                        for name, tensor in list(table.items()):
                            if tensor is None or not tensor.is_inference():
                                continue
                            if id(tensor) not in copies:  # one copy for a tensor that two modules share
                                copy = tensor.clone()
                                copies[id(tensor)] = torch.nn.Parameter(copy, requires_grad=False) \
                                    if isinstance(tensor, torch.nn.Parameter) else copy
                            table[name] = copies[id(tensor)]
                            swapped.append((table, name, tensor))
        yield
    finally:
        for table, name, tensor in reversed(swapped):
            table[name] = tensor


@contextlib.contextmanager
def autograd_friendly() -> Iterator[None]:
    """Grad on, inference mode off, and (Forge's UNet adds in place, as ComfyUI's does, which would
    overwrite what autograd saved) augmented assignments out of place on the gradient path."""
    with torch.inference_mode(False), torch.enable_grad(), _OutOfPlaceOnGradientPath():
        yield
