"""Snapshots of a run: a loadable embedding of the vectors so far, and the state to resume from.

Both files are written atomically into the snapshot folder (`<name>-stepNNNNNN.safetensors` and
`<name>.resume.safetensors`); a resumed run with the same images and settings retraces the
uninterrupted one exactly. Only settings that cannot change the trajectory may differ on resume, and
after a NaN loss a lower learning rate. The same state, held in memory for one step (`Rollback`),
lets a NaN or an interrupt go back to the last vectors that gave a finite loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from .config import TrainConfig, TrainingError
from .embedding_file import OutputWriteError, atomic_write, save_embedding
from .metadata import snapshot_metadata

MAY_CHANGE_ON_RESUME = ("steps", "snapshot_every", "preview_every", "preview_prompt", "memory")
STOPPED_BY_NAN = "nan"


def resume_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / f"{name}.resume.safetensors"


def write_snapshot(trainer, folder: Path, stopped: str = "") -> Path:
    """The embedding of the run's vectors at its step and its resume state; returns the embedding's path.

    Both or neither: the state goes to a temporary file, the embedding is written, then the state is renamed
    into place. A write the disk or folder refuses (full, read-only) leaves the last snapshot as it was and
    is one SnapshotWriteError that names it.
    """
    from safetensors.torch import save_file

    name, step = trainer.config.name, trainer.step
    embedding = folder / f"{name}-step{step:06d}.safetensors"
    vectors = {k: v.detach() for k, v in trainer.vectors.items()}
    family = getattr(trainer.host, "family", "")
    tensors = state_tensors(trainer)
    meta = {"textinv.resume": json.dumps(state_meta(trainer, stopped))}

    def write_state(tmp: str) -> None:
        save_file(tensors, tmp, metadata=meta)
        save_embedding(embedding, vectors, name, metadata=snapshot_metadata(family, step), overwrite=True)

    try:
        atomic_write(resume_path(folder, name), write_state, overwrite=True)
    except OutputWriteError as error:
        raise SnapshotWriteError(_write_failed(trainer, folder, step, stopped, error)) from error
    return embedding


class SnapshotWriteError(TrainingError):
    """A snapshot could not be written (disk full, read-only folder); the message names the last one kept."""


def _write_failed(trainer, folder: Path, step: int, stopped: str, error: OutputWriteError) -> str:
    nan = stopped == STOPPED_BY_NAN
    what = f"the last good state (step {step}) after the NaN loss" if nan else f"the snapshot of step {step}"
    last = getattr(trainer, "last_snapshot", None)
    if last is not None:
        after = (f"the last snapshot written is {last}: free some space or make {folder} writable, then resume "
                 f"from {last.parent}" + (" with a lower learning rate" if nan else ""))
    else:
        after = f"no snapshot was written before this one: free some space or make {folder} writable and start again"
    return f"Training stopped: could not write {what} to {folder} ({error.reason}); {after}."


def read_resume(path: str | Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of the resume state in a snapshot folder, or named by any file in that folder."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_file() and not path.name.endswith(".resume.safetensors"):
        path = path.parent
    if path.is_dir():
        path = resume_path(path, name)
    if not path.is_file():
        raise TrainingError(f"No resume state at {path}: point to the snapshot folder of an earlier run.")
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})["textinv.resume"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return meta, tensors


def check_resumable(meta: dict, config: TrainConfig, fingerprint: str) -> None:
    """Refuse a resume whose settings or images differ from the saved run's (it would not retrace it);
    after a NaN loss, a lower learning rate is the one change allowed (and the advice given)."""
    saved = meta["config"]
    mine = asdict(config)
    defaults = asdict(TrainConfig(name=config.name))  # settings added since a file was written
    differing = [k for k in mine if k not in MAY_CHANGE_ON_RESUME
                 and json.dumps(saved.get(k, defaults[k])) != json.dumps(mine[k])]
    saved_lr = saved.get("learning_rate", defaults["learning_rate"])
    if meta.get("stopped") == STOPPED_BY_NAN and differing == ["learning_rate"] and config.learning_rate < saved_lr:
        differing = []
    if differing:
        hint = (" After a NaN loss, only a lower learning rate may change." if meta.get("stopped") == STOPPED_BY_NAN
                else "")
        raise TrainingError(f"Cannot resume: settings differ from the saved run ({', '.join(differing)}).{hint}")
    if meta["fingerprint"] != fingerprint:
        raise TrainingError("Cannot resume: the training images differ from the saved run's.")


def state_tensors(trainer, device: str | None = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a run's state: RNG, vectors, best vectors, per-image tokens, AdamW moments."""
    def own(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(device).contiguous().clone() if device else t.clone()

    state: dict[str, torch.Tensor] = {"rng": trainer.generator.get_state()}
    for key, v in trainer.vectors.items():
        state[f"vectors.{key}"] = own(v)
        state[f"best.{key}"] = own(trainer.best.vectors[key])
    for key, v in trainer.image_vectors.items():
        state[f"image_vectors.{key}"] = own(v)
    for i, param in enumerate(trainer.optimizer.param_groups[0]["params"]):
        for slot, value in trainer.optimizer.state.get(param, {}).items():
            state[f"optim.{i}.{slot}"] = own(value).reshape(value.shape)
    return state


def state_meta(trainer, stopped: str = "") -> dict:
    best = trainer.best
    return {"step": trainer.step, "config": asdict(trainer.config), "fingerprint": trainer.fingerprint,
            "train_losses": list(trainer.train_losses), "eval_losses": list(trainer.eval_losses),
            "best_loss": best.loss if math.isfinite(best.loss) else None, "best_step": best.step,
            "stopped": stopped, **plateau_state(trainer)}


def plateau_state(trainer) -> dict:
    """What a resumed run needs of what it did at plateaus (learning-rate drops, word swaps) to retrace the
    uninterrupted one."""
    return {"lr_drops": list(trainer.lr_drops), "swaps": list(trainer.swaps), "swaps_tried": trainer.swaps_tried,
            "swap_passes": trainer.swap_passes}


def apply_state(trainer, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Put a run back into a saved state (tensors from `state_tensors`, meta from `state_meta`)."""
    with torch.no_grad():
        for key, v in trainer.vectors.items():
            v.copy_(state[f"vectors.{key}"].to(v.device))
        for key, v in trainer.image_vectors.items():
            v.copy_(state[f"image_vectors.{key}"].to(v.device))
    for i, param in enumerate(trainer.optimizer.param_groups[0]["params"]):
        slots = {k.split(".", 2)[2]: t for k, t in state.items() if k.startswith(f"optim.{i}.")}
        trainer.optimizer.state[param] = {s: t.to(param.device) if s != "step" else t.clone()
                                          for s, t in slots.items()}
    trainer.generator.set_state(state["rng"])
    trainer.step = meta["step"]
    trainer.train_losses = list(meta["train_losses"])
    trainer.eval_losses = [tuple(e) for e in meta["eval_losses"]]
    trainer.best.loss = meta["best_loss"] if meta["best_loss"] is not None else math.inf
    trainer.best.step = meta["best_step"]
    trainer.best.vectors = {k: state[f"best.{k}"].to(trainer.host.device) for k in trainer.vectors}
    trainer.lr_drops = list(meta.get("lr_drops", []))  # files written before lr drops existed had none
    trainer.swaps = [tuple(swap) for swap in meta.get("swaps", [])]  # nor swaps
    trainer.swaps_tried = meta.get("swaps_tried", 0)
    trainer.swap_passes = meta.get("swap_passes", 0)
    for group in trainer.optimizer.param_groups:
        group["lr"] = trainer.learning_rate()


def load_state(trainer, path: str | Path) -> None:
    """Continue from the resume state written by a snapshot of a run with the same images and settings."""
    meta, state = read_resume(path, trainer.config.name)
    check_resumable(meta, trainer.config, trainer.fingerprint)
    apply_state(trainer, state, meta)


class Rollback:
    """The run's state before its latest two updates, kept on the device. An interrupt goes back to the
    state before the step it cut short; a non-finite loss at step n + 1 indicts the vectors of update n,
    so it goes back to the state before update n: the last vectors that gave a finite loss."""

    def __init__(self):
        self.before_last: tuple | None = None
        self.last: tuple | None = None

    def keep(self, trainer) -> None:
        meta = {"step": trainer.step, "train_losses": (), "eval_losses": (), "best_loss": None,
                "best_step": trainer.best.step, **plateau_state(trainer)}
        counts = (len(trainer.train_losses), len(trainer.eval_losses), trainer.best.loss)
        self.before_last, self.last = self.last, (state_tensors(trainer, device=None), meta, counts)

    def restore(self, trainer, updates: int = 1) -> None:
        """Back by `updates` (1 or 2) updates, or as far as is kept."""
        kept = self.before_last if updates == 2 and self.before_last is not None else self.last
        if kept is None:
            return
        state, meta, (n_train, n_eval, best_loss) = kept
        train_losses, eval_losses = trainer.train_losses[:n_train], trainer.eval_losses[:n_eval]
        apply_state(trainer, state, meta)
        trainer.train_losses, trainer.eval_losses, trainer.best.loss = train_losses, eval_losses, best_loss
