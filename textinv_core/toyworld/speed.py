"""`textinv bench speed`: time to a good word, textinv's defaults against the anchors' recipes.

For one toy-world concept and several seeds, in one run, three recipes invert the same 5 images:
- textinv: the engine's defaults, untouched (empty init word, early stopping, norm cap, ...);
- paper: Gal et al. 2023 (one vector, base LR 0.005 scaled by the batch, batch 4, constant LR, up to 5000 steps);
- diffusers: the diffusers example's README recipe (one vector, batch 1 with 4 accumulation steps, i.e. batch 4;
  LR 5e-4 scaled to 2e-3, constant, AdamW weight decay 1e-2, up to 3000 steps).
The anchors start from the concept's shape, the coarse word a user would give them. Every run is
measured in UNet image-passes (one image at one timestep, forward and backward): training batches,
textinv's evaluations, its start search and its memory probe count too, a forward-only image as a third
of a pass (a backward costs about two forwards). At passes growing
by a quarter each time, the vectors the recipe would hand over (textinv: the best by evaluation loss;
the anchors: the current ones) are sampled and scored: reconstruction against passes. Reported per
recipe: passes and seconds (training only, sampling excluded) at which reconstruction first reaches
90% of the human caption's, where it ends, where early stopping stopped it; medians and spreads over
seeds; the ratio "passes to 90%: recipe / textinv"; and a plot of the curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import default
from . import scene as world
from .bench import RECON_TEMPLATE, QualityConfig, inversion_config
from .metrics import reconstruction
from .sampling import sample

log = logging.getLogger(__name__)
MARK = 0.9  # of the human caption's reconstruction


@dataclass
class Recipe:
    name: str
    settings: dict = field(default_factory=dict)  # TrainConfig fields over the engine's defaults
    shape_start: bool = True                      # start from the concept's shape (anchors) or the defaults'


WHOLE_SCHEDULE = (0.0, 1.0)  # both anchors draw t uniformly over all of the noise schedule
RECIPES = {
    "textinv": Recipe("textinv", {}, shape_start=False),
    "paper": Recipe("paper", dict(num_vectors=1, learning_rate=0.005, scale_lr=True, batch_size=4, steps=5000,
                                  early_stop_patience=0, max_norm_ratio=0.0, timestep_range=WHOLE_SCHEDULE)),
    "diffusers": Recipe("diffusers", dict(num_vectors=1, learning_rate=2e-3, scale_lr=False, batch_size=4,
                                          steps=3000, weight_decay=1e-2, early_stop_patience=0, max_norm_ratio=0.0,
                                          timestep_range=WHOLE_SCHEDULE)),
}


@dataclass
class Curve:
    recipe: str
    seed: int
    points: list[tuple[int, float, float]] = field(default_factory=list)  # (passes, seconds, reconstruction)
    caption: float = 1.0
    stopped_at: int | None = None   # passes when early stopping ended the run
    init_word: str = ""

    def first_at_mark(self) -> tuple[int, float] | None:
        for passes, seconds, value in self.points:
            if value >= MARK * self.caption:
                return passes, seconds
        return None

    @property
    def end(self) -> float:
        return self.points[-1][2] if self.points else 0.0

    @property
    def best(self) -> tuple[int, float]:
        """(passes, reconstruction) of its best point: what a recipe that never reaches the mark needs."""
        passes, _, value = max(self.points, key=lambda p: (p[2], -p[0]))
        return passes, value


class Measure:
    """An observer that scores the vectors a run would hand over whenever its passes cross a checkpoint."""

    def __init__(self, host, concept, curve: Curve, samples: int, sample_seed: int, per_step: int,
                 eval_draws: int, growth: float = 1.25, first: int = 32):
        self.host, self.concept, self.curve, self.samples, self.seed = host, concept, curve, samples, sample_seed
        self.per_step, self.eval_draws, self.growth, self.next = per_step, eval_draws, growth, first
        self.trainer = None
        self.started = time.perf_counter()
        self.excluded = 0.0  # seconds spent sampling, not training

    def passes(self) -> int:
        t = self.trainer
        forwards = t.memory.probe_passes + len(t.eval_losses) * self.eval_draws
        return t.start_passes + t.swap_passes + t.step * self.per_step + math.ceil(forwards / 3)

    def score(self) -> None:
        began = time.perf_counter()
        trainer = self.trainer
        vectors = trainer.best.vectors if self.curve.recipe == "textinv" else trainer.vectors
        placeholder = trainer.config.placeholder
        images = sample(self.host, RECON_TEMPLATE.format(placeholder),
                        {placeholder: {k: v.detach() for k, v in vectors.items()}}, count=self.samples, seed=self.seed)
        seconds = began - self.started - self.excluded
        self.curve.points.append((self.passes(), seconds, reconstruction(images, self.concept)["graded"]))
        self.excluded += time.perf_counter() - began

    def on_step(self, step: int, total: int, loss: float) -> None:
        if self.passes() >= self.next:
            self.score()
            while self.next <= self.passes():
                self.next = max(self.next + 1, int(self.next * self.growth))

    def on_eval(self, step, eval_loss) -> None: ...

    def on_snapshot(self, step, path) -> None: ...

    def on_preview(self, step, image) -> None: ...

    def should_stop(self) -> bool:
        return False


def recipe_config(recipe: Recipe, concept: dict, image_count: int, seed: int, max_passes: int | None):
    """The TrainConfig one recipe runs with: the engine's defaults under the recipe's own settings, and the
    anchors' start at the concept's shape word."""
    settings = dict(recipe.settings)
    if recipe.shape_start:
        settings["init_word"] = concept["shape"]
    if max_passes:
        settings["steps"] = min(settings.get("steps", default("steps")),
                                max_passes // settings.get("batch_size", default("batch_size")))
    return inversion_config(QualityConfig(concept=concept, settings=settings), image_count, "toy-speed", seed=seed)


def run_recipe(host, images, concept, recipe: Recipe, seed: int, samples: int, caption: float,
               max_passes: int | None) -> Curve:
    from ..trainer import Trainer

    config = recipe_config(recipe, concept, len(images), seed, max_passes)
    curve = Curve(recipe.name, seed, caption=caption)
    measure = Measure(host, concept, curve, samples, sample_seed=seed + 1, per_step=config.batch_size,
                      eval_draws=config.eval_draws)
    trainer = Trainer(host, images, config, observer=measure)
    measure.trainer = trainer
    result = trainer.run()
    curve.init_word = result.init_word
    if result.stopped_reason == "early_stop":
        curve.stopped_at = measure.passes()
    if not curve.points or curve.points[-1][0] != measure.passes():
        measure.score()  # where it ends
    return curve


def seed_images_and_caption(host, concept: dict, seed: int, samples: int) -> tuple[list, float]:
    """One seed's 5 training images and the human caption's reconstruction, the mark's reference
    (sampled with the seed every checkpoint of that seed uses)."""
    images = [world.render(s) for s in world.concept_images(concept, count=5, seed=seed)]
    phrase = f"{concept['colour']} {concept['pattern']} {concept['shape']}"
    caption = reconstruction(sample(host, RECON_TEMPLATE.format(phrase), count=samples, seed=seed + 1), concept)
    return images, caption["graded"]


def run_speed(concept: dict, seeds: list[int], recipes: list[str], samples: int, out: Path,
              max_passes: int | None = None, model: Path | None = None) -> list[Curve]:
    from .model import load_host

    host = load_host(model)
    out.mkdir(parents=True, exist_ok=True)
    curves = []
    for seed in seeds:
        images, caption = seed_images_and_caption(host, concept, seed, samples)
        for name in recipes:
            curve = run_recipe(host, images, concept, RECIPES[name], seed, samples, caption, max_passes)
            log.info("%s seed %d: %s", name, seed, curve.points[-1])
            curves.append(curve)
            (out / "curves.json").write_text(json.dumps([c.__dict__ for c in curves], indent=1))
    return curves


def _median_spread(values: list[float]) -> str:
    if not values:
        return "-"

    def show(value: float) -> str:
        return "never" if math.isinf(value) else f"{value:.0f}"

    spread = f" [{show(min(values))}-{show(max(values))}]" if len(values) > 1 else ""
    return f"{show(statistics.median(values))}{spread}"


def needed(curve: Curve) -> tuple[int, float, bool]:
    """(passes, seconds, reached): to the mark, or to the recipe's own best if it never gets there."""
    hit = curve.first_at_mark()
    if hit:
        return hit[0], hit[1], True
    passes, _ = curve.best
    seconds = next(s for p, s, _ in curve.points if p == passes)
    return passes, seconds, False


