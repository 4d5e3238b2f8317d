"""Checks of the ComfyUI host inside a real ComfyUI process (no server): memory, partial loading, sampling.

Run as a script with cwd = COMFYUI_PATH and the torchvision stand-in on PYTHONPATH (test_comfy_host.py
does): `python host_checks.py CHECKPOINT CHECK [COMFYUI FLAGS...]`. Prints one JSON line, the
figures the tests assert on. Loads the checkpoint the way ComfyUI's loader node does (inside
torch.inference_mode, so the weights are inference tensors) and trains the way Train Embedding does
(outside it). Partial loading, which ComfyUI never does on a CPU, is forced through ComfyUI's own
code path: `LoadedModel.model_load` is given a small weight budget, as load_models_gpu computes one
on a GPU with little free memory.

Never imported by pytest itself (it imports ComfyUI); never shipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start(flags: list[str]):
    sys.argv = [sys.argv[0], "--cpu", *flags]
    sys.path.insert(0, os.getcwd())
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.path.append(REPO)  # textinv_core; appended so ComfyUI's own `nodes` module still wins


def load(path: str):
    import comfy.sd
    import torch

    with torch.inference_mode():
        model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    return model, clip, vae


def train_step(host, low: bool = False, by_reference: bool = True) -> dict:
    """One step of the loss as the trainer takes it; the word's gradient and what autograd kept."""
    import torch

    if not by_reference:
        host.by_reference.active = contextlib.nullcontext  # the route before: autograd keeps the copies
    words = {k: v.mean(0, keepdim=True).clone().requires_grad_(True) for k, v in host.word_vectors("ball").items()}
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    eps = torch.randn(1, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([500])
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    from textinv_core.recompute import recomputed

    blocks = host.recompute_blocks()
    called = set()
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: called.add(i)) for i, b in enumerate(blocks)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recomputed(blocks, low):
        cond = host.encode_text(["a photo of a <w>"], {"<w>": words})
        prediction = host.predict(host.add_noise(latents, eps, timesteps), timesteps, cond)
    for hook in hooks:
        hook.remove()
    loss = ((prediction - host.target(latents, eps, timesteps)) ** 2).mean()
    loss.backward()
    grads = sum(p.grad is not None for m in (host.base, host.clip.cond_stage_model) for p in m.parameters())
    if not by_reference:
        del host.by_reference.active
        for m in (host.base, host.clip.cond_stage_model):  # the route before left weight gradients
            m.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "grads": {k: v.grad.flatten().tolist() for k, v in words.items()},
            "reads": dict(host.by_reference.reads),
            "weight_grads": grads,
            "saved": sum(saved.values()), "blocks": len(blocks), "blocks_called": len(called),
            "patched_left": sum("forward" in b.__dict__ for b in blocks)}


@contextlib.contextmanager
def weight_budget(patcher, budget: float):
    """ComfyUI loads `patcher` partly, as on a GPU with `budget` bytes for its weights."""
    import comfy.model_management as mm

    original = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        if self.model is patcher:
            lowvram_model_memory = budget
        return original(self, lowvram_model_memory, force_patch_weights)

    mm.LoadedModel.model_load = model_load
    try:
        yield
    finally:
        mm.LoadedModel.model_load = original


def unet_bytes(patcher) -> int:
    return sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())


def notes_left(*modules) -> int:
    from textinv_core.hosts.comfy import _WeightNote

    count = 0
    for root in modules:
        for m in root.modules():
            for attr in ("weight_function", "bias_function"):
                count += sum(isinstance(f, _WeightNote) for f in getattr(m, attr, None) or [])
    return count


def graph_outputs(model, clip) -> dict:
    """What other nodes of the graph get from the shared MODEL and CLIP: conditioning and a denoised latent."""
    import comfy.sample
    import torch

    with torch.inference_mode():
        out = clip.encode_from_tokens(clip.tokenize("a photo of a ball"), return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        negative = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True, return_dict=True)
        negative_cond = negative.pop("cond")
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 1)
        samples = comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", [[cond, out]],
                                      [[negative_cond, negative]], latent, seed=1, disable_pbar=True)
    return {"cond": cond.float().clone(), "samples": samples.float().clone()}


