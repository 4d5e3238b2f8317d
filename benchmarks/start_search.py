"""The start search alone, on the toy world: which word it finds, what it costs, how good it already is.

For each concept and seed it builds the trainer exactly as `textinv bench speed` does for the defaults
(5 rendered images, the engine's defaults, the empty init word), which runs the search; then it samples
16 images of 'a photo of a S*' from the start vectors and scores them against the human caption's
samples, as the speed benchmark's first checkpoint would. A start at 0.9 of the caption is a word
before any training step. Prints one row per (concept, seed) and a summary.

To compare two versions of the engine, run the same command with another checkout first on the path
(the script imports whichever `textinv_core` Python finds):

    python benchmarks/start_search.py --seeds 0,1,2,3
    PYTHONPATH=/path/to/other/checkout python benchmarks/start_search.py --seeds 0,1,2,3

Minutes on one CPU thread (about 15 s per search on the toy model). Never imported by the pack.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from textinv_core.toyworld import scene as world
from textinv_core.toyworld.bench import RECON_TEMPLATE, QualityConfig, inversion_config
from textinv_core.toyworld.metrics import reconstruction
from textinv_core.toyworld.model import load_host
from textinv_core.toyworld.sampling import sample
from textinv_core.toyworld.speed import seed_images_and_caption
from textinv_core.trainer import Trainer

# the six held-out concepts and two the model was trained on (two striped, one of them weak at the defaults)
CONCEPTS = ("shape=circle,colour=yellow,pattern=striped;shape=circle,colour=red,pattern=striped;"
            "shape=triangle,colour=green,pattern=striped;shape=cross,colour=yellow,pattern=plain;"
            "shape=triangle,colour=blue,pattern=plain;shape=square,colour=blue,pattern=plain;"
            "shape=square,colour=green,pattern=striped;shape=cross,colour=red,pattern=striped")


def start_row(host, concept: dict, seed: int, samples: int) -> dict:
    images, caption = seed_images_and_caption(host, concept, seed, samples)
    config = inversion_config(QualityConfig(concept=concept, settings={}), len(images), "toy-speed", seed=seed)
    trainer = Trainer(host, images, config)  # runs the search (empty init word), named as `bench speed` names it
    placeholder = config.placeholder
    words = {placeholder: {k: v.detach() for k, v in trainer.init.items()}}
    start = sample(host, RECON_TEMPLATE.format(placeholder), words, count=samples, seed=seed + 1)
    phrase = f"{concept['colour']} {concept['pattern']} {concept['shape']}"
    return dict(concept=phrase, seed=seed, word=trainer.init_word, passes=trainer.start_passes,
                ratio=reconstruction(start, concept)["graded"] / max(caption, 1e-9),
                has_shape=concept["shape"] in trainer.init_word.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", default=CONCEPTS, help="';'-separated shape=...,colour=...,pattern=...")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    host = load_host(None)
    rows = []
    for text in filter(None, args.concepts.split(";")):
        for seed in map(int, args.seeds.split(",")):
            row = start_row(host, world.parse_concept(text), seed, args.samples)
            rows.append(row)
            print(f"{row['concept']:<24} seed {seed}: start {row['word']!r:<30} {row['passes']:>4} passes, "
                  f"{row['ratio']:.2f} of the caption{'' if row['has_shape'] else ', no shape word'}", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"{len(rows)} starts: reconstruction / caption's median {statistics.median(ratios):.2f}, "
          f"mean {statistics.mean(ratios):.2f}; at 0.9 or more: {sum(x >= 0.9 for x in ratios)}; "
          f"with the shape word: {sum(r['has_shape'] for r in rows)}; "
          f"passes median {statistics.median(r['passes'] for r in rows):.0f}")


if __name__ == "__main__":
    main()
