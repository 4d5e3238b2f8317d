"""`textinv demo`: a word learned end to end with nothing downloaded.

Builds a small random model in the real SD1.x diffusers layout, draws a few photos of one object
(a red ring) on varied backgrounds, trains a pseudo-word and writes the embedding, the loss curve
and before/after previews. On a random model the previews show plumbing, not likeness.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


def demo_images(count: int = 4, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """One object (a red ring) at varied places on varied backgrounds, so only the ring is shared."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        background = tuple(int(c) for c in rng.integers(60, 230, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        r = int(rng.integers(size // 5, size // 3))
        cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(220, 30, 30), width=max(3, r // 3))
        images.append(image)
    return images


def run_demo(out: Path, steps: int | None = None) -> dict:
    from .config import PREVIEW_GUIDANCE, PREVIEW_STEPS
    from .embedding_file import save_embedding
    from .hosts.diffusers_host import DiffusersHost
    from .metadata import snapshot_metadata
    from .plots import loss_curve_image
    from .progress import ProgressBar
    from .tiny_models import save_tiny_pipeline
    from .trainer import TrainConfig, train

    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-sd15"
    if not (model / "model_index.json").is_file():
        print(f"building a small random model in the SD1.x layout at {model} ...")
        save_tiny_pipeline("sd1", model)
    host = DiffusersHost.load(model)
    images = demo_images()
    (out / "images").mkdir(exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / "images" / f"ring-{i}.png")
    config = TrainConfig(name="demo-ring", init_word="ring", steps=steps or 200, learning_rate=0.05,
                         batch_size=2, resolution=32, eval_every=25, eval_draws=16)
    result = train(host, images, config, observer=ProgressBar())
    embedding = out / "demo-ring.safetensors"
    save_embedding(embedding, result.vectors, config.name, overwrite=True,
                   metadata=snapshot_metadata(host.family, result.steps_run))
    loss_curve_image(result.train_losses, result.eval_losses, title="demo-ring").save(out / "loss.png")
    init = {config.placeholder: {k: v[:1] for k, v in host.word_vectors("ring").items()}}
    learned = {config.placeholder: result.vectors}
    prompt = [f"a photo of a {config.placeholder}"]
    before = host.sample(prompt, init, seed=0, steps=PREVIEW_STEPS, guidance=PREVIEW_GUIDANCE, size=32)[0]
    after = host.sample(prompt, learned, seed=0, steps=PREVIEW_STEPS, guidance=PREVIEW_GUIDANCE, size=32)[0]
    grid = Image.new("RGB", (64 * 2 + 4, 64), (255, 255, 255))
    grid.paste(before.resize((64, 64)), (0, 0))
    grid.paste(after.resize((64, 64)), (68, 0))
    grid.save(out / "before_after.png")
    print(f"eval loss: {result.init_eval_loss:.4f} at the init word 'ring' -> {result.best_eval_loss:.4f}")
    print(f"wrote {embedding}, {out / 'loss.png'}, {out / 'before_after.png'}")
    return {"embedding": embedding, "result": result}
