"""`textinv bench quality`: does a learned word capture a toy-world concept? (paper §5, Fig. 10)

Renders 5 images of a concept (shape, colour, pattern) on varied backgrounds and sizes, inverts it
with the engine from an init word, then samples "a photo of S*" and edit prompts for the learned
word (k vectors: the engine's default, or the counts --vectors gives) and for the baselines: the
init word, the human caption (the attribute words) and a random vector. The scorer reads the
samples back; the table, a sample grid and a reconstruction-vs-editability scatter come out. Must
never change the model or the engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import default
from ..errors import UserError
from . import scene as world
from .figures import image_grid, scatter
from .metrics import Edit, editability, mean_and_spread, reconstruction
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample_prompts

log = logging.getLogger(__name__)
PLACEHOLDER_NAME = "toy-concept"
RECON_TEMPLATE = "a photo of a {}"


@dataclass
class QualityConfig:
    """Benchmark settings. The inversion runs with the engine's defaults (what a user gets by pressing
    Queue); `settings` holds the TrainConfig fields a run overrides, and every override is printed as a
    tuned setting. 64 samples give a standard error of about 0.06 per cell and seed."""

    concept: dict[str, str]
    model: Path | None = None        # diffusers folder; None = the committed toy model
    out: Path = Path("textinv-bench-quality")
    samples: int = 64                # of "a photo of a S*" per condition and seed (reconstruction)
    edit_samples: int = 16           # per edit prompt, condition and seed (six edits make editability)
    seeds: tuple[int, ...] = (0,)    # inversion + sampling seeds; the spread across them is reported
    vectors: tuple[int, ...] = (default("num_vectors"),)  # vector counts k to learn; the engine's by default
    settings: dict = field(default_factory=dict)  # TrainConfig overrides (tuned settings); {} = the defaults
    restarts: int = 1                # inversions per word (other training seeds); the lowest evaluation loss wins
    images: int = 5
    sample_steps: int = DEFAULT_STEPS  # DDIM steps
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance scale

    def tuned(self) -> str:
        """The settings that differ from the engine's defaults, as a line for the report."""
        parts = [f"{k}={v}" for k, v in sorted(self.settings.items())]
        if self.restarts != 1:
            parts.append(f"restarts={self.restarts}")
        return "tuned: " + ", ".join(parts) if parts else "the engine's defaults, nothing tuned"


def edits_for(concept: dict[str, str]) -> list[Edit]:
    """Backgrounds and sizes; with `recolour_for`, the edits whose mean is editability (the recolour,
    the hardest, is also reported apart)."""
    edits = [Edit(f"a photo of a {{}} on a {bg} background", "background", bg) for bg in world.BACKGROUNDS]
    edits += [Edit(f"a photo of a {size} {{}}", "size", size) for size in world.SIZES]
    return edits


def recolour_for(concept: dict[str, str]) -> Edit:
    colours = list(world.COLOURS)
    new = colours[(colours.index(concept["colour"]) + 1) % len(colours)]
    return Edit(f"a photo of a {new} {{}}", "colour", new)


@dataclass
class Condition:
    """One row of the table: how the concept is named in a prompt."""

    label: str
    phrase: str                       # what replaces "{}" in a template
    words: dict                       # placeholder -> vectors for the host
    recolour_phrase: str | None = None  # the caption drops its own colour word under a recolour
    steps_run: int | None = None
    best_step: int | None = None      # the step whose vectors were kept (best evaluation loss)
    stopped_reason: str = ""


def inversion_config(cfg: QualityConfig, image_count: int, name: str, k: int | None = None, seed: int = 0):
    """The engine's TrainConfig for one toy-world inversion: the defaults, the toy world's data and size,
    and the benchmark's overrides (the demo's too). k: the word's vectors; None = the settings' or the
    engine's default."""
    from ..trainer import TrainConfig

    settings = dict(cfg.settings)
    if k is not None:
        settings["num_vectors"] = k
    return TrainConfig(name=name, resolution=world.SIZE, templates="captions",
                       captions=[RECON_TEMPLATE] * image_count, seed=seed, preview_every=0, snapshot_every=0,
                       **settings)


