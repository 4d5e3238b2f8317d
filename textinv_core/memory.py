"""How much memory a device has left: the free bytes the next training step may allocate.

On CUDA: what the driver reports free plus what PyTorch's caching allocator holds but does not use.
On CPU: the kernel's MemAvailable. Hosts with their own memory management (ComfyUI) ask it instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError


def device_free_bytes(device: torch.device | str) -> int | None:
    """Bytes still allocatable on `device`; None when the device does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class SavedBytes:
    """Counts the bytes autograd keeps for the backward pass while the block runs: each distinct
    tensor storage saved, once, leaving out parameters and views of them (the weights, which exist
    anyway; a linear layer saves its weight transposed, a view). A host's cast copy of a weight is
    new memory and is counted.

    What the hook keeps is a detached alias: an op that saves its own output (exp, softmax, ...) would
    otherwise hold that output with its grad_fn, a cycle through autograd's C++ graph that Python's
    garbage collector cannot see, and every probe would leak what it kept (a text encoder's cast
    weights per call in Forge: gigabytes for SDXL)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not _is_weight(tensor) and key not in self.seen:
            self.seen.add(key)
            self.bytes += storage.nbytes()
        return tensor.detach()

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _is_weight(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)


def extrapolate(sizes: list[int], values: list[float], target: int) -> float:
    """a + b n + c n^2 through three (n, value) points, at n = target; c and b kept >= 0, since memory
    that shrinks with the image would be a fit to noise."""
    import numpy as np

    a, b, c = np.linalg.solve(np.vander(np.asarray(sizes, float), 3, increasing=True), np.asarray(values, float))
    if c < 0:
        b, c = (values[-1] - values[0]) / (sizes[-1] - sizes[0]), 0.0
        a = values[0] - b * sizes[0]
    return float(a + max(b, 0.0) * target + c * target * target)


@dataclass
class MemoryPlan:
    """Which memory mode a run uses, and why (logged, and shown by the front ends)."""

    mode: str                     # "fast" or "low"
    reason: str
    fast_bytes: float | None = None   # estimated bytes a fast step keeps for its backward pass
    low_bytes: float | None = None
    free_bytes: int | None = None
    probe_passes: int = 0             # image-passes (forward only) the estimate cost
    micro_batch: int | None = None    # images per forward and backward when a whole batch would not fit
    #                                   (their gradients add up to the batch's: the same step, in parts)

    def summary(self) -> str:
        parts = f"; the batch runs {self.micro_batch} image(s) at a time" if self.micro_batch else ""
        return f"memory {self.mode}: {self.reason}{parts}"


HEADROOM = 1.25  # a step also needs its largest op's temporaries on top of what it keeps


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def probe_saved_bytes(host, latents: torch.Tensor, draws, words, recompute: bool, sides: list[int]) -> list[float]:
    """Bytes a training forward keeps for backward at small latent sizes (zeros of the real shape)."""
    from .objective import diffusion_loss
    from .recompute import recomputed

    blocks = host.recompute_blocks() if recompute else []
    channels = latents.shape[2]
    out = []
    for side in sides:
        small = torch.zeros(2, latents.shape[1], channels, side, side, device=latents.device, dtype=latents.dtype)
        probe = draws.__class__(draws.index, draws.flips, draws.timesteps,
                                torch.zeros(len(draws), channels, side, side), draws.prompts)
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
            before = torch.cuda.memory_allocated(latents.device)
            with recomputed(blocks, enabled=recompute):
                loss = diffusion_loss(host, small, probe, words)
            out.append(float(torch.cuda.memory_allocated(latents.device) - before))
        else:
            with SavedBytes() as counter, recomputed(blocks, enabled=recompute):
                loss = diffusion_loss(host, small, probe, words)
            out.append(float(counter.bytes))
        del loss
    return out


def plan_memory(mode: str, host, latents: torch.Tensor, draws, words, latent_multiple: int) -> MemoryPlan:
    """fast / low as asked; for auto, low exactly when a fast step's estimated need exceeds what the
    device has free. The need is measured, not guessed: the bytes a training forward keeps for the
    backward pass at three small sizes, extrapolated to the real size (a + b n + c n^2 in pixels).
    When even a low step would not fit, the batch runs in parts (`micro_batch` images per forward and
    backward, the gradients summed: the same step); when not even one image fits, training stops here,
    before its first step, with what to change."""
    if mode == "fast":
        return MemoryPlan(mode, "as set")
    free = host.free_memory() if hasattr(host, "free_memory") else None
    if free is None:
        return MemoryPlan("fast" if mode == "auto" else "low",
                          "auto: the device does not report its free memory" if mode == "auto" else "as set")
    sides = [latent_multiple * i for i in (2, 3, 4)]  # at least 2x2 at the deepest level (group norms)
    target = latents.shape[-1] * latents.shape[-2]
    areas = [s * s for s in sides]
    probes = len(sides) * len(draws)
    low = extrapolate(areas, probe_saved_bytes(host, latents, draws, words, True, sides), target)
    if low * HEADROOM > free:
        per_image = low * HEADROOM / len(draws)  # what a step keeps grows with its images
        micro = int(free // per_image)
        if micro < 1:
            raise MemoryShortError(per_image, free, _lower_memory_advice(host))
        return MemoryPlan("low", f"{mode}: a low step of {len(draws)} images needs ~{gib(low * HEADROOM)}, "
                          f"{gib(free)} free", None, low, free, probes, micro_batch=micro)
    if mode == "low":
        return MemoryPlan("low", f"as set: a step needs ~{gib(low * HEADROOM)}, {gib(free)} free", None, low,
                          free, probes)
    fast = extrapolate(areas, probe_saved_bytes(host, latents, draws, words, False, sides), target)
    need = f"a fast step needs ~{gib(fast * HEADROOM)}, a low one ~{gib(low * HEADROOM)}, {gib(free)} free"
    chosen = "fast" if fast * HEADROOM <= free else "low"
    return MemoryPlan(chosen, f"auto: {need}", fast, low, free, 2 * probes)


def _lower_memory_advice(host) -> str:
    flag = host.lower_vram_flag() if hasattr(host, "lower_vram_flag") else None
    if flag:
        return f"start ComfyUI with {flag} (it keeps fewer weights on the device), or lower the batch size or " \
               "the resolution"
    return "lower the batch size or the resolution, or free memory used by other programs"


class MemoryShortError(UserError):
    """Even with recomputation a training step would not fit in the device's free memory."""

    def __init__(self, need: float, free: int, advice: str):
        super().__init__(f"A training step needs about {gib(need)} for a single image even with memory=low, and "
                         f"the device has {gib(free)} free: {advice}.")
