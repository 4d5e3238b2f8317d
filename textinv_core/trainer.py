"""Textual Inversion training loop (Gal et al., ICLR 2023, §3), host-independent.

Minimises E_{z, y, eps, t} || target - pred(z_t, t, c(y with S*)) ||^2 over the k vectors of S*
only. UNet, VAE and text encoder stay frozen and are never written: the vectors are spliced in by
the host, so no gradient or optimiser state exists for the rest of the vocabulary. The vectors and
their AdamW state are fp32 whatever precision the host runs in. All randomness comes from one
seeded torch.Generator, so a run is deterministic on CPU and a resumed run retraces it exactly.
Must never touch a model weight or write the final embedding file (callers do, atomically).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import as_pil_list, images_fingerprint, masks_to_tensor, pixels_from_images
from .embedding_file import save_embedding, validate_name
from .host import Host, WordVectors
from .observer import TrainingObserver
from .templates import EVAL_TEMPLATE, IMAGE_TOKEN_SETS, TEMPLATE_SETS, fill_caption

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training could not go on (bad settings, or a NaN loss); the message says what to do."""


@dataclass
class TrainConfig:
    """Hyper-parameters with the paper's meaning; defaults follow the paper scaled to one GPU."""

    name: str
    init_word: str = "object"          # coarse descriptor the vectors start from ("cat", "toy", ...)
    num_vectors: int = 1               # k; the paper finds 1 enough for most concepts
    steps: int = 500
    learning_rate: float = 5e-3        # paper's base LR; multiplied by batch size when scale_lr
    scale_lr: bool = True              # paper: LR = base x GPUs x batch
    batch_size: int = 1
    resolution: int = 512              # pixels; must be a multiple of the host's latent factor
    templates: str = "object"          # "object" | "style" | "captions"
    captions: list[str] | None = None  # one per image with "{}" for the word, when templates="captions"
    seed: int = 0
    flip: bool = True                  # random horizontal flip (paper)
    weight_decay: float = 0.0          # AdamW decay on the new vectors only
    init_pull: float = 0.0             # LDM code's L2 pull toward the init embedding (0 = off)
    max_norm_ratio: float = 0.0        # cap ||v|| at this x the mean real-token norm (0 = off)
    progressive_steps: tuple[int, ...] = ()  # steps at which one more vector joins (paper: 2000, 4000)
    per_image_tokens: bool = False     # "a photo of S* with S_i": one extra, unsaved token per image
    timestep_range: tuple[float, float] = (0.0, 1.0)  # share of the noise schedule drawn; high noise is where
    #                                    the prompt decides what appears, low noise mostly fits pixel noise
    eval_every: int = 50               # steps between evaluations on the fixed draws
    eval_draws: int = 16               # fixed (image, noise, t) draws of the evaluation set
    early_stop_patience: int = 0       # evaluations without improvement before stopping (0 = off)
    early_stop_min_delta: float = 0.01  # relative improvement that counts
    snapshot_every: int = 0            # steps between snapshots (0 = only on cancel/NaN/end)
    preview_every: int = 0             # steps between preview images, if the host can sample (0 = off)
    preview_prompt: str = ""           # "{}" marks the word; default: the evaluation template

    def validate(self, image_count: int) -> None:
        validate_name(self.name)
        if self.steps <= 0:
            raise TrainingError(f"steps must be at least 1 (got {self.steps}).")
        if self.num_vectors < 1 or self.num_vectors > 75:
            raise TrainingError(f"vectors must be between 1 and 75 (got {self.num_vectors}).")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise TrainingError(f"learning rate must be a positive number (got {self.learning_rate}).")
        if self.batch_size < 1:
            raise TrainingError(f"batch size must be at least 1 (got {self.batch_size}).")
        if self.templates not in ("object", "style", "captions"):
            raise TrainingError(f"templates must be object, style or captions (got {self.templates!r}).")
        if self.templates == "captions" and (not self.captions or len(self.captions) != image_count):
            got = len(self.captions or [])
            raise TrainingError(
                f"templates=captions needs one caption per image: {image_count} images, {got} captions."
            )
        if len(self.progressive_steps) >= self.num_vectors:
            raise TrainingError("progressive steps add one vector each: vectors must exceed their count.")
        low, high = self.timestep_range
        if not 0.0 <= low < high <= 1.0:
            raise TrainingError(f"timestep range must satisfy 0 <= low < high <= 1 (got {low}, {high}).")
        if self.per_image_tokens and self.templates == "captions":
            raise TrainingError("per-image tokens work with the object or style templates, not captions.")

    @property
    def placeholder(self) -> str:
        return f"<{self.name}>"

    @property
    def effective_lr(self) -> float:
        return self.learning_rate * (self.batch_size if self.scale_lr else 1)


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
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    snapshot_path: Path | None = None