def counted(curve: Curve) -> tuple[float, float]:
    """(passes, seconds) the table counts: an anchor that never reaches the mark at its own best (the issue's
    rule); a textinv run that never does as never (infinite), since its best may come early, before it stalls."""
    passes, seconds, reached = needed(curve)
    return (passes, seconds) if reached or curve.recipe != "textinv" else (math.inf, math.inf)


def format_table(curves: list[Curve]) -> str:
    recipes = list(dict.fromkeys(c.recipe for c in curves))
    head = (f"{'recipe':<10} {'reached 90%':>11} {'passes to 90% (median [range])':>32} {'seconds':>16} "
            f"{'end recon/caption':>22} {'end passes':>16} {'early stop at':>16}")
    lines = [head, "-" * len(head)]
    per = {r: [c for c in curves if c.recipe == r] for r in recipes}
    for recipe, group in per.items():
        needs = [needed(c) for c in group]
        reached = sum(n[2] for n in needs)
        ends = [c.end / max(c.caption, 1e-9) for c in group]
        stops = [c.stopped_at for c in group if c.stopped_at]
        end = f"{statistics.median(ends):.2f} [{min(ends):.2f}-{max(ends):.2f}]"
        counts = [counted(c) for c in group]
        lines.append(f"{recipe:<10} {reached:>7}/{len(group):<3} {_median_spread([n[0] for n in counts]):>32} "
                     f"{_median_spread([n[1] for n in counts]):>16} "
                     f"{end:>22} {_median_spread([c.points[-1][0] for c in group]):>16} {_median_spread(stops):>16}")
    if "textinv" in per:
        ours = {c.seed: counted(c)[0] for c in per["textinv"]}
        for recipe, group in per.items():
            if recipe == "textinv":
                continue
            ratios = [counted(c)[0] / ours[c.seed] for c in group if c.seed in ours]
            lines.append(f"passes to 90%: {recipe} / textinv = median {statistics.median(ratios):.1f}x "
                         f"[{min(ratios):.1f}-{max(ratios):.1f}] over {len(ratios)} seeds"
                         + ("" if all(needed(c)[2] for c in group) else f" ({recipe}: a run that never reached 90% "
                                                                         "counts the passes to its own best)")
                         + ("" if all(math.isfinite(p) for p in ours.values()) else " (textinv: a run that never "
                                                                                   "reached 90% counts as never)"))
    return "\n".join(lines)


