"""`textinv demo` on the toy world: a new user watches a word being learned and can see that it worked.

Renders 5 images of a concept the toy model never saw (a green striped triangle), learns a pseudo-word
for it with the engine's defaults (it finds its own start word), and writes a before/after grid (the start
word's samples above, the learned word's below) with the scorer's reconstruction for each.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import scene as world
from .figures import image_grid
from .metrics import reconstruction
from .sampling import sample

log = logging.getLogger(__name__)
DEMO_CONCEPT = "shape=triangle,colour=green,pattern=striped"


def run_demo(out: Path, steps: int | None = None, concept: str = DEMO_CONCEPT, model: Path | None = None,
             samples: int = 16) -> dict:
    """Learn the concept, save the embedding and before_after.png in `out`, return the scores."""
    from ..embedding_file import save_embedding
    from ..metadata import training_metadata
    from ..plots import loss_curve_image
    from ..trainer import train
    from .bench import QualityConfig, inversion_config
    from .model import load_host

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parsed = world.parse_concept(concept)
    host = load_host(model)
    images = [world.render(s) for s in world.concept_images(parsed, count=5, seed=0)]
    for i, image in enumerate(images):
        image.save(out / f"train-{i}.png")
    settings = QualityConfig(concept=parsed, settings={"steps": steps} if steps else {})  # the defaults
    config = inversion_config(settings, len(images), "toy-demo")
    result = train(host, images, config)
    embedding = out / "toy-demo.safetensors"
    save_embedding(embedding, result.vectors, config.name, overwrite=True,
                   metadata=training_metadata(host.family, config, result))
    loss_curve_image(result.train_losses, result.eval_losses, title="toy-demo").save(out / "loss.png")
    before = sample(host, f"a photo of a {result.init_word}", count=samples, seed=1)
    after = sample(host, f"a photo of a {config.placeholder}", {config.placeholder: result.vectors},
                   count=samples, seed=1)
    scores = {"before": reconstruction(before, parsed)["graded"], "after": reconstruction(after, parsed)["graded"]}
    image_grid([("training images", images), (f"before: {result.init_word} {scores['before']:.2f}", before),
                (f"after: learned {scores['after']:.2f}", after)], label_width=170).save(out / "before_after.png")
    log.info("eval loss %.4f -> %.4f; reconstruction %.2f -> %.2f", result.init_eval_loss, result.best_eval_loss,
             scores["before"], scores["after"])
    return {"embedding": embedding, "result": result, "scores": scores, "grid": out / "before_after.png"}