# -- initialisation ------------------------------------------------------------------------------
def spread_init(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """k vectors from an init word of n tokens: equal -> as is; more -> averaged groups; fewer -> cycled."""
    n = tokens.shape[0]
    if n == k:
        return tokens.clone()
    if n > k:
        groups = np.array_split(np.arange(n), k)
        return torch.stack([tokens[list(g)].mean(0) for g in groups])
    return torch.stack([tokens[i % n] for i in range(k)])


def init_vectors(host: Host, init_word: str, k: int) -> WordVectors:
    tokens = host.word_vectors(init_word)
    if any(t.shape[0] == 0 for t in tokens.values()):
        raise TrainingError(f"The init word {init_word!r} tokenizes to nothing: give a real word such as 'cat'.")
    return {key: spread_init(t, k) for key, t in tokens.items()}


# -- the trainer ---------------------------------------------------------------------------------
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
        self.device = host.device
        pixels = pixels_from_images(pil, config.resolution)
        self.fingerprint = images_fingerprint(pixels)
        self.latents = self._encode(pixels)  # [2 (flip), N, C, h, w]
        self.count = len(pil)
        self.weights = None
        if masks is not None:
            weights = masks_to_tensor(masks, self.count, config.resolution)
            size = self.latents.shape[-2:]
            small = torch.nn.functional.interpolate(weights, size=size, mode="area")
            self.weights = torch.stack([small, small.flip(-1)]).to(self.device)
        self.init = init_vectors(host, config.init_word, config.num_vectors)
        self.init = {k: v.to(self.device) for k, v in self.init.items()}
        self.vectors = {k: torch.nn.Parameter(v.clone()) for k, v in self.init.items()}
        self.image_vectors: dict[str, torch.nn.Parameter] = {}
        if config.per_image_tokens:
            self.image_vectors = {k: torch.nn.Parameter(v.mean(0, keepdim=True).repeat(self.count, 1))
                                  for k, v in self.init.items()}
        params = list(self.vectors.values()) + list(self.image_vectors.values())
        self.optimizer = torch.optim.AdamW(params, lr=config.effective_lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.eval_set = self._make_eval_set()
        self.step = 0
        self.train_losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.best = (math.inf, 0, {k: v.detach().clone() for k, v in self.vectors.items()})
        self.stale_evals = 0
        self.last_snapshot: Path | None = None
        norms = host.token_table_stats()
        self.max_norm = {k: config.max_norm_ratio * norms[k] for k in self.vectors} if config.max_norm_ratio else {}

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents once per image and flip (the paper re-encodes every step)."""
        chunks = []
        for flipped in (pixels, pixels.flip(-1)):
            encoded = [self.host.encode_images(flipped[i:i + 4]) for i in range(0, flipped.shape[0], 4)]
            chunks.append(torch.cat(encoded))
        return torch.stack(chunks).to(self.device)

    # -- prompts -------------------------------------------------------------------------------
    def active_count(self, step: int) -> int:
        return self.config.num_vectors - sum(1 for s in self.config.progressive_steps if step < s)

    def words(self, step: int) -> dict[str, WordVectors]:
        k = self.active_count(step)
        words = {self.config.placeholder: {key: v[:k] for key, v in self.vectors.items()}}
        for i in range(self.count if self.image_vectors else 0):
            words[self.image_placeholder(i)] = {key: v[i:i + 1] for key, v in self.image_vectors.items()}
        return words

    def image_placeholder(self, index: int) -> str:
        return f"<{self.config.name}-image-{index}>"

    def prompt_for(self, image_index: int, template_index: int) -> str:
        cfg = self.config
        if cfg.templates == "captions":
            return fill_caption(cfg.captions[image_index], cfg.placeholder, cfg.name)
        if self.image_vectors:
            templates = IMAGE_TOKEN_SETS[cfg.templates]
            template = templates[template_index % len(templates)]
            return template.format(cfg.placeholder, self.image_placeholder(image_index))
        templates = TEMPLATE_SETS[cfg.templates]
        return templates[template_index % len(templates)].format(cfg.placeholder)

    # -- loss ----------------------------------------------------------------------------------
    def timestep_bounds(self) -> tuple[int, int]:
        """[first, last) of the training timesteps: the configured share of the host's schedule."""
        steps = self.host.num_timesteps
        low, high = self.config.timestep_range
        first = min(int(low * steps), steps - 1)
        return first, max(first + 1, min(steps, round(high * steps)))

    def _make_eval_set(self) -> dict:
        """Fixed draws: images cycled, timesteps stratified, noise from a seed apart from training."""
        gen = torch.Generator().manual_seed(self.config.seed + 7919)
        n = self.config.eval_draws
        index = torch.arange(n) % self.count
        first, last = self.timestep_bounds()
        span = last - first
        timesteps = (first + (torch.arange(n) + torch.rand(n, generator=gen)) * span / n).long().clamp(first, last - 1)
        noise = torch.randn((n, *self.latents.shape[2:]), generator=gen)
        template = EVAL_TEMPLATE.get(self.config.templates, "a photo of a {}")
        if self.config.templates == "captions":
            prompts = [fill_caption(self.config.captions[i], self.config.placeholder, self.config.name) for i in index]
        else:
            prompts = [template.format(self.config.placeholder)] * n
        return {"index": index, "timesteps": timesteps, "noise": noise, "prompts": prompts}

    def _loss(self, flips, index, noise, timesteps, prompts, words) -> torch.Tensor:
        latents = self.latents[flips, index]
        noise = noise.to(self.device)
        timesteps = timesteps.to(self.device)
        with self.host.autocast():
            cond = self.host.encode_text(prompts, words)
            pred = self.host.predict(self.host.add_noise(latents, noise, timesteps), timesteps, cond)
        target = self.host.target(latents, noise, timesteps)
        error = (pred.float() - target.float()) ** 2
        if self.weights is None:
            return error.mean()
        weights = self.weights[flips, index]
        return (error * weights).sum() / (weights.sum() * error.shape[1]).clamp_min(1e-8)

    @torch.no_grad()
    def evaluate(self) -> float:
        s, total = self.eval_set, 0.0
        n = len(s["prompts"])
        words = self.words(self.step)
        words = {self.config.placeholder: words[self.config.placeholder]}  # image tokens are not the concept
        batch = max(self.config.batch_size, 4)
        for start in range(0, n, batch):
            sl = slice(start, start + batch)
            index = s["index"][sl]
            loss = self._loss(torch.zeros_like(index), index, s["noise"][sl], s["timesteps"][sl], s["prompts"][sl],
                              words)
            total += float(loss) * index.shape[0]
        return total / n

    def _train_step(self) -> float:
        cfg, gen = self.config, self.generator
        index = torch.randint(0, self.count, (cfg.batch_size,), generator=gen)
        flips = torch.randint(0, 2, (cfg.batch_size,), generator=gen) if cfg.flip else torch.zeros_like(index)
        templates = torch.randint(0, 1 << 30, (cfg.batch_size,), generator=gen)
        first, last = self.timestep_bounds()
        timesteps = torch.randint(first, last, (cfg.batch_size,), generator=gen)
        noise = torch.randn((cfg.batch_size, *self.latents.shape[2:]), generator=gen)
        prompts = [self.prompt_for(int(i), int(t)) for i, t in zip(index, templates)]
        loss = self._loss(flips, index, noise, timesteps, prompts, self.words(self.step))
        if cfg.init_pull:
            pull = sum(((v - self.init[k]) ** 2).sum(-1).mean() for k, v in self.vectors.items())
            loss = loss + cfg.init_pull * pull
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._after_step()
        return value

    @torch.no_grad()
    def _after_step(self) -> None:
        k = self.active_count(self.step)
        for key, v in self.vectors.items():
            if k < v.shape[0]:  # vectors not yet joined stay at their init (weight decay aside)
                v[k:] = self.init[key][k:]
            if key in self.max_norm:
                norms = v.norm(dim=1, keepdim=True).clamp_min(1e-12)
                v.mul_(torch.clamp(self.max_norm[key] / norms, max=1.0))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        if not self.eval_losses:
            self._record_eval()
        reason = "completed"
        while self.step < cfg.steps:
            if self.observer.should_stop():
                reason = "cancelled"
                self.snapshot()
                break
            loss = self._train_step()
            if not math.isfinite(loss):
                saved = self.snapshot()
                where = f"the last good state is saved at {saved}" if saved else "no snapshot was kept"
                raise TrainingError(
                    f"The loss became {loss} at step {self.step + 1}; training stopped and {where}. "
                    "Lower the learning rate, or train in fp32."
                )
            self.step += 1
            self.train_losses.append(loss)
            self.observer.on_step(self.step, cfg.steps, loss)
            stop_early = False
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                stop_early = self._record_eval()
            if cfg.snapshot_every and self.step % cfg.snapshot_every == 0:
                self.snapshot()
            if cfg.preview_every and self.step % cfg.preview_every == 0:
                self.preview()
            if stop_early:
                reason = "early_stop"
                break
        best_loss, best_step, best_vectors = self.best
        return TrainResult(
            vectors={k: v.cpu() for k, v in best_vectors.items()},
            final_vectors={k: v.detach().cpu().clone() for k, v in self.vectors.items()},
            init_eval_loss=self.eval_losses[0][1],
            final_eval_loss=self.eval_losses[-1][1],
            best_eval_loss=best_loss,
            best_step=best_step,
            steps_run=self.step,
            stopped_reason=reason,
            train_losses=list(self.train_losses),
            eval_losses=list(self.eval_losses),
            snapshot_path=self.last_snapshot,
        )

    def _record_eval(self) -> bool:
        """Evaluate, keep the best vectors, and say whether early stopping has triggered."""
        value = self.evaluate()
        self.eval_losses.append((self.step, value))
        self.observer.on_eval(self.step, value)
        best_loss = self.best[0]
        self.stale_evals = 0 if value < best_loss * (1 - self.config.early_stop_min_delta) else self.stale_evals + 1
        if value < best_loss:
            self.best = (value, self.step, {k: v.detach().clone() for k, v in self.vectors.items()})
        patience = self.config.early_stop_patience
        return bool(patience) and self.stale_evals >= patience

    def preview(self):
        """Sample one image of the word as it stands, for hosts that implement `preview`."""
        sample = getattr(self.host, "preview", None)
        if sample is None:
            return None
        template = self.config.preview_prompt or EVAL_TEMPLATE.get(self.config.templates, "a photo of a {}")
        prompt = template.replace("{}", self.config.placeholder)
        words = {self.config.placeholder: {k: v.detach() for k, v in self.vectors.items()}}
        with torch.no_grad():
            image = sample(prompt, words, seed=self.config.seed, size=self.config.resolution)
        self.observer.on_preview(self.step, image)
        return image

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> Path | None:
        """A loadable embedding of the current vectors plus the state to resume from, both atomic."""
        if self.snapshot_dir is None:
            return None
        from safetensors.torch import save_file

        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        name = self.config.name
        vectors = {k: v.detach() for k, v in self.vectors.items()}
        emb_path = self.snapshot_dir / f"{name}-step{self.step:06d}.safetensors"
        save_embedding(emb_path, vectors, name, metadata={"textinv.steps": str(self.step),
                                                          "textinv.family": getattr(self.host, "family", "")},
                       overwrite=True)
        state = self.state_tensors()
        meta = {"textinv.resume": json.dumps(self.state_meta())}
        resume_path = self.resume_path(self.snapshot_dir, name)
        tmp = resume_path.with_name(f".{resume_path.name}.tmp")
        save_file(state, str(tmp), metadata=meta)
        tmp.replace(resume_path)
        self.last_snapshot = emb_path
        self.observer.on_snapshot(self.step, emb_path)
        return emb_path

    @staticmethod
    def resume_path(snapshot_dir: Path, name: str) -> Path:
        return Path(snapshot_dir) / f"{name}.resume.safetensors"

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {"rng": self.generator.get_state()}
        for key, v in self.vectors.items():
            state[f"vectors.{key}"] = v.detach().cpu().contiguous()
            state[f"best.{key}"] = self.best[2][key].cpu().contiguous()
        for key, v in self.image_vectors.items():
            state[f"image_vectors.{key}"] = v.detach().cpu().contiguous()
        for i, param in enumerate(self.optimizer.param_groups[0]["params"]):
            for slot, value in self.optimizer.state.get(param, {}).items():
                state[f"optim.{i}.{slot}"] = value.detach().cpu().contiguous().reshape(value.shape)
        return state

    def state_meta(self) -> dict:
        config = asdict(self.config)
        return {
            "step": self.step, "config": config, "fingerprint": self.fingerprint,
            "train_losses": self.train_losses, "eval_losses": self.eval_losses,
            "best_loss": self.best[0] if math.isfinite(self.best[0]) else None, "best_step": self.best[1],
            "stale_evals": self.stale_evals,
        }

    def load_state(self, path: str | Path) -> None:
        """Continue from a resume file written by `snapshot` for the same images and settings."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = self.resume_path(path, self.config.name)
        if not path.is_file():
            raise TrainingError(f"No resume state at {path}: point to the snapshot folder of an earlier run.")
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["textinv.resume"])
            state = {k: handle.get_tensor(k) for k in handle.keys()}
        saved = meta["config"]
        mine = asdict(self.config)
        defaults = asdict(TrainConfig(name=self.config.name))  # settings added since a file was written
        may_change = ("steps", "snapshot_every")
        differing = [k for k in mine if k not in may_change
                     and json.dumps(saved.get(k, defaults[k])) != json.dumps(mine[k])]
        if differing:
            raise TrainingError(f"Cannot resume: settings differ from the saved run ({', '.join(differing)}).")
        if meta["fingerprint"] != self.fingerprint:
            raise TrainingError("Cannot resume: the training images differ from the saved run's.")
        with torch.no_grad():
            for key, v in self.vectors.items():
                v.copy_(state[f"vectors.{key}"].to(v.device))
            for key, v in self.image_vectors.items():
                v.copy_(state[f"image_vectors.{key}"].to(v.device))
        params = self.optimizer.param_groups[0]["params"]
        for i, param in enumerate(params):
            slots = {k.split(".", 2)[2]: t for k, t in state.items() if k.startswith(f"optim.{i}.")}
            if slots:
                self.optimizer.state[param] = {s: t.to(param.device) if s != "step" else t for s, t in slots.items()}
        self.generator.set_state(state["rng"])
        self.step = meta["step"]
        self.train_losses = list(meta["train_losses"])
        self.eval_losses = [tuple(e) for e in meta["eval_losses"]]
        best_loss = meta["best_loss"] if meta["best_loss"] is not None else math.inf
        self.best = (best_loss, meta["best_step"], {k: state[f"best.{k}"].to(self.device) for k in self.vectors})
        self.stale_evals = meta["stale_evals"]


def train(host: Host, images, config: TrainConfig, masks=None, observer: TrainingObserver | None = None,
          snapshot_dir: str | Path | None = None, resume_from: str | Path | None = None) -> TrainResult:
    """Train one pseudo-word on `images` (PIL list or ComfyUI IMAGE tensor) through `host`."""
    trainer = Trainer(host, images, config, masks=masks, observer=observer, snapshot_dir=snapshot_dir)
    if resume_from is not None:
        trainer.load_state(resume_from)
    return trainer.run()