def plot(curves: list[Curve], title: str, width: int = 720, height: int = 420):
    """Reconstruction / caption's against passes (log scale), one colour per recipe, one line per seed."""
    import math

    from PIL import Image, ImageDraw

    from .figures import PALETTE

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 130, 26, height - 34
    high = max(p[0] for c in curves for p in c.points)
    low = max(1, min(p[0] for c in curves for p in c.points))

    def xy(passes, value):
        x = left + (right - left) * (math.log(max(passes, low)) - math.log(low)) / max(math.log(high / low), 1e-9)
        return x, bottom - (bottom - top) * min(max(value, 0.0), 1.2) / 1.2

    draw.rectangle((left, top, right, bottom), outline=(200, 200, 200))
    for frac in (0.0, 0.3, 0.6, 0.9, 1.2):
        y = xy(low, frac)[1]
        draw.text((6, y - 6), f"{frac:.1f}", fill=(90, 90, 90))
    draw.line([xy(low, MARK), xy(high, MARK)], fill=(180, 180, 180), width=1)
    decade = 10 ** math.floor(math.log10(low))
    while decade <= high:
        if decade >= low:
            x = xy(decade, 0)[0]
            draw.line([(x, bottom), (x, bottom + 4)], fill=(90, 90, 90))
            draw.text((x - 12, bottom + 8), f"{decade:g}", fill=(90, 90, 90))
        decade *= 10
    draw.text((left, 6), f"{title}: reconstruction / caption's vs UNet image-passes (log)", fill=(30, 30, 30))
    for i, recipe in enumerate(dict.fromkeys(c.recipe for c in curves)):
        colour = PALETTE[i % len(PALETTE)]
        for curve in (c for c in curves if c.recipe == recipe):
            points = [xy(p, v / max(curve.caption, 1e-9)) for p, _, v in curve.points]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
        draw.text((right + 10, top + 16 * i), recipe, fill=colour)
    return image


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--concept", required=True, help="shape=...,colour=...,pattern=... (see `textinv bench quality --help`)")
    a("--seeds", default="0,1,2", help="comma-separated seeds (images, training, sampling)")
    a("--recipes", default=",".join(RECIPES), help=f"comma-separated: {', '.join(RECIPES)}")
    a("--samples", type=int, default=32, help="samples scored at each checkpoint")
    a("--max-passes", type=int, default=None, help="cap every recipe's budget (a quick run, marked as such)")
    a("--model", default=None, help="toy-world diffusers folder (default: the committed model)")
    a("--out", default="textinv-bench-speed", help="folder for curves.json and curves.png")


def run_speed_command(args: argparse.Namespace) -> int:
    from ..errors import UserError

    concept = world.parse_concept(args.concept)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not seeds or args.samples < 1:
        raise UserError(f"--recipes must name {', '.join(RECIPES)} and --seeds and --samples at least one "
                        f"(got {', '.join(unknown) or args.seeds})")
    out = Path(args.out)
    start = time.time()
    curves = run_speed(concept, seeds, recipes, args.samples, out, args.max_passes,
                       Path(args.model) if args.model else None)
    cap = f", every budget capped at {args.max_passes} passes" if args.max_passes else ""
    print(f"concept {args.concept}: {len(seeds)} seed(s), {args.samples} samples per checkpoint{cap}, "
          f"{time.time() - start:.0f} s")
    for curve in curves:
        if curve.recipe == "textinv":
            print(f"seed {curve.seed}: textinv started from '{curve.init_word}'")
    print(format_table(curves))
    plot(curves, args.concept).save(out / "curves.png")
    print(f"wrote {out / 'curves.json'} and {out / 'curves.png'}")
    return 0
