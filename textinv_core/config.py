"""The settings of one training run, with their defaults: the one place the node, the CLI, the
demo, the web-UI tab and the benchmarks read them from.

Every field keeps the paper's meaning (Gal et al. 2023, §3 and §4.1); a comment says why a default
is what it is. `validate` refuses, before any model loads, what would fail later or train nothing.
Kept free of torch so front ends can import it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .errors import UserError

PREVIEW_STEPS = 20       # sampling steps of a preview image
PREVIEW_GUIDANCE = 5.0   # classifier-free guidance of a preview image
LR_DROP = 0.3            # the learning rate's factor at each of TrainConfig.lr_drops


# How a setting is named in messages when the front end gives no label of its own.
_LABELS = {"num_vectors": "vectors", "learning_rate": "learning rate", "batch_size": "batch size",
           "progressive_steps": "progressive steps", "early_stop_patience": "early stop", "lr_drops": "lr drops",
           "word_swaps": "word swaps",
           "snapshot_every": "snapshot every", "max_norm_ratio": "max norm"}


class TrainingError(UserError):
    """Training could not start or go on (bad settings, a NaN loss); the message says what to do."""


@dataclass
class TrainConfig:
    """Hyper-parameters with the paper's meaning; defaults follow the paper scaled to one GPU."""

    name: str
    init_word: str = ""                # coarse descriptor the vectors start from ("cat", "toy", ...);
    #                                    empty: the engine searches the vocabulary for one (start.find_start)
    num_vectors: int = 2               # k, the vectors of the one word: the paper finds 1 enough for most concepts,
    #                                    but on the toy world one vector kept shape, colour and pattern together
    #                                    only on plain ones (striped circles: 0.76-0.84x the caption at k=1,
    #                                    0.94-0.98x at k=2, editability 1.00x at both; bench quality)
    steps: int = 3000                  # at most: early stopping usually ends the run well before
    learning_rate: float = 2e-2        # per step: the paper's effective LR (base 0.005 x batch 4)
    scale_lr: bool = False             # True: LR = learning_rate x batch, the paper's rule for its base LR
    batch_size: int = 1                # one image per step at the paper's per-step LR: the word moves about as far
    #                                    per step as with 4 images, for a quarter of the passes and of the activation
    #                                    memory (bench speed: passes to a good word fewer or equal on plain concepts,
    #                                    more on a striped circle whose start lacks its shape)
    resolution: int = 512              # pixels; must be a multiple of the host's latent factor
    templates: str = "object"          # "object" | "style" | "captions"
    captions: list[str] | None = None  # one per image with "{}" for the word, when templates="captions"
    seed: int = 0
    flip: bool = True                  # random horizontal flip (paper)
    weight_decay: float = 0.0          # AdamW decay on the new vectors only
    init_pull: float = 0.0             # LDM code's L2 pull toward the init embedding (0 = off)
    max_norm_ratio: float = 1.5        # cap ||v|| at this x the start word's norm (0 = off): a word far longer
    #                                    than real ones drowns the rest of the prompt
    progressive_steps: tuple[int, ...] = ()  # steps at which one more vector joins (paper: 2000, 4000)
    per_image_tokens: bool = False     # "a photo of S* with S_i": one extra, unsaved token per image
    timestep_range: tuple[float, float] = (0.25, 1.0)  # share of the noise schedule drawn (0: no noise). High
    #                                    noise is where the prompt decides what appears; in the least noisy quarter
    #                                    the image is all but given, the word barely changes the prediction, and its
    #                                    draws add noise to the word's gradient, not signal. Left out, the start
    #                                    search (which draws from the noisier half of this range) finds the colour
    #                                    and pattern more often and the held-out striped concepts train faster
    #                                    (docs/toyworld/README.md, "The least noisy quarter left out")
    eval_every: int = 100              # steps between evaluations on the fixed draws: 100 images at batch 1, so
    #                                    early stopping sees as many images per evaluation as at the paper's batch 4
    #                                    (and at its halves before the first: trainer.evaluates_at)
    eval_draws: int = 16               # fixed (image, noise, t) draws of the evaluation set
    early_stop_patience: int = 6       # stop once the last this-many evaluations show no trend beyond their
    #                                    scatter (evaluation.stopped_improving); 0 = off, at least 3 to act
    lr_drops: int = 2                  # before stopping early, this many times: back to the best vectors and
    #                                    on at LR_DROP x the learning rate (a constant LR wanders around the basin
    #                                    it found; a smaller one settles in it)
    word_swaps: int = 2                # at the first this-many plateaus, before a drop or a stop: try the best word
    #                                    with one vector swapped for a vocabulary word the gradient proposes, kept if
    #                                    a short training from it beats the best (Trainer._swap_at_plateau; 0 = off).
    #                                    From a start without the concept's shape, gradient steps can settle where
    #                                    the word has none (blue plain square, 3 seeds: about 0.83x of the caption's
    #                                    reconstruction without swaps, 0.99x with; docs/toyworld/README.md).
    #                                    A start the engine finds is tried so before the first step too
    #                                    (Trainer._swap_at_start, not counted here; 0 turns it off as well)
    snapshot_every: int = 100          # steps between snapshots (an interrupt, a NaN and the end always keep one)
    preview_every: int = 250           # steps between preview images (0 = off); each is one 20-step sampling,
    #                                    about 13 steps' worth of passes at batch 1
    preview_prompt: str = ""           # "{}" marks the word; default: the evaluation template
    memory: str = "auto"               # "fast": keep every activation for the backward pass; "low": recompute
    #                                    them block by block (about a third more time per step, a fraction of
    #                                    the memory); "auto": low only when a fast step would not fit the free memory

    def validate(self, image_count: int, labels: Mapping[str, str] | None = None) -> None:
        """Refuse settings that would fail later or train nothing. `labels` names a field the way the
        front end shows it (CLI: {"num_vectors": "--vectors"}; node: its input name)."""
        from .embedding_file import validate_name

        def say(field_name: str) -> str:
            return (labels or {}).get(field_name) or _LABELS.get(field_name, field_name.replace("_", " "))

        validate_name(self.name)
        for item in fields(self):
            value = getattr(self, item.name)
            if item.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                   or (item.type == "int" and not isinstance(value, int))):
                kind = "a whole number" if item.type == "int" else "a number"
                raise TrainingError(f"{say(item.name)} must be {kind} (got {value!r}).")
        if self.steps <= 0:
            raise TrainingError(f"{say('steps')} must be at least 1 (got {self.steps}).")
        if self.num_vectors < 1 or self.num_vectors > 75:
            raise TrainingError(f"{say('num_vectors')} must be between 1 and 75 (got {self.num_vectors}).")
        if not 0 < self.learning_rate <= 100:  # far above any use (paper: 0.005); AdamW overflows near 1e37
            raise TrainingError(f"{say('learning_rate')} must be a positive number up to 100, such as 0.02 "
                                f"(got {self.learning_rate}).")
        if self.batch_size < 1:
            raise TrainingError(f"{say('batch_size')} must be at least 1 (got {self.batch_size}).")
        if not 8 <= self.resolution <= 8192:
            raise TrainingError(f"{say('resolution')} must be from 8 to 8192 pixels, a multiple of 8 such as 512 "
                                f"(got {self.resolution}).")
        if not -(2 ** 63) <= self.seed < 2 ** 63:
            raise TrainingError(f"{say('seed')} must be below 2**63 in size (got {self.seed}).")
        for name, least in (("eval_every", 1), ("eval_draws", 1), ("snapshot_every", 0), ("preview_every", 0),
                            ("early_stop_patience", 0), ("lr_drops", 0), ("word_swaps", 0)):
            if getattr(self, name) < least:
                zero = " (0 turns it off)" if least == 0 else ""
                raise TrainingError(f"{say(name)} must be at least {least}{zero} (got {getattr(self, name)}).")
        for name in ("weight_decay", "init_pull", "max_norm_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise TrainingError(f"{say(name)} must be a number of at least 0, where 0 turns it off (got {value}).")
        if self.templates not in ("object", "style", "captions"):
            raise TrainingError(f"{say('templates')} must be object, style or captions (got {self.templates!r}).")
        if self.templates == "captions" and (not self.captions or len(self.captions) != image_count):
            got = len(self.captions or [])
            raise TrainingError(
                f"templates=captions needs one caption per image: {image_count} images, {got} captions."
            )
        if self.captions is not None and not all(isinstance(c, str) for c in self.captions):
            raise TrainingError("captions must be text, one per image.")
        steps = self.progressive_steps
        whole = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps)
        if not whole or list(steps) != sorted(set(steps)):
            raise TrainingError(f"{say('progressive_steps')} must be increasing step numbers such as 2000,4000 "
                                f"(got {', '.join(map(str, steps))}).")
        if len(self.progressive_steps) >= self.num_vectors:
            raise TrainingError(f"{say('progressive_steps')} add one vector each: {say('num_vectors')} must exceed "
                                f"their count ({len(steps)}).")
        low, high = self.timestep_range
        if not 0.0 <= low < high <= 1.0:
            raise TrainingError(f"timestep range must satisfy 0 <= low < high <= 1 (got {low}, {high}).")
        if self.memory not in ("auto", "fast", "low"):
            raise TrainingError(f"{say('memory')} must be auto, fast or low (got {self.memory!r}).")
        if self.per_image_tokens and self.templates == "captions":
            raise TrainingError("per-image tokens work with the object or style templates, not captions.")

    @property
    def placeholder(self) -> str:
        return f"<{self.name}>"

    @property
    def effective_lr(self) -> float:
        return self.learning_rate * (self.batch_size if self.scale_lr else 1)


def default(field_name: str):
    """The default of one TrainConfig field, for front ends that show it (node widgets, CLI flags)."""
    for item in fields(TrainConfig):
        if item.name == field_name:
            return item.default
    raise KeyError(field_name)
