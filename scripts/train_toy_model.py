"""Train the toy-world text-to-image model (textinv_core.toyworld) and save it as a diffusers folder.

Deterministic: one seed, a fixed thread count, scenes drawn per step from a seeded generator.
UNet and text encoder are trained jointly from scratch (a frozen random text model cannot learn
attribute words). Only the token rows of words the world uses are trained; every other row of the
real 49408-token table keeps its seeded random init, which keeps a step cheap. Caption dropout
(10% empty) gives classifier-free guidance its unconditional branch. The saved weights are an EMA.

    python scripts/train_toy_model.py --out models/toyworld   # 6000 steps, ~0.41 s/step on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from textinv_core.tokenizer import clip_tokenizer
from textinv_core.toyworld import scene as world
from textinv_core.toyworld.model import build_scheduler, build_text_encoder, build_unet, save_model

log = logging.getLogger("train_toy_model")

# hyper-parameters in one place
SEED = 0
THREADS = 2    # a fixed thread count keeps CPU kernels deterministic
STEPS = 6000
BATCH = 32
LR = 2e-3            # AdamW; linear warm-up then cosine decay to 10%
WARMUP = 100
EMA_DECAY = 0.999
MAX_TOKENS = 77


def world_token_ids(tokenizer) -> list[int]:
    """Ids of every token a training caption can contain (plus BOS/EOS): the rows that train."""
    words = ["a photo of a", "on a background", "object"]
    for options in world.ATTRIBUTES.values():
        words.extend(options)
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for text in words:
        ids.update(tokenizer(text, add_special_tokens=False).input_ids)
    return sorted(ids)


class RowTable(torch.nn.Module):
    """Trainable copies of the used token rows, spliced over the frozen table's output by a hook."""

    def __init__(self, embedding: torch.nn.Embedding, ids: list[int]):
        super().__init__()
        self.ids = torch.tensor(ids)
        slot = torch.full((embedding.num_embeddings,), -1, dtype=torch.long)
        slot[self.ids] = torch.arange(len(ids))
        self.register_buffer("slot", slot, persistent=False)
        self.rows = torch.nn.Parameter(embedding.weight.detach()[self.ids].clone())
        embedding.weight.requires_grad_(False)
        embedding.register_forward_hook(self._splice)

    def _splice(self, _module, inputs, output):
        slot = self.slot[inputs[0]]
        return torch.where((slot >= 0)[..., None], self.rows[slot.clamp(min=0)], output)

    @torch.no_grad()
    def write_back(self, embedding: torch.nn.Embedding) -> None:
        embedding.weight[self.ids] = self.rows.detach()


def batch_tensors(step: int, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    scenes, captions = world.training_batch(seed=SEED * 1_000_003 + step, count=BATCH)
    pixels = np.stack([np.asarray(world.render(s), dtype=np.float32) for s in scenes])
    pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    return pixels, ids


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/toyworld", help="output diffusers folder")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps of the --steps schedule (same EMA as that checkpoint)")
    parser.add_argument("--checkpoint-every", type=int, default=1500, help="save the EMA model every N steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    STEPS = args.steps
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    tokenizer = clip_tokenizer()
    text_encoder, unet, scheduler = build_text_encoder(), build_unet(), build_scheduler()
    embedding = text_encoder.get_input_embeddings()
    rows = RowTable(embedding, world_token_ids(tokenizer))
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    params.append(rows.rows)
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    alphas = scheduler.alphas_cumprod
    start, running = time.time(), None

    def save(folder: Path) -> None:
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
            rows.write_back(embedding)
            save_model(folder, unet, text_encoder, tokenizer, scheduler)
            for p, v in zip(params, live):
                p.copy_(v)

    last = min(STEPS, args.stop_after or STEPS)
    for step in range(last):
        pixels, ids = batch_tensors(step, tokenizer)
        noise = torch.randn(pixels.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * pixels + (1 - a).sqrt() * noise
        hidden = text_encoder(ids).last_hidden_state
        target = a.sqrt() * noise - (1 - a).sqrt() * pixels  # v (Salimans & Ho 2022)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=hidden).sample, target)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 50 == 0 or step == last - 1:
            log.info("step %d loss %.4f (avg %.4f) %.2f s/step", step, value, running,
                     (time.time() - start) / (step + 1))
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < last:
            save(Path(args.out + f".step{step + 1}"))
    save(Path(args.out))
    digest = hashlib.sha256(b"".join(e.numpy().tobytes() for e in ema)).hexdigest()[:16]
    minutes = (time.time() - start) / 60
    log.info("done: %d of %d steps in %.1f min; EMA digest %s; saved %s", last, STEPS, minutes, digest, args.out)


if __name__ == "__main__":
    main()
