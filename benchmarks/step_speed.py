"""Per-step cost of our trainer against the diffusers textual_inversion example's per-step work.

The reference re-implements what that example does every step: add the placeholder to the
tokenizer and resize the token table; VAE-encode the batch (latent_dist.sample()); make the whole
token table trainable; AdamW over the whole table; after each step copy back every row but the
new one. Ours is textinv's Trainer: latents cached once, k vectors spliced in by a hook, AdamW over
those vectors only. Same model weights, images, batch, resolution, seed and precision.

Precision: fp32 runs everything in fp32. bf16 follows each side's own mixed-precision policy: the
example casts UNet and VAE to bf16 but must keep the text encoder (whose table it trains) in fp32
under autocast; ours runs every frozen module in bf16 and keeps only the vectors and their AdamW
state in fp32.

Each side runs in its own subprocess so peak memory is its own.
Run:  python benchmarks/step_speed.py                  (tiny model, then full-size SD1.5 at 256 px)
      python benchmarks/step_speed.py --sizes tiny --steps 20 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SIZES = {  # name -> (resolution, batch)
    "tiny": (64, 2),
    "sd15": (256, 1),
}


def sd15_components(seed: int) -> dict:
    """Full-size SD1.5 architecture (UNet 860M, CLIP-L 123M, VAE 84M) with random weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from textinv_core.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return {"family": "sd1", "unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval(),
            "tokenizer": clip_tokenizer(), "scheduler": scheduler}


def components(size: str, seed: int) -> dict:
    from textinv_core.tiny_models import build_tiny_components

    return build_tiny_components("sd1", seed) if size == "tiny" else sd15_components(seed)


def images(count: int = 4, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (300, 280, 3), dtype=np.uint8)) for _ in range(count)]


def current_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRss:
    """Peak resident memory while training steps run, sampled every 2 ms after construction memory
    is released (the process-wide maximum would only show how the random model was built)."""

    def __enter__(self):
        import ctypes
        import gc
        import threading

        gc.collect()
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
        self.running = False
        self.thread.join()


