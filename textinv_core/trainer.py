"""The training loop of Textual Inversion (Gal et al., ICLR 2023, §3), host-independent.

One flat loop: draw a batch, take the objective's loss with the word's vectors spliced in
(objective.py), step AdamW on those vectors only, project them, and now and then evaluate on fixed
draws (evaluation.py), snapshot (snapshots.py) and preview. The vectors and their AdamW state are
fp32 whatever precision the host runs in; all randomness comes from one seeded torch.Generator, so
a run is deterministic on CPU and a resumed run retraces it exactly.
Must never touch a model weight or write the final embedding file (callers do, atomically).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import LR_DROP, PREVIEW_GUIDANCE, PREVIEW_STEPS, TrainConfig, TrainingError
from .data import as_pil_list, images_fingerprint, masks_to_tensor, pixels_from_images
from .evaluation import BestSoFar, draws_for_run, evaluate, stopped_improving
from .host import Host, WordVectors
from .memory import MemoryPlan, plan_memory
from .objective import (
    backward_in_parts,
    draw_batch,
    encode_latents,
    init_pull,
    project,
    timestep_bounds,
)
from .observer import TrainingObserver
from .recompute import recomputed
from .snapshots import STOPPED_BY_NAN, Rollback, load_state, write_snapshot
from .start import GRADIENT_DRAWS, NOISIER_SHARE, SCREEN_DRAWS, find_start, spread_init, swap_candidates, word_start
from .templates import image_placeholder, preview_prompt, training_prompt

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingError", "TrainingObserver", "spread_init", "train"]
log = logging.getLogger(__name__)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5+


@dataclass
class TrainResult:
    vectors: dict[str, torch.Tensor]   # the best vectors by evaluation loss (fp32, CPU)
    final_vectors: dict[str, torch.Tensor]
    init_eval_loss: float
    final_eval_loss: float             # at the last step run: "did it learn?" in one number
    best_eval_loss: float
    best_step: int
    steps_run: int
    stopped_reason: str                # "completed" | "early_stop" | "cancelled"
    init_word: str = ""                # the word the vectors started from (found by the engine when none was given)
    start_passes: int = 0              # image-passes spent finding that word (0 when it was given)
    memory: str = ""                   # the memory mode used and why
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    snapshot_path: Path | None = None
    lr_drops: list[int] = field(default_factory=list)  # steps at which the learning rate dropped
    swaps: list[tuple[int, str]] = field(default_factory=list)  # (step, which vector took which word): at
    #                                                  the start (step 0) and at plateaus
    swap_passes: int = 0                               # image-passes spent looking for those swaps


class Trainer:
    """One training run; `run()` trains and returns a TrainResult. State is resumable."""

    def __init__(self, host: Host, images, config: TrainConfig, masks=None, observer: TrainingObserver | None = None,
                 snapshot_dir: str | Path | None = None):
        self.host, self.config = host, config
        self.observer = observer or TrainingObserver()
        pil = as_pil_list(images)
        config.validate(len(pil))
        multiple = getattr(host, "pixel_multiple", 8)
        if config.resolution < multiple or config.resolution % multiple:
            raise TrainingError(
                f"resolution {config.resolution} does not fit this model: use a multiple of {multiple} "
                f"(e.g. {max(multiple, round(config.resolution / multiple) * multiple)})."
            )
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        pixels = pixels_from_images(pil, config.resolution)
        self.fingerprint = images_fingerprint(pixels)
        self.latents = encode_latents(host, pixels)  # [2 (flip), N, C, h, w]
        self.count = len(pil)
        self.weights = None
        if masks is not None:
            small = torch.nn.functional.interpolate(masks_to_tensor(masks, self.count, config.resolution),
                                                    size=self.latents.shape[-2:], mode="area")
            self.weights = torch.stack([small, small.flip(-1)]).to(host.device)
        self.timesteps = timestep_bounds(host.num_timesteps, config.timestep_range)
        self.eval_set = draws_for_run(config, self.count, self.latents.shape[2:], host.num_timesteps)
        self.memory = self._plan_memory()
        self.recompute_blocks = host.recompute_blocks() if self.memory.mode == "low" else []
        log.info("textinv: %s", self.memory.summary())
        self.init_word, self.start_passes, init = self._start()
        self.init = {k: v.to(host.device) for k, v in init.items()}
        self.vectors = {k: torch.nn.Parameter(v.clone()) for k, v in self.init.items()}
        self.image_vectors: dict[str, torch.nn.Parameter] = {}
        if config.per_image_tokens:
            self.image_vectors = {k: torch.nn.Parameter(v.mean(0, keepdim=True).repeat(self.count, 1))
                                  for k, v in self.init.items()}
        params = list(self.vectors.values()) + list(self.image_vectors.values())
        self.optimizer = torch.optim.AdamW(params, lr=config.effective_lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.train_losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.lr_drops: list[int] = []  # steps at which the learning rate dropped (config.lr_drops)
        self.swaps: list[tuple[int, str]] = []  # (step, which vector took which word): _swap_at_plateau
        self.swap_passes = 0           # image-passes spent looking for swaps and trying them
        self.swaps_tried = 0
        self.best = BestSoFar(vectors={k: v.clone() for k, v in self.init.items()})
        self.last_snapshot: Path | None = None
        self.max_norm = {k: config.max_norm_ratio * float(v.norm(dim=1).mean()) for k, v in self.init.items()} \
            if config.max_norm_ratio else {}

    def _probe_draws(self, count: int, timesteps: tuple[int, int] | None = None):
        """Training-like draws from a generator of their own: planning never moves training's RNG."""
        return draw_batch(torch.Generator().manual_seed(0), count, self.count, self.latents.shape[2:],
                          timesteps or self.timesteps, lambda i, t: training_prompt(self.config, i, t),
                          flip=self.config.flip)

    def _plan_memory(self) -> MemoryPlan:
        """fast or low; for auto, probed on a batch of the run's size with placeholder vectors of its shape."""
        cfg = self.config
        shape_only = {cfg.placeholder: {k: torch.zeros(cfg.num_vectors, w, device=self.host.device,
                                                    requires_grad=True) for k, w in self.host.encoders.items()}}
        latent_multiple = max(1, self.host.pixel_multiple * self.latents.shape[-1] // cfg.resolution)
        return plan_memory(cfg.memory, self.host, self.latents, self._probe_draws(cfg.batch_size), shape_only,
                           latent_multiple)

    def _start(self) -> tuple[str, int, WordVectors]:
        """(word, image-passes spent, k start vectors): the given init word, or the one the engine finds."""
        cfg = self.config
        if cfg.init_word.strip():
            return cfg.init_word, 0, word_start(self.host, cfg.init_word, cfg.num_vectors)
        gradient, screen = self._search_draws()
        with recomputed(self.recompute_blocks):
            found = find_start(self.host, self.latents, gradient, screen, cfg.placeholder, self.weights,
                               chunk=self.memory.micro_batch or cfg.batch_size)
        log.info("textinv: starting from %r, found in %d image-passes", found.word, found.passes)
        return found.word, found.passes, {k: spread_init(v, cfg.num_vectors) for k, v in found.vectors.items()}

    def _search_draws(self):
        """(gradient draws, screen draws) of the start search and of a swap, from the noisier half of the
        run's range of t (start.py says why); fixed, so every word is judged on the same draws."""
        cfg = self.config
        low, high = cfg.timestep_range
        noisier = replace(cfg, timestep_range=(low + (high - low) * NOISIER_SHARE, high))
        steps = self.host.num_timesteps
        screen = draws_for_run(noisier, self.count, self.latents.shape[2:], steps, SCREEN_DRAWS)
        return self._probe_draws(GRADIENT_DRAWS, timestep_bounds(steps, noisier.timestep_range)), screen

    # -- prompts -------------------------------------------------------------------------------
    def active_count(self, step: int) -> int:
        return self.config.num_vectors - sum(1 for s in self.config.progressive_steps if step < s)

    def words(self, step: int, image_tokens: bool = True) -> dict[str, WordVectors]:
        """The placeholder's active vectors (and the per-image tokens') at `step`."""
        k = self.active_count(step)
        words = {self.config.placeholder: {key: v[:k] for key, v in self.vectors.items()}}
        for i in range(self.count if self.image_vectors and image_tokens else 0):
            words[self.image_placeholder(i)] = {key: v[i:i + 1] for key, v in self.image_vectors.items()}
        return words

    def image_placeholder(self, index: int) -> str:
        return image_placeholder(self.config.name, index)

    def prompt_for(self, image_index: int, template_index: int) -> str:
        return training_prompt(self.config, image_index, template_index, image_tokens=self.config.per_image_tokens)

    # -- one step and one evaluation -----------------------------------------------------------
    def train_step(self) -> float:
        """Draw a batch, take the loss with v* spliced in, step the optimiser, project; advance the step."""
        cfg = self.config
        draws = draw_batch(self.generator, cfg.batch_size, self.count, self.latents.shape[2:], self.timesteps,
                           self.prompt_for, flip=cfg.flip)
        self.optimizer.zero_grad(set_to_none=True)
        with recomputed(self.recompute_blocks):  # the batch in one part, or in parts that fit (memory.py)
            value = backward_in_parts(self.host, self.latents, draws, self.words(self.step), self.weights,
                                      self.memory.micro_batch or len(draws))
        if cfg.init_pull:
            pull = cfg.init_pull * init_pull(self.vectors, self.init)
            pull.backward()
            value += float(pull.detach())
        if not math.isfinite(value):
            return value  # no update: the caller rolls back and says what to do
        self.optimizer.step()
        project(self.vectors, self.init, self.active_count(self.step), self.max_norm)
        self.step += 1
        self.train_losses.append(value)
        return value

    def evaluate(self) -> float:
        """The objective on the fixed draws for the vectors as they stand (per-image tokens left out)."""
        batch = max(self.config.batch_size, 4)
        return evaluate(self.host, self.latents, self.eval_set, self.words(self.step, image_tokens=False),
                        self.weights, batch)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        if not self.eval_losses:
            self._record_eval()
            self._swap_at_start()
        reason = "completed"
        rollback = Rollback()
        while self.step < cfg.steps:
            if self.observer.should_stop():
                reason = "cancelled"
                self.snapshot()
                break
            rollback.keep(self)
            try:
                loss = self.train_step()
            except KeyboardInterrupt:  # Ctrl-C mid-step: back to the state before it, saved, then stop
                rollback.restore(self)
                self.snapshot()
                raise
            except (OUT_OF_MEMORY, RuntimeError) as error:
                _advise_on_memory(error, self.memory)
                raise
            if not math.isfinite(loss):
                self._stop_on_nan(loss, rollback)
            self.observer.on_step(self.step, cfg.steps, loss)
            stop_early = False
            if evaluates_at(self.step, cfg.eval_every) or self.step == cfg.steps:
                stop_early = self._record_eval()
            if cfg.snapshot_every and self.step % cfg.snapshot_every == 0:
                self.snapshot()
            if cfg.preview_every and self.step % cfg.preview_every == 0:
                self.preview()
            if stop_early:
                reason = "early_stop"
                break
        return TrainResult(
            vectors={k: v.cpu() for k, v in self.best.vectors.items()},
            final_vectors={k: v.detach().cpu().clone() for k, v in self.vectors.items()},
            init_eval_loss=self.eval_losses[0][1], final_eval_loss=self.eval_losses[-1][1],
            best_eval_loss=self.best.loss, best_step=self.best.step, steps_run=self.step, stopped_reason=reason,
            init_word=self.init_word, start_passes=self.start_passes, memory=self.memory.summary(),
            train_losses=list(self.train_losses),
            eval_losses=list(self.eval_losses),
            snapshot_path=self.last_snapshot, lr_drops=list(self.lr_drops), swaps=list(self.swaps),
            swap_passes=self.swap_passes,
        )

    def _stop_on_nan(self, loss: float, rollback: Rollback) -> None:
        """The vectors that gave a non-finite loss came from the update before: go back one more step, to
        the last vectors that gave a finite loss, save them, and say how to go on."""
        failed_at = self.step + 1
        rollback.restore(self, updates=2)  # before the update that produced the failing vectors
        saved = self.snapshot(stopped=STOPPED_BY_NAN)
        where = (f"the last good state (step {self.step}) is saved in {saved.parent}: resume from it with a "
                 f"learning rate below {self.config.learning_rate:g}, the one change a resume after a NaN allows"
                 if saved else "no snapshot folder was given, so nothing was saved")
        raise TrainingError(f"The loss became {loss} at step {failed_at}; training stopped and {where}. "
                            "Training in fp32 also avoids overflow.")

    def _record_eval(self) -> bool:
        """Evaluate and keep the best vectors. When the loss has stopped improving: drop the learning rate
        (up to config.lr_drops times), else say that early stopping has triggered. Before either, the best
        word is checked for a better word in one slot; a swap that lowers the loss trains on at the same rate."""
        value = self.evaluate()
        self.eval_losses.append((self.step, value))
        self.observer.on_eval(self.step, value)
        self.best.update(self.step, value, self.vectors)
        # a drop or a swap starts a new stretch to judge
        since = max([-1, *self.lr_drops, *(step for step, _ in self.swaps)])
        regular = [loss for step, loss in self.eval_losses if step > since and not 0 < step < self.config.eval_every]
        if not stopped_improving(regular, self.config.early_stop_patience):
            return False
        if self.swaps_tried < self.config.word_swaps and self._swap_at_plateau():
            return False
        if len(self.lr_drops) >= self.config.lr_drops:
            return True
        self._drop_learning_rate()
        return False

    def _swap_at_start(self) -> bool:
        """A start the engine found is one vector copied to every slot (start.py), so the copies carry nothing
        of their own: before the first step, the start with one slot swapped for a word the gradient proposes
        is tried as at a plateau (`_try_swap`), and kept if its trial beats the start. On the red striped circle
        (starts found: 'red square striped', 'red big striped', 'red striped') this took the passes to 90% of
        the caption from 453, 363, 453 to 233 on each seed (docs/toyworld/README.md). Not with a given init
        word (the user chose the start), one vector (the search chose among single words), word_swaps 0, or
        in a run shorter than one evaluation interval (the two trials would be half of it or more)."""
        cfg = self.config
        if cfg.init_word.strip() or cfg.num_vectors < 2 or not cfg.word_swaps or cfg.steps < cfg.eval_every \
                or not self._can_swap():
            return False
        return self._try_swap("the start found")

    def _swap_at_plateau(self) -> bool:
        """One of the config.word_swaps tries at a plateau (`_try_swap`)."""
        if not self._can_swap():
            return False
        self.swaps_tried += 1
        return self._try_swap(f"the evaluation loss stopped improving at step {self.step}; the best word "
                              f"(step {self.best.step})")

    def _can_swap(self) -> bool:
        """Not while progressive steps keep some of the word's vectors out of the prompt, nor with per-image
        tokens (a trial would move them too)."""
        return self.active_count(self.step) == self.config.num_vectors and not self.image_vectors

    def _try_swap(self, where: str) -> bool:
        """The best word with one vector swapped for a vocabulary row (start.swap_candidates): the finalists,
        lowest screening loss first, each train a quarter of an evaluation interval on draws of their own, and
        the first whose evaluation loss then beats the best word's is kept and trains on (its trial steps are
        training; trying the next finalist too would cost another trial for a word that may be no better).
        False if none does; the run is then as it was, also when a trial is interrupted."""
        cfg = self.config
        gradient, screen = self._search_draws()
        with recomputed(self.recompute_blocks):
            found = swap_candidates(self.host, self.latents, self.best.vectors, gradient, screen, cfg.placeholder,
                                    self.weights, chunk=self.memory.micro_batch or cfg.batch_size)
        self.swap_passes += found.passes
        before = ({k: v.detach().clone() for k, v in self.vectors.items()},
                  {p: dict(self.optimizer.state[p]) for p in self.vectors.values() if p in self.optimizer.state})
        trial_steps = max(1, cfg.eval_every // 4)
        best_loss, kept, done = self.best.loss, None, False
        try:
            for change, swapped in found.swaps:
                loss = self._trial(swapped, trial_steps)
                self.swap_passes += trial_steps * cfg.batch_size + math.ceil(len(self.eval_set) / 3)
                if loss < best_loss:
                    best_loss, kept = loss, (change, {k: v.detach().clone() for k, v in self.vectors.items()})
                    break
            done = True
        finally:
            vectors, moments = (kept[1], {}) if done and kept else before
            with torch.no_grad():
                for key, v in self.vectors.items():
                    v.copy_(vectors[key])
            for param in self.vectors.values():
                self.optimizer.state.pop(param, None)
                if param in moments:
                    self.optimizer.state[param] = moments[param]
        if kept is None:
            return False
        log.info("textinv: %s with %s, trained %d steps, beats it: training on from there", where, kept[0], trial_steps)
        self.swap_passes -= math.ceil(len(self.eval_set) / 3)  # its evaluation is the run's, counted as one
        self.swaps.append((self.step, kept[0]))
        self.eval_losses.append((self.step, best_loss))
        self.observer.on_eval(self.step, best_loss)
        self.best.update(self.step, best_loss, self.vectors)
        return True

    def _trial(self, vectors: WordVectors, steps: int) -> float:
        """The evaluation loss after `steps` training steps from `vectors` (fresh AdamW moments), on draws
        from a generator of its own: the run's step count, losses and random stream stay as they were."""
        generator, step, losses = self.generator, self.step, len(self.train_losses)
        self.generator = torch.Generator().manual_seed((self.config.seed * 7 + step + 1) % 2 ** 63)  # any seed
        try:
            with torch.no_grad():
                for key, v in self.vectors.items():
                    v.copy_(vectors[key].to(v))
            for param in self.vectors.values():
                self.optimizer.state.pop(param, None)
            for _ in range(steps):
                if not math.isfinite(self.train_step()):
                    return math.inf
            return self.evaluate()
        finally:
            self.generator, self.step = generator, step
            del self.train_losses[losses:]

    def learning_rate(self) -> float:
        """The learning rate now: the configured one, times LR_DROP for each drop so far."""
        return self.config.effective_lr * LR_DROP ** len(self.lr_drops)

    def _drop_learning_rate(self) -> None:
        """A plateau at this learning rate: back to the best vectors, AdamW's moments reset (they describe
        the vectors left behind), and on at a smaller rate, so the word settles where it was best."""
        self.lr_drops.append(self.step)
        with torch.no_grad():
            for key, v in self.vectors.items():
                v.copy_(self.best.vectors[key])
        for param in self.vectors.values():
            self.optimizer.state.pop(param, None)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        log.info("textinv: the evaluation loss stopped improving at step %d; back to the best word (step %d), "
                 "learning rate now %.3g", self.step, self.best.step, self.learning_rate())

    def preview(self):
        """One image of the word as it stands, sampled by the host; a failed preview never ends training."""
        cfg = self.config
        prompt = preview_prompt(cfg)
        words = {cfg.placeholder: {k: v.detach() for k, v in self.words(self.step)[cfg.placeholder].items()}}
        try:
            with torch.no_grad():
                image = self.host.sample([prompt], words, seed=cfg.seed, steps=PREVIEW_STEPS,
                                         guidance=PREVIEW_GUIDANCE, size=cfg.resolution)[0]
        except Exception as error:  # noqa: BLE001 - a preview is a view, not the work
            log.warning("textinv: the preview at step %d failed (%s: %s)", self.step, type(error).__name__, error)
            return None
        self.observer.on_preview(self.step, image)
        return image

    # -- snapshots and resume ------------------------------------------------------------------
    def snapshot(self, stopped: str = "") -> Path | None:
        """A loadable embedding of the current vectors plus the state to resume from, both atomic."""
        if self.snapshot_dir is None:
            return None
        self.last_snapshot = write_snapshot(self, self.snapshot_dir, stopped)
        self.observer.on_snapshot(self.step, self.last_snapshot)
        return self.last_snapshot

    def load_state(self, path: str | Path) -> None:
        """Continue from the resume state written by `snapshot` for the same images and settings."""
        load_state(self, path)


def evaluates_at(step: int, every: int) -> bool:
    """Every `every` steps, and before the first of those at its halving points (every/2, /4, /8): from a
    good start the word is often better within a few dozen steps, and a run hands over the best evaluated
    word, so these let an early stop, an interrupt or a short run keep it. Early stopping reads only the
    regular evaluations, which are evenly spaced."""
    return step % every == 0 or (step < every and step in {every >> k for k in (1, 2, 3)})


def _advise_on_memory(error: BaseException, plan: MemoryPlan) -> None:
    """Out of memory is not the user's mistake, so it keeps its traceback; it gains what lowers the need."""
    text = str(error)
    if not isinstance(error, OUT_OF_MEMORY) and "can't allocate memory" not in text:
        return
    advice = ("textinv: out of memory during a training step. Set memory to 'low' (node input 'memory', "
              "--memory low) to recompute activations instead of keeping them")
    advice += "; it is already low: lower the batch size or the resolution." if plan.mode == "low" else "."
    if hasattr(error, "add_note"):
        error.add_note(advice)
    log.error(advice)


def train(host: Host, images, config: TrainConfig, masks=None, observer: TrainingObserver | None = None,
          snapshot_dir: str | Path | None = None, resume_from: str | Path | None = None) -> TrainResult:
    """Train one pseudo-word on `images` (PIL list or ComfyUI IMAGE tensor) through `host`."""
    trainer = Trainer(host, images, config, masks=masks, observer=observer, snapshot_dir=snapshot_dir)
    if resume_from is not None:
        trainer.load_state(resume_from)
    return trainer.run()
