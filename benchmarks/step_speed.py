"""Per-step cost of our trainer against the diffusers textual_inversion examples' per-step work.

The reference re-implements what those examples (textual_inversion.py; textual_inversion_sdxl.py for
SDXL) do every step: add the placeholder to the tokenizer(s) and resize the token table(s);
VAE-encode the batch (latent_dist.sample()); make the whole token table(s) trainable; AdamW over the
whole table(s); after each step copy back every row but the new one. Ours is textinv's Trainer:
latents cached once, k vectors spliced in by a hook, AdamW over those vectors only, with the memory
setting given (`fast` by default, like the examples, which keep every activation). Same model
weights, images, batch, resolution, seed and precision.

Precision: fp32 runs everything in fp32. fp16/bf16 follow each side's own mixed-precision policy:
the examples cast UNet and VAE to half precision but must keep the text encoders (whose tables they
train) in fp32 under autocast; ours runs every frozen module in half precision and keeps only the
vectors and their AdamW state in fp32. fp16 needs CUDA.

Each side runs in its own subprocess so its peak memory is its own (CUDA: max allocated; CPU: peak
resident memory while the steps run, after the model is built).
Run:  python benchmarks/step_speed.py                  (tiny model, then full-size SD1.5 at 256 px, CPU)
      python benchmarks/step_speed.py --device cuda --sizes sd15-512,sdxl-1024 --precision fp16,bf16
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

SIZES = {  # name -> (family, resolution, batch)
    "tiny": ("tiny", 64, 2),
    "sd15": ("sd15", 256, 1),
    "sd15-512": ("sd15", 512, 1),
    "sdxl-1024": ("sdxl", 1024, 1),
}


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def components(family: str, seed: int, device: str) -> dict:
    """fp32 components on `device`; each side casts them by its own precision policy."""
    if family == "tiny":
        import torch

        from textinv_core.tiny_models import build_tiny_components

        parts = build_tiny_components("sd1", seed)
        return {k: v.to(device) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
    from full_size import components as full

    return full(family, seed, device=device)


def current_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory while training steps run: CUDA max allocated, else resident memory sampled every
    2 ms after construction memory is released (the process-wide maximum would only show how the
    random model was built)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        import ctypes
        import gc
        import threading

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            self.peak = self.base
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = current_rss_mb()
        self.peak = self.base
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, current_rss_mb())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
            return
        self.running = False
        self.thread.join()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- ours -------------------------------------------------------------------------------------------
def run_ours(size: str, steps: int, warmup: int, seed: int, precision: str, device: str, memory: str) -> dict:
    import torch
    from full_size import images

    from textinv_core.hosts.diffusers_host import DiffusersHost
    from textinv_core.trainer import TrainConfig, Trainer

    family, resolution, batch = SIZES[size]
    host = DiffusersHost(components(family, seed, device), device=device, dtype=_dtype(precision))
    config = TrainConfig(name="bench", init_word="cat", steps=steps + warmup, learning_rate=5e-3,
                         batch_size=batch, resolution=resolution, seed=seed, eval_draws=1, memory=memory,
                         preview_every=0, snapshot_every=0)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        trainer = Trainer(host, images(), config)
        setup = time.perf_counter() - start
        times, losses = [], []
        for i in range(steps + warmup):
            start = time.perf_counter()
            losses.append(trainer.train_step())  # NaN (fp16 overflow of random weights) skips the backward
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    params = trainer.optimizer.param_groups[0]["params"]
    state = sum(t.numel() * t.element_size() for p in params for t in trainer.optimizer.state[p].values()
                if t.dim() > 0)
    trainable = sum(p.numel() * p.element_size() for p in params)
    assert all(p.dtype == torch.float32 for p in params)
    if not all(map(math.isfinite, losses)):
        return {"error": f"NaN loss in {sum(not math.isfinite(v) for v in losses)} of {len(losses)} steps: "
                         "random weights overflow in this precision; no backward ran, so no comparison"}
    return {"step_s": statistics.median(times), "setup_s": setup, "peak_mb": peak.peak, "base_mb": peak.base,
            "trainable_bytes": trainable, "optim_bytes": state}


# -- reference (diffusers examples/textual_inversion per-step work) -------------------------------
def run_reference(size: str, steps: int, warmup: int, seed: int, precision: str, device: str, memory: str) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from full_size import images

    from textinv_core.data import pixels_from_images
    from textinv_core.templates import OBJECT

    family, resolution, batch = SIZES[size]
    parts = components(family, seed, device)
    peak = PeakMemory(device).__enter__()
    start = time.perf_counter()
    encoders = [(parts["text_encoder"], copy.deepcopy(parts["tokenizer"]))]
    if parts.get("text_encoder_2") is not None:
        encoders.append((parts["text_encoder_2"], copy.deepcopy(parts["tokenizer_2"])))
    vae, unet, scheduler = parts["vae"], parts["unet"], parts["scheduler"]
    tables, originals, placeholder_ids = [], [], []
    for text_encoder, tokenizer in encoders:
        tokenizer.add_tokens(["<bench>"])
        placeholder_ids.append(tokenizer.convert_tokens_to_ids("<bench>"))
        init_id = tokenizer.encode("cat", add_special_tokens=False)[0]
        text_encoder.resize_token_embeddings(len(tokenizer))
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[placeholder_ids[-1]] = table[init_id].clone()
        text_encoder.requires_grad_(False)  # the example freezes encoder, final norm and positions ...
        text_encoder.get_input_embeddings().requires_grad_(True)  # ... and trains the whole token table
        text_encoder.train()
        tables.append(table)
        originals.append(table.data.clone())
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    weight_dtype = _dtype(precision)
    unet.to(dtype=weight_dtype)
    vae.to(dtype=weight_dtype)
    autocast = torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=weight_dtype,
                              enabled=precision != "fp32")
    optimizer = torch.optim.AdamW(tables, lr=5e-3 * batch, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    pixels_all = pixels_from_images(images(), resolution).to(device)
    generator = torch.Generator().manual_seed(seed)
    setup = time.perf_counter() - start
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        index = torch.randint(0, pixels_all.shape[0], (batch,), generator=generator)
        pixels = pixels_all[index.to(device)]
        flip = (torch.rand(batch, generator=generator) < 0.5).to(device)
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        choice = torch.randint(0, len(OBJECT), (batch,), generator=generator)
        prompts = [OBJECT[int(j)].format("<bench>") for j in choice]
        latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample().detach() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            hidden, pooled = [], None
            for text_encoder, tokenizer in encoders:
                ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                                return_tensors="pt").input_ids.to(device)
                out = text_encoder(ids, output_hidden_states=len(encoders) > 1)
                if len(encoders) > 1:  # SDXL: penultimate layer of both, pooled output of the second
                    hidden.append(out.hidden_states[-2])
                    pooled = getattr(out, "text_embeds", pooled)
                else:
                    hidden.append(out[0])
            context = torch.cat(hidden, dim=-1).to(weight_dtype)
            added = None
            if pooled is not None:
                ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device)
                added = {"text_embeds": pooled.to(weight_dtype), "time_ids": ids.repeat(batch, 1).to(weight_dtype)}
            pred = unet(noisy, timesteps, context, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for table, original, placeholder in zip(tables, originals, placeholder_ids):
                keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
                keep[placeholder] = False
                table[keep] = original[keep]
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak.__exit__()
    state = sum(t.numel() * t.element_size() for p in tables for t in optimizer.state[p].values() if t.dim() > 0)
    trainable = sum(p.numel() * p.element_size() for p in tables)
    return {"step_s": statistics.median(times), "setup_s": setup, "peak_mb": peak.peak, "base_mb": peak.base,
            "trainable_bytes": trainable, "optim_bytes": state}


# -- driver ----------------------------------------------------------------------------------------
def worker(args) -> None:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    run = run_ours if args.worker == "ours" else run_reference
    print(json.dumps(run(args.size, args.steps, args.warmup, args.seed, args.precision, args.device, args.memory)))


def measure(side: str, size: str, precision: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--size", size, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seed", str(args.seed), "--threads", str(args.threads),
           "--precision", precision, "--device", args.device, "--memory", args.memory]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,sd15", help=f"comma-separated: {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, fp16, bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory", default="fast", choices=("fast", "low"), help="ours: textinv's memory setting")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}; median of {args.steps} steps after {args.warmup} warm-up; "
          f"ours with memory={args.memory}; train peak = {'max allocated' if 'cuda' in args.device else 'RSS'}"
          " while steps run")
    header = f"{'model':<9} {'res':>4} {'batch':>5} {'prec':>5} | {'side':<9} | {'s/step':>8} | {'train peak':>10} | " \
             f"{'over weights':>12} | {'trainable':>9} | {'optim state':>11}"
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        _, resolution, batch = SIZES[size]
        for precision in args.precision.split(","):
            rows = {side: measure(side, size, precision, args) for side in ("reference", "ours")}
            lead = f"{size:<9} {resolution:>4} {batch:>5} {precision:>5}"
            for side, r in rows.items():
                if "error" in r:
                    print(f"{lead} | {side:<9} | {r['error'][:90]}")
                    continue
                print(f"{lead} | {side:<9} | {r['step_s']:>8.3f} | {r['peak_mb']:>7.0f} MB"
                      f" | {r['peak_mb'] - r['base_mb']:>9.0f} MB | {human(r['trainable_bytes']):>9} | "
                      f"{human(r['optim_bytes']):>11}")
            ref, ours = rows["reference"], rows["ours"]
            if "error" not in ref and "error" not in ours:
                print(f"{lead} | {'ratio':<9} | {ref['step_s'] / ours['step_s']:>7.1f}x | "
                      f"{ref['peak_mb'] / ours['peak_mb']:>9.2f}x | "
                      f"{(ref['peak_mb'] - ref['base_mb']) / max(ours['peak_mb'] - ours['base_mb'], 1):>11.1f}x | "
                      f"{ref['trainable_bytes'] / ours['trainable_bytes']:>8.0f}x | "
                      f"{ref['optim_bytes'] / max(ours['optim_bytes'], 1):>10.0f}x")
            print("-" * len(header))


if __name__ == "__main__":
    main()