def check(path: str, name: str, flags: list[str]) -> dict:
    start(flags)
    import comfy.model_management as mm
    import numpy as np
    import torch

    from textinv_core.hosts.comfy import ComfyHost

    model, clip, vae = load(path)
    result: dict = {"vram_state": mm.vram_state.name}
    with torch.inference_mode(False), torch.enable_grad():
        if name == "memory":  # by reference vs the copies, with and without recomputation
            before = graph_outputs(model, clip)
            for low in (False, True):
                for by_reference in (True, False):
                    with ComfyHost(model, clip, vae) as host:
                        result[f"{'low' if low else 'fast'}-{'ref' if by_reference else 'copies'}"] = \
                            train_step(host, low=low, by_reference=by_reference)
            with ComfyHost(model, clip, vae) as host:
                result["free_memory"] = host.free_memory()
                result["lower_flag"] = host.lower_vram_flag()
                result["weights"] = unet_bytes(host.patcher) + sum(
                    p.numel() * p.element_size() for p in host.clip.cond_stage_model.parameters())
            after = graph_outputs(model, clip)
            result["graph_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
            result["notes_left"] = notes_left(model.model, clip.cond_stage_model)
        elif name == "step":  # one step each way, e.g. under a VRAM flag
            for by_reference in (True, False):
                with ComfyHost(model, clip, vae) as host:
                    result[f"fast-{'ref' if by_reference else 'copies'}"] = train_step(host, by_reference=by_reference)
        elif name == "partial":  # partly loaded and weightless UNet, with and without weight patches
            for patched in (False, True):
                source = model
                if patched:  # a 'diff' patch on every UNet conv/linear weight: a LoRA-like model
                    source = model.clone()
                    generator = torch.Generator().manual_seed(1)
                    diffs = {k: (torch.randn(v.shape, generator=generator) * 0.01,)
                             for k, v in model.model_state_dict().items()
                             if k.startswith("diffusion_model.") and k.endswith(".weight") and v.dim() >= 2}
                    source.add_patches(diffs, 1.0)
                for label, share in (("full", None), ("partial", 0.35), ("none", 0.0)):
                    with ComfyHost(source, clip, vae) as host:
                        budget = 0.1 if share == 0.0 else (share or 0) * unet_bytes(host.patcher)
                        with weight_budget(host.patcher, budget) if share is not None else contextlib.nullcontext():
                            step = train_step(host, low=False)
                            step["lowvram"] = bool(getattr(host.patcher.model, "model_lowvram", False))
                            step["loaded"] = int(host.patcher.model.model_loaded_weight_memory)
                            step["low"] = train_step(host, low=True)["grads"]
                    result[f"{label}-{'patched' if patched else 'plain'}"] = step
        elif name == "attention":  # ComfyUI's sub-quadratic attention when memory is short: keys split
            import comfy.ldm.modules.attention as attention

            with ComfyHost(model, clip, vae) as host:
                result["roomy"] = train_step(host)
                result["default_attention"] = attention.optimized_attention.__name__
                free = mm.get_free_memory
                mm.get_free_memory = lambda dev=None, torch_free_too=False: (1024, 1024) if torch_free_too else 1024
                try:
                    result["short"] = train_step(host)
                    q = torch.randn(1, 64, 16, requires_grad=True)
                    try:  # what the host routes around: ComfyUI's own function, keys split, under autograd
                        attention.attention_sub_quad(q, q, q, 2).sum().backward()
                        result["sub_quad_with_grad"] = "ran"
                    except RuntimeError as error:
                        result["sub_quad_with_grad"] = str(error)
                finally:
                    mm.get_free_memory = free
        elif name == "sample":
            with ComfyHost(model, clip, vae) as host:
                words = {"<w>": {k: v.mean(0, keepdim=True) for k, v in host.word_vectors("ball").items()}}
                two = host.sample(["a photo of a <w>", "a cat"], words, seed=3, steps=2, guidance=4.0, size=64)
                one = host.sample(["a photo of a <w>"], words, seed=3, steps=2, guidance=4.0, size=64)
                plain = host.sample(["a photo of a ball"], {}, seed=3, steps=2, guidance=4.0, size=64)
            arrays = [np.asarray(image) for image in two + one + plain]
            result.update(count=[len(two), len(one)], sizes=[list(image.size) for image in two + one],
                          same_first=bool(np.array_equal(arrays[0], arrays[2])),
                          prompts_differ=bool(not np.array_equal(arrays[0], arrays[1])),
                          word_equals_typed=bool(np.array_equal(arrays[2], arrays[3])))
        else:
            raise SystemExit(f"unknown check {name}")
    return result


if __name__ == "__main__":
    print("TEXTINV-RESULT " + json.dumps(check(sys.argv[1], sys.argv[2], sys.argv[3:])), flush=True)