def invert(host, images, concept_seed: int, k: int, cfg: QualityConfig):
    """The engine's textual inversion of the training images into k vectors.

    With `cfg.restarts` > 1 the inversion runs again from the same init word with other training seeds
    and the run whose vectors have the lowest loss on one shared set of evaluation draws is kept: the
    loss alone picks, never the scorer. (Each run's own draws differ with its seed, so its own best
    loss is not comparable across runs.)
    """
    from ..data import pixels_from_images
    from ..evaluation import draws_for_run, evaluate
    from ..objective import encode_latents
    from ..trainer import train

    runs = []
    for restart in range(cfg.restarts):
        config = inversion_config(cfg, len(images), PLACEHOLDER_NAME, k, seed=concept_seed + 1000 * restart)
        runs.append(train(host, images, config))
        log.info("k=%d restart %d: best evaluation loss %.4f at step %d", k, restart, runs[-1].best_eval_loss,
                 runs[-1].best_step)
    if len(runs) == 1:
        return config.placeholder, runs[0]
    judge = inversion_config(cfg, len(images), PLACEHOLDER_NAME, k, seed=concept_seed)
    latents = encode_latents(host, pixels_from_images(images, judge.resolution))
    draws = draws_for_run(judge, len(images), latents.shape[2:], host.num_timesteps)
    losses = [evaluate(host, latents, draws, {judge.placeholder: result.vectors},
                       batch_size=max(judge.batch_size, 4)) for result in runs]
    best = min(range(len(runs)), key=losses.__getitem__)
    log.info("k=%d: shared-draw losses %s; kept restart %d", k, ", ".join(f"{v:.4f}" for v in losses), best)
    return config.placeholder, runs[best]


def random_vector(host, seed: int) -> dict[str, torch.Tensor]:
    """A Gaussian vector with the mean norm of the world's own word rows (a word-sized random guess)."""
    words = " ".join(world.SHAPES + tuple(world.COLOURS) + world.PATTERNS)
    out = {}
    for key, rows in host.word_vectors(words).items():
        direction = torch.randn(1, rows.shape[1], generator=torch.Generator().manual_seed(seed + 12345))
        out[key] = direction / direction.norm() * rows.norm(dim=1).mean()
    return out


def conditions_for(host, images, concept: dict[str, str], seed: int, cfg: QualityConfig) -> list[Condition]:
    caption = f"{concept['colour']} {concept['pattern']} {concept['shape']}"
    rows, results = [], []
    for k in cfg.vectors:
        start = time.time()
        placeholder, result = invert(host, images, seed, k, cfg)
        results.append(result)
        norms = [f"{float(n):.2f}" for v in result.vectors.values() for n in v.norm(dim=1)]
        swaps = ", ".join(f"step {step}: {change}" for step, change in result.swaps) or "none"
        log.info("k=%d: eval loss %.4f -> %.4f, %d steps (%s) in %.0f s; vector norms %s; swaps kept: %s", k,
                 result.init_eval_loss, result.best_eval_loss, result.steps_run, result.stopped_reason,
                 time.time() - start, norms, swaps)
        rows.append(Condition(f"learned k={k}", placeholder, {placeholder: result.vectors},
                              steps_run=result.steps_run, best_step=result.best_step,
                              stopped_reason=result.stopped_reason))
    start = results[0].init_word  # found per seed when none is given: one row across seeds, its words kept
    given = cfg.settings.get("init_word")
    rows.append(Condition(f"init word '{given or 'found'}'", start, {}))
    rows.append(Condition("human caption", caption, {},
                          recolour_phrase=f"{concept['pattern']} {concept['shape']}"))
    rows.append(Condition("random vector", "<random>", {"<random>": random_vector(host, seed)}))
    return rows


def measure(host, condition: Condition, concept: dict[str, str], seed: int, cfg: QualityConfig) -> dict:
    """Samples of every prompt for one condition, scored: recon, edit (mean of edits), recolour."""
    edits, recolour = edits_for(concept), recolour_for(concept)
    prompts = [RECON_TEMPLATE.format(condition.phrase)]
    prompts += [edit.template.format(condition.phrase) for edit in edits]
    prompts.append(recolour.template.format(condition.recolour_phrase or condition.phrase))
    counts = [cfg.samples] + [cfg.edit_samples] * (len(prompts) - 1)
    images = sample_prompts(host, [p for p, n in zip(prompts, counts) for _ in range(n)], condition.words,
                            seed=seed, steps=cfg.sample_steps, guidance=cfg.guidance)
    ends = [sum(counts[:i + 1]) for i in range(len(counts))]
    groups = [images[end - n:end] for end, n in zip(ends, counts)]
    out = {"recon": reconstruction(groups[0], concept), "edits": {}, "examples": {"recon": groups[0][:6]}}
    for edit, group in zip(edits, groups[1:-1]):
        out["edits"][edit.label] = editability(group, edit, concept)
        out["examples"][edit.label] = group[:2]
    out["recolour"] = editability(groups[-1], recolour, concept)
    out["examples"]["recolour"] = groups[-1][:2]
    every = [*out["edits"].values(), out["recolour"]]  # editability includes the recolour
    out["edit"] = sum(e["edit"] for e in every) / len(every)
    out["preserved"] = sum(e["preserved"] for e in every) / len(every)
    return out