# -- ours -------------------------------------------------------------------------------------------
def run_ours(size: str, steps: int, warmup: int, seed: int, precision: str) -> dict:
    import torch

    from textinv_core.hosts.diffusers_host import DiffusersHost
    from textinv_core.trainer import TrainConfig, Trainer

    resolution, batch = SIZES[size]
    host = DiffusersHost(components(size, seed), dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    config = TrainConfig(name="bench", init_word="cat", steps=steps + warmup, learning_rate=5e-3,
                         batch_size=batch, resolution=resolution, seed=seed, eval_draws=1)
    with PeakRss() as memory:
        start = time.perf_counter()
        trainer = Trainer(host, images(), config)
        setup = time.perf_counter() - start
        times = []
        for i in range(steps + warmup):
            start = time.perf_counter()
            trainer._train_step()
            trainer.step += 1
            if i >= warmup:
                times.append(time.perf_counter() - start)
    params = trainer.optimizer.param_groups[0]["params"]
    state = sum(t.numel() * t.element_size() for p in params for t in trainer.optimizer.state[p].values()
                if t.dim() > 0)
    trainable = sum(p.numel() * p.element_size() for p in params)
    assert all(p.dtype == torch.float32 for p in params)
    return {"step_s": statistics.median(times), "setup_s": setup, "peak_mb": memory.peak, "base_mb": memory.base,
            "trainable_bytes": trainable, "optim_bytes": state}


# -- reference (diffusers examples/textual_inversion per-step work) -------------------------------
def run_reference(size: str, steps: int, warmup: int, seed: int, precision: str) -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    from textinv_core.data import pixels_from_images
    from textinv_core.templates import OBJECT

    resolution, batch = SIZES[size]
    parts = components(size, seed)
    memory = PeakRss().__enter__()
    tokenizer = copy.deepcopy(parts["tokenizer"])
    text_encoder, vae, unet, scheduler = parts["text_encoder"], parts["vae"], parts["unet"], parts["scheduler"]
    start = time.perf_counter()
    tokenizer.add_tokens(["<bench>"])
    placeholder_id = tokenizer.convert_tokens_to_ids("<bench>")
    init_id = tokenizer.encode("cat", add_special_tokens=False)[0]
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[placeholder_id] = table[init_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)  # the example freezes encoder, final norm and positions ...
    text_encoder.get_input_embeddings().requires_grad_(True)  # ... and trains the whole token table
    text_encoder.train()
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet.to(dtype=weight_dtype)
    vae.to(dtype=weight_dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=5e-3 * batch,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    orig_embeds = table.data.clone()
    pixels_all = pixels_from_images(images(), resolution)
    generator = torch.Generator().manual_seed(seed)
    setup = time.perf_counter() - start
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        index = torch.randint(0, pixels_all.shape[0], (batch,), generator=generator)
        pixels = pixels_all[index]
        flip = torch.rand(batch, generator=generator) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        choice = torch.randint(0, len(OBJECT), (batch,), generator=generator)
        prompts = [OBJECT[int(j)].format("<bench>") for j in choice]
        input_ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                              return_tensors="pt").input_ids
        latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample().detach() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            hidden = text_encoder(input_ids)[0].to(weight_dtype)
            pred = unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[placeholder_id] = False
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[keep] = orig_embeds[keep]
        if i >= warmup:
            times.append(time.perf_counter() - start)
    memory.__exit__()
    params = list(text_encoder.get_input_embeddings().parameters())
    state = sum(t.numel() * t.element_size() for p in params for t in optimizer.state[p].values() if t.dim() > 0)
    trainable = sum(p.numel() * p.element_size() for p in params)
    return {"step_s": statistics.median(times), "setup_s": setup, "peak_mb": memory.peak, "base_mb": memory.base,
            "trainable_bytes": trainable, "optim_bytes": state}


# -- driver ----------------------------------------------------------------------------------------
def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    run = run_ours if args.worker == "ours" else run_reference
    print(json.dumps(run(args.size, args.steps, args.warmup, args.seed, args.precision)))


def measure(side: str, size: str, precision: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--size", size, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seed", str(args.seed), "--threads", str(args.threads),
           "--precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,sd15")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    print(f"torch {torch.__version__}, CPU, {args.threads} threads; median of {args.steps} steps after "
          f"{args.warmup} warm-up; train peak = resident memory while steps run")
    header = f"{'model':<6} {'res':>4} {'batch':>5} {'prec':>5} | {'side':<9} | {'s/step':>8} | {'train peak':>10} | " \
             f"{'over weights':>12} | {'trainable':>9} | {'optim state':>11}"
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        resolution, batch = SIZES[size]
        for precision in args.precision.split(","):
            rows = {side: measure(side, size, precision, args) for side in ("reference", "ours")}
            lead = f"{size:<6} {resolution:>4} {batch:>5} {precision:>5}"
            for side, r in rows.items():
                print(f"{lead} | {side:<9} | {r['step_s']:>8.3f} | {r['peak_mb']:>7.0f} MB"
                      f" | {r['peak_mb'] - r['base_mb']:>9.0f} MB | {human(r['trainable_bytes']):>9} | "
                      f"{human(r['optim_bytes']):>11}")
            ref, ours = rows["reference"], rows["ours"]
            print(f"{lead} | {'ratio':<9} | {ref['step_s'] / ours['step_s']:>7.1f}x | "
                  f"{ref['peak_mb'] / ours['peak_mb']:>9.2f}x | "
                  f"{(ref['peak_mb'] - ref['base_mb']) / max(ours['peak_mb'] - ours['base_mb'], 1):>11.1f}x | "
                  f"{ref['trainable_bytes'] / ours['trainable_bytes']:>8.0f}x | "
                  f"{ref['optim_bytes'] / max(ours['optim_bytes'], 1):>10.0f}x")
            print("-" * len(header))


if __name__ == "__main__":
    main()