def run_benchmark(cfg: QualityConfig, host=None) -> dict:
    """Every condition on every seed; returns the per-condition summary (means and spreads)."""
    from .model import load_host

    host = host or load_host(cfg.model)
    cfg.out.mkdir(parents=True, exist_ok=True)
    concept = cfg.concept
    per_seed: dict[str, list[dict]] = {}
    steps_run: dict[str, list[str]] = {}  # "run/best" per seed
    start_words: dict[str, list[str]] = {}  # the init word of each seed's inversion
    grid_rows = []
    for seed in cfg.seeds:
        scenes = world.concept_images(concept, cfg.images, seed=seed)
        images = [world.render(s) for s in scenes]
        if seed == cfg.seeds[0]:
            grid_rows.append(("training images", images))
            for i, image in enumerate(images):
                image.save(cfg.out / f"train-{i}.png")
        for condition in conditions_for(host, images, concept, seed, cfg):
            start = time.time()
            result = measure(host, condition, concept, seed, cfg)
            log.info("%s seed %d: recon %.3f edit %.3f (%.0f s)", condition.label, seed, result["recon"]["graded"],
                     result["edit"], time.time() - start)
            per_seed.setdefault(condition.label, []).append(result)
            if condition.label.startswith("init word"):
                start_words.setdefault(condition.label, []).append(condition.phrase)
            if condition.steps_run is not None:
                steps_run.setdefault(condition.label, []).append(f"{condition.steps_run}/{condition.best_step}")
            if seed == cfg.seeds[0]:
                examples = [im for ims in result["examples"].values() for im in ims]
                grid_rows.append((condition.label, examples))
    summary = summarise(per_seed, steps_run)
    for label, words in start_words.items():
        summary[label]["start_words"] = words
    image_grid(grid_rows).save(cfg.out / "grid.png")
    concept_text = ",".join(f"{k}={v}" for k, v in concept.items())
    points = [(label, row["recon"][0], row["edit"][0]) for label, row in summary.items()]
    scatter(points, title=f"{concept_text} ({len(cfg.seeds)} seeds x {cfg.samples} samples)").save(
        cfg.out / "scatter.png")
    (cfg.out / "results.json").write_text(json.dumps({"concept": concept, "seeds": list(cfg.seeds),
                                                      "samples": cfg.samples, "summary": summary}, indent=2))
    return summary


def summarise(per_seed: dict[str, list[dict]], steps_run: dict[str, list[str]]) -> dict:
    summary = {}
    for label, results in per_seed.items():
        summary[label] = {
            "recon": mean_and_spread([r["recon"]["graded"] for r in results]),
            "recon_strict": mean_and_spread([r["recon"]["strict"] for r in results]),
            "edit": mean_and_spread([r["edit"] for r in results]),
            "preserved": mean_and_spread([r["preserved"] for r in results]),
            "recolour": mean_and_spread([r["recolour"]["edit"] for r in results]),
            "steps_run": steps_run.get(label, []),
        }
    return summary


def format_table(summary: dict, reference: str = "human caption") -> str:
    """Plain-text table: mean ± spread over seeds, and the ratio of recon/edit to the caption's."""
    ref = summary.get(reference)
    head = (f"{'condition':<22} {'recon':>13} {'strict':>13} {'edit':>13} {'edit+keep':>13} {'recolour':>13} "
            f"{'recon/cap':>9} {'edit/cap':>9}  steps run/best")
    lines = [head, "-" * len(head)]
    for label, row in summary.items():
        cells = [f"{row[k][0]:.3f}±{row[k][1]:.3f}".rjust(13)
                 for k in ("recon", "recon_strict", "edit", "preserved", "recolour")]
        ratio_r = f"{row['recon'][0] / ref['recon'][0]:.2f}" if ref and ref["recon"][0] else "-"
        ratio_e = f"{row['edit'][0] / ref['edit'][0]:.2f}" if ref and ref["edit"][0] else "-"
        steps = ",".join(str(s) for s in row["steps_run"]) or "-"
        lines.append(f"{label:<22} {' '.join(cells)} {ratio_r:>9} {ratio_e:>9}  {steps}")
    return "\n".join(lines)


def verdict(summary: dict, reference: str = "human caption", learned: str = "learned k=1") -> str:
    """The issue's test in one line: the learned word against the caption (ratios) and the init word (gap)."""
    if learned not in summary or reference not in summary:
        return ""
    row, ref = summary[learned], summary[reference]
    init = next((v for k, v in summary.items() if k.startswith("init word")), None)
    parts = [f"{learned}: reconstruction {row['recon'][0] / max(ref['recon'][0], 1e-9):.2f}x and editability "
             f"{row['edit'][0] / max(ref['edit'][0], 1e-9):.2f}x the human caption's"]
    if init is not None:
        parts.append(f"reconstruction {row['recon'][0] - init['recon'][0]:+.3f} over the init word")
    return "; ".join(parts)


# -- command line ------------------------------------------------------------------------------
def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--concept", required=True, help="shape=...,colour=...,pattern=... e.g. shape=circle,colour=red,pattern=striped "
      f"(shapes: {', '.join(world.SHAPES)}; colours: {', '.join(world.COLOURS)}; patterns: "
      f"{', '.join(world.PATTERNS)})")
    a("--model", default=None, help="toy-world diffusers folder (default: the committed textinv_core/toyworld/weights)")
    a("--out", default="textinv-bench-quality", help="folder for grid.png, scatter.png and results.json")
    a("--samples", type=int, default=64, help="samples of 'a photo of a S*' per condition and seed")
    a("--edit-samples", type=int, default=16, help="samples per edit prompt, condition and seed")
    a("--seeds", default="0", help="comma-separated seeds (training images, inversion, sampling); "
      "the spread across them is reported")
    a("--vectors", default=str(default("num_vectors")), help="comma-separated vector counts k to learn "
      f"(default: the engine's, {default('num_vectors')}; e.g. 1,2,4 to compare)")
    tuned = "a tuned setting (default: the engine's, what a user gets); printed as tuned"
    a("--init-word", default=None, help=f"the word the vectors start from; {tuned}")
    a("--steps", type=int, default=None, help=f"inversion step budget; {tuned}")
    a("--lr", type=float, default=None, help=f"learning rate per step; {tuned}")
    a("--batch", type=int, default=None, help=f"batch size; {tuned}")
    a("--early-stop", type=int, default=None, help=f"early-stopping window in evaluations (0 = off); {tuned}")
    a("--max-norm", type=float, default=None, help=f"norm cap as a multiple of the start word's norm; {tuned}")
    a("--restarts", type=int, default=1, help="inversions per word with other seeds; the one with the lowest "
      "evaluation loss is kept (more than 1 is a tuned setting)")
    a("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale for every sample")


FLAG_SETTINGS = {"init_word": "init_word", "steps": "steps", "lr": "learning_rate", "batch": "batch_size",
                 "early_stop": "early_stop_patience", "max_norm": "max_norm_ratio"}


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    settings = {field_name: getattr(args, flag) for flag, field_name in FLAG_SETTINGS.items()
                if getattr(args, flag) is not None}
    return QualityConfig(
        concept=world.parse_concept(args.concept), model=Path(args.model) if args.model else None,
        out=Path(args.out), samples=args.samples, edit_samples=args.edit_samples,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
        vectors=tuple(int(k) for k in args.vectors.split(",") if k.strip()), settings=settings,
        guidance=args.guidance, restarts=args.restarts,
    )


def run_quality(args: argparse.Namespace) -> int:
    """Entry point for `textinv bench quality`: run, print the table, say where the figures are."""
    cfg = config_from_args(args)
    if cfg.samples < 1 or cfg.edit_samples < 1 or not cfg.seeds or not cfg.vectors or min(cfg.vectors) < 1:
        raise UserError("--samples, --edit-samples, --seeds and --vectors must each give at least one value "
                         "(vector counts of 1 or more).")
    if cfg.restarts < 1:
        raise UserError(f"--restarts must be at least 1 (got {cfg.restarts}).")
    start = time.time()
    summary = run_benchmark(cfg)
    print(f"concept {args.concept}: {len(cfg.seeds)} seed(s) x {cfg.samples} reconstruction and "
          f"{cfg.edit_samples} x {len(edits_for(cfg.concept)) + 1} edit samples (the recolour included) per "
          f"condition, {time.time() - start:.0f} s")
    print(f"inversion settings: {cfg.tuned()}")
    for label, row in summary.items():
        if row.get("start_words"):
            print(f"{label}: per seed {', '.join(repr(w) for w in row['start_words'])}")
    print(format_table(summary))
    judged = default("num_vectors") if default("num_vectors") in cfg.vectors else cfg.vectors[0]
    print(verdict(summary, learned=f"learned k={judged}"))  # the default word's, or the first k asked for
    print(f"wrote {cfg.out / 'grid.png'}, {cfg.out / 'scatter.png'}, {cfg.out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m textinv_core.toyworld.bench", description=__doc__.splitlines()[0])
    add_quality_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return run_quality(args)


if __name__ == "__main__":
    raise SystemExit(main())
